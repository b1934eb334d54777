"""Peak tensor memory of one call, on CPU or CUDA (allocator level: tensors, not the process's RSS)."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def peak_memory(fn: Callable[[], object], device: str) -> tuple[int, int]:
    """(bytes of tensors live when ``fn`` starts, peak bytes while it runs) on ``device``.

    CUDA: the caching allocator's counters (``torch.cuda.max_memory_allocated``). CPU: torch's
    profiler memory timeline (``export_memory_timeline``), whose first point is the tensors alive
    and used at the start (weights, inputs) and whose maximum is the peak.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return before, torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(d) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # (T,) times, (T, categories) bytes
    totals = [sum(s) for s in sizes]
    return int(totals[0]), int(max(totals))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
