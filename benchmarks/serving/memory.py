"""Resident memory of K = 8 world experts: materialised (each its own weights) vs shared storage
(ONE dense copy + each expert's diffs), against the dense weights.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/memory.py   # writes benchmarks/serving/memory_world.json

Memory = bytes of the distinct tensor storages the experts hold (``aptp.pruners.expert.resident_bytes``;
tensors, not the process's RSS). A shared expert also gathers its weights at call time: while one call
runs, one expert's gathered weights (about its materialised size) exist on top.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _world import K, architectures, world_backbone  # noqa: E402

from aptp.pruners.expert import LowRank, load_expert, resident_bytes, save_expert  # noqa: E402
from aptp.pruners.gating import cut_model  # noqa: E402

MIB = 2**20


def lora_fraction_sd21(rank: int) -> float:
    """LoRA parameters of rank ``rank`` on every Linear / Conv2d of the SD2.1 UNet (dense shapes, meta
    device: no weights) over the UNet's parameters: one uncut expert's adapters, an upper bound."""
    from aptp.backbones.unet import UNetBackbone, UNetBackboneConfig

    unet = UNetBackbone(UNetBackboneConfig(preset="sd21")).build_denoiser("meta")
    lora = sum(rank * (m.weight[0].numel() + m.weight.shape[0]) for m in unet.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return lora / sum(p.numel() for p in unet.parameters())


def main() -> None:
    torch.manual_seed(0)
    bb, ref = world_backbone()
    cond = bb.conditioning()
    dense = bb.build_denoiser().eval()
    space, grans, archs, _ = architectures(dense, cond)
    dense_bytes = resident_bytes(dense)
    rows = []
    x = torch.randn(2, *cond.sample_shape)
    t = torch.tensor([100, 700])
    text = torch.randn(2, cond.text_len, cond.text_dim)
    with tempfile.TemporaryDirectory() as tmp:
        def save(kind: str, k: int, rank: int | None) -> Path:
            expert = cut_model(dense, space, grans, archs[k])
            lowrank = {}
            g = torch.Generator().manual_seed(k)
            with torch.no_grad():
                for name, p in expert.named_parameters():
                    if kind == "full":  # full fine-tuning: every weight changed
                        p.add_(1e-3 * torch.randn(p.shape, generator=g))
                    elif kind == "lora" and p.dim() >= 2 and name.endswith("weight"):
                        lowrank[name] = LowRank(1e-3 * torch.randn(rank, p[0].numel(), generator=g),
                                                1e-3 * torch.randn(p.shape[0], rank, generator=g), 1.0)
            storage = "materialised" if kind == "materialised" else "shared"
            return save_expert(Path(tmp) / f"{kind}-{rank}-{k}", expert, archs[k], space, grans, cond, backbone=ref,
                               storage=storage, dense=dense if storage == "shared" else None, lowrank=lowrank)

        cases = [("materialised (fully fine-tuned)", "materialised", None), ("shared, exact diffs (fully fine-tuned)", "full", None),
                 ("shared, LoRA r=2", "lora", 2), ("shared, LoRA r=4", "lora", 4), ("shared, LoRA r=8", "lora", 8), ("shared, LoRA r=16", "lora", 16),
                 ("shared, no phase-2 change", "none", None)]
        ratios = [float(space.macs_ratio(a)) for a in archs]
        for label, kind, rank in cases:
            folders = [save(kind, k, rank) for k in range(K)]
            shared = kind != "materialised"
            experts = [load_expert(f, dense=dense, materialise=not shared) for f in folders]
            held = resident_bytes(dense, *experts) if shared else resident_bytes(*experts)
            one = resident_bytes(load_expert(folders[0], dense=dense))  # what one call gathers
            disk = sum(sum(p.stat().st_size for p in f.iterdir() if p.suffix == ".safetensors") for f in folders)
            if shared:  # the shared form computes what the materialised form computes
                m = load_expert(folders[0], dense=dense)
                with torch.no_grad():
                    a = experts[0](x, t, encoder_hidden_states=text, return_dict=False)[0]
                    b = m(x, t, encoder_hidden_states=text, return_dict=False)[0]
                err = float((a - b).abs().max())
            else:
                err = 0.0
            rows.append({"model": label, "resident_mib": held / MIB, "resident_over_dense": held / dense_bytes,
                         "peak_in_call_over_dense": (held + (one if shared else 0)) / dense_bytes,
                         "disk_mib": disk / MIB, "max_abs_diff_vs_materialised": err})
            print(rows[-1], flush=True)
    sd21 = {r: lora_fraction_sd21(r) for r in (4, 8, 16)}
    print("SD2.1 LoRA bytes per expert / dense UNet bytes (dense layer shapes, an upper bound):", sd21)
    out = {"date": str(date.today()), "sd21_lora_fraction_per_expert": sd21, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "versions": f"Python {platform.python_version()}, torch {torch.__version__}", "K": K,
           "dense_mib": dense_bytes / MIB, "expert_macs_ratios": [round(r, 3) for r in ratios], "rows": rows}
    path = Path(__file__).with_name("memory_world.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"dense {dense_bytes / MIB:.2f} MiB; wrote {path}")


if __name__ == "__main__":
    main()
