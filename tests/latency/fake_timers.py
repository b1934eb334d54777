"""Deterministic stand-ins for a clock (``ProfiledLatency.timer``): no latency test reads a real one."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from aptp.core.resources import _register_cpu_sdpa_formula


class FlopTimer:
    """MACs / 1e6 of each candidate as its "ms" (exactly additive over modules, linear in kept units),
    and how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, candidates):
        _register_cpu_sdpa_formula()
        self.calls += 1
        out = {}
        for name, fn in candidates.items():
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                fn()
            out[name] = counter.get_total_flops() / 2 / 1e6
        return out


def dispatch_timer(candidates):
    """"ms" = MACs / 1e5 + 0.02 per module call: small widths and MAC-free modules are not free."""
    _register_cpu_sdpa_formula()
    out = {}
    for name, fn in candidates.items():
        calls = [0]

        def count(module, args, output):
            calls[0] += 1

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                fn()
        finally:
            handle.remove()
        out[name] = counter.get_total_flops() / 2 / 1e5 + 0.02 * calls[0]
    return out
