"""``fid``: Fréchet Inception Distance with the Inception weights the user provides, lower is better.

Weights: the TorchScript Inception-v3 that clean-fid and the StyleGAN metrics use,
``inception-2015-12-05.pt`` (a port of the TensorFlow FID graph), from
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt ;
set ``inception_path`` to the downloaded file. It is loaded with ``torch.jit.load`` and called as
``model(x, return_features=True)`` on float images in [0, 255] of 299 x 299, giving the 2048-d
pool features (N, 2048). Nothing is loaded until the first :meth:`Fid.compute`.

Pipeline, as clean-fid's ``mode="clean"``: images (N, 3, H, W) in [0, 1] -> x 255, rounded to the
uint8 levels a saved PNG has (``quantize``) -> resized to 299 x 299 with PIL-equivalent antialiased
bicubic on float values and clipped to [0, 255] (``resize_filter="bicubic"``; ``"bilinear"`` is
clean-fid's ``legacy_pytorch`` resizer) -> features -> mean and unbiased covariance -> Fréchet
distance in float64 (:mod:`aptp.metrics.frechet`; ``method="sqrtm"`` is clean-fid's own
computation, ``"eigh"`` the default, stable on rank-deficient covariances and equal to it up to
rounding otherwise).

The reference set is ``reference`` images passed to :meth:`compute`, or precomputed statistics
(``reference_stats``: an ``.npz`` with ``mu`` (2048,) and ``sigma`` (2048, 2048), the format
clean-fid stores; :meth:`Fid.save_reference_stats` writes one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from aptp.core.interfaces import Metric
from aptp.metrics._common import MissingWeightsError, batches, check_images, resize
from aptp.metrics.frechet import METHODS, feature_statistics, frechet_distance

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SIZE = 299
RESIZE_FILTERS = ("bicubic", "bilinear")


@dataclass
class FidConfig:
    """Parameters of ``fid``."""

    inception_path: Optional[str] = None  # TorchScript inception-2015-12-05.pt (see INCEPTION_URL)
    reference_stats: Optional[str] = None  # .npz with mu (D,), sigma (D, D), instead of reference images
    resize_filter: str = "bicubic"  # "bicubic": clean-fid "clean"; "bilinear": clean-fid "legacy_pytorch"
    quantize: bool = True  # round to uint8 levels first, as images saved to PNG are
    method: str = "eigh"  # sqrt-trace of the covariance product: "eigh" or "sqrtm" (clean-fid)
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(f"fid: resize_filter must be one of {RESIZE_FILTERS}, got {self.resize_filter!r}.")
        if self.method not in METHODS:
            raise ValueError(f"fid: method must be one of {METHODS}, got {self.method!r}.")
        if self.batch_size < 1:
            raise ValueError(f"fid: batch_size must be >= 1, got {self.batch_size}.")


class Fid(Metric):
    """FID: Fréchet distance between Inception features of generated and reference images."""

    config_class = FidConfig
    name: ClassVar[str] = "fid"
    higher_is_better: ClassVar[bool] = False
    requires_weights: ClassVar[bool] = True

    def __init__(self, config: FidConfig | None = None) -> None:
        super().__init__(config)
        self._model: Any = None

    def can_probe(self) -> bool:
        """Never: the contract probe must not load user-provided (and large) weights."""
        return False

    def load(self) -> Any:
        """Load the TorchScript Inception (once)."""
        if self._model is not None:
            return self._model
        path = self.config.inception_path
        if path is None or not Path(path).is_file():
            what = "no `inception_path` is set" if path is None else f"inception_path {path} does not exist"
            raise MissingWeightsError(
                f"fid needs the TorchScript Inception weights used by clean-fid, but {what}. Download "
                f"inception-2015-12-05.pt from {INCEPTION_URL} and set the metric's `inception_path` "
                "(e.g. `metrics[0].inception_path=/path/to/inception-2015-12-05.pt`)."
            )
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the weights are TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location=self.config.device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(
                f"fid: {path} is not a TorchScript model ({exc}); `inception_path` must be clean-fid's "
                f"inception-2015-12-05.pt from {INCEPTION_URL}."
            ) from exc
        self._model = model.eval()
        return self._model

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [0, 1] -> (b, 3, 299, 299) float in [0, 255], as clean-fid feeds Inception."""
        x = images.float() * 255.0
        if self.config.quantize:
            x = x.round().clamp(0, 255)
        x = resize(x, (INCEPTION_SIZE, INCEPTION_SIZE), self.config.resize_filter)
        return x.clamp(0, 255)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Inception pool features (N, D) in float64."""
        images = check_images(images)
        model, out = self.load(), []
        for sl in batches(images.shape[0], self.config.batch_size):
            x = self.prepare(images[sl]).to(self.config.device)  # (b, 3, 299, 299)
            f = model(x, return_features=True)  # (b, D)
            out.append(f.reshape(f.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out)

    def statistics(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) of the Inception features of ``images`` (N >= 2)."""
        return feature_statistics(self.features(images))

    def save_reference_stats(self, images: torch.Tensor, path: str | Path) -> Path:
        """Write the statistics of reference images as an ``.npz`` (mu, sigma) for ``reference_stats``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mu, sigma = self.statistics(images)
        with open(path, "wb") as fh:  # np.savez on a handle keeps the name exactly as given
            np.savez(fh, mu=mu, sigma=sigma)
        return path

    def _reference(self, reference: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        if reference is not None:
            return self.statistics(check_images(reference, "reference"))
        if self.config.reference_stats is None:
            raise ValueError(
                "fid needs a reference set: pass reference images to compute(..., reference=images) or set "
                "`reference_stats` to an .npz with mu and sigma (Fid.save_reference_stats writes one)."
            )
        path = Path(self.config.reference_stats)
        if not path.is_file():
            raise FileNotFoundError(f"fid: reference_stats file {path} does not exist.")
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"fid: {path} must hold arrays 'mu' and 'sigma', it holds {sorted(data.files)}.")
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)

    def compute(self, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None = None) -> float:
        """FID between ``images`` and the reference set (``prompts`` are not used)."""
        mu1, s1 = self.statistics(images)
        mu2, s2 = self._reference(reference)
        if mu1.shape != mu2.shape:
            raise ValueError(
                f"fid: generated features have {mu1.shape[0]} dimensions but the reference statistics "
                f"{mu2.shape[0]}; they come from different feature extractors."
            )
        return frechet_distance(mu1, s1, mu2, s2, method=self.config.method)
