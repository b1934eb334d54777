"""The few stand-in modules a physical cut needs where no diffusers block of size zero exists.

Each computes exactly what the hard-gated block computes when *all* of its units are gated off:

* :class:`ResidualBypass` -- a ``ResnetBlock2D`` without its residual branch:
  ``(shortcut(x) + b) / output_scale_factor``, where ``shortcut`` is the block's 1x1
  ``conv_shortcut`` (or the identity when in == out channels) and ``b`` is ``conv2``'s bias when the
  branch lost all its channels (a conv of zeros is its bias) or nothing when the block is dropped.

Parameter accounting rule: a *width* cut removes only what its units own (rows / columns / norm
channels of the pruned width); the block's width-independent parameters -- ``norm1`` of a ResNet,
``to_out[0]``'s bias of an attention, ``net[2]``'s bias of a FFN -- go only with a *depth* cut of
the whole block. So a block whose width units are all cut is the block at width zero and keeps
them, and the cut model's parameter count is exactly the unit space's linear account
(``UnitSpace.kept_params``: fixed + kept units). ``ResidualBypass`` therefore holds the ResNet's
``norm1`` when its branch lost every channel (unused in forward: it normalised the input of a
zero-width ``conv1``; ``2 C_in`` parameters, under the same state-dict key as in the dense block).
* :class:`SkipTransformer` -- a ``Transformer2DModel`` reduced to its residual: output = input
  (wrapped as diffusers returns it: a tuple or a ``Transformer2DModelOutput``).
* :class:`SkipTransformerBlock` -- a dropped ``BasicTransformerBlock`` (DiT / PixArt): returns its
  ``hidden_states`` tensor itself, as the block returns a bare tensor.
* :class:`SkipJointBlock` -- a dropped two-stream block (SD3 ``JointTransformerBlock``, FLUX
  ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``): returns ``(encoder_hidden_states,
  hidden_states)`` as it got them, the blocks' own output order.
* :class:`NoHeadAttention` -- an ``Attention`` with zero heads: ``to_out[0]`` of zeros = its bias
  (joint attention: the pair ``(to_out[0]'s bias, to_add_out's bias)`` over each stream's tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ResidualBypass(nn.Module):
    """``ResnetBlock2D`` minus its residual branch: ``(shortcut(x) + bias) / output_scale_factor``.

    ``norm1``: the block's input norm, kept (unused) when the branch was cut to width zero by a width
    cut, so that only a depth cut removes a block's width-independent parameters (see the module
    docstring); ``None`` when the block is dropped by depth.
    """

    def __init__(self, conv_shortcut: nn.Module | None, output_scale_factor: float = 1.0,
                 bias: torch.Tensor | None = None, norm1: nn.Module | None = None) -> None:
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.output_scale_factor = float(output_scale_factor)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.norm1 = norm1

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        if self.bias is not None:
            x = x + self.bias[None, :, None, None]
        return x / self.output_scale_factor


class SkipTransformer(nn.Module):
    """``Transformer2DModel`` reduced to its residual connection (returns its input)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if not return_dict:
            return (hidden_states,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=hidden_states)


class SkipTransformerBlock(nn.Module):
    """A dropped ``BasicTransformerBlock``: ``hidden_states`` (B, N, C) in, the same tensor out.

    Takes the block's call signature (``attention_mask=``, ``encoder_hidden_states=``, ``timestep=``,
    ...) and ignores everything but ``hidden_states``.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class SkipJointBlock(nn.Module):
    """A dropped two-stream block: ``(encoder_hidden_states, hidden_states)`` in, the same pair out
    (the order SD3's and FLUX's blocks return). Ignores ``temb``, rotary embeddings and kwargs."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, torch.Tensor]:
        return encoder_hidden_states, hidden_states


class NoHeadAttention(nn.Module):
    """``Attention`` whose heads were all cut: its output is ``to_out[0]``'s bias (or zeros).

    Joint attention (``context_dim`` set: SD3 / FLUX double blocks) returns the pair
    ``(out (B, N, out_dim), context (B, L, context_dim))``, the context being ``to_add_out``'s bias
    (or zeros, e.g. for SD3's last block whose text output is unused). FLUX's single blocks' attention
    has no output projection (``out_dim = 0``: an empty (B, N, 0) that its block concatenates)."""

    def __init__(self, out_dim: int, bias: torch.Tensor | None, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, keep: dict[str, nn.Module] | None = None,
                 context_dim: int | None = None, context_bias: torch.Tensor | None = None) -> None:
        """``keep``: the attention's width-independent submodules with parameters (e.g. ``norm_q`` /
        ``norm_k`` of a qk-norm attention), held unused under their own names (same state-dict keys)
        so the parameter count stays the unit space's (see the module docstring)."""
        super().__init__()
        self.out_dim = int(out_dim)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.residual_connection = bool(residual_connection)
        self.rescale_output_factor = float(rescale_output_factor)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.context_bias = nn.Parameter(context_bias.detach().clone()) if context_bias is not None else None
        for name, module in (keep or {}).items():
            self.add_module(name, module)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        enc = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if self.context_dim is not None and isinstance(enc, torch.Tensor):  # joint: (image, text) outputs
            ctx = enc.new_zeros(*enc.shape[:-1], self.context_dim)  # (B, L, context_dim)
            if self.context_bias is not None:
                ctx = ctx + self.context_bias
            return self._out(hidden_states), ctx
        return self._out(hidden_states)

    def _out(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() == 4:  # (B, C, H, W)
            b, _, h, w = hidden_states.shape
            out = hidden_states.new_zeros(b, self.out_dim, h, w)
            if self.bias is not None:
                out = out + self.bias[None, :, None, None]
        else:  # (B, N, C)
            out = hidden_states.new_zeros(*hidden_states.shape[:-1], self.out_dim)
            if self.bias is not None:
                out = out + self.bias
        if self.residual_connection:
            out = out + hidden_states
        return out / self.rescale_output_factor
