"""Write the serving section of benchmarks/RESULTS.md from memory_world.json, serving_world.json,
cpu_cost_world.json and lora_vs_full_world.json.

    python benchmarks/serving/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from _results import update_section  # noqa: E402

START, END = "<!-- serving[world]:start -->", "<!-- serving[world]:end -->"


def main() -> None:
    mem = json.loads((HERE / "memory_world.json").read_text())
    srv = json.loads((HERE / "serving_world.json").read_text())
    lines = [START, "## Serving K experts like one model, world backbone (`benchmarks/serving/`)", "",
             f"- date {mem['date']}; {srv['machine']}; {srv['versions']}",
             f"- K = {mem['K']} experts with scattered kept units (not the first units of each group), kept-MACs "
             f"ratios {', '.join(f'{r:.2f}' for r in mem['expert_macs_ratios'])}",
             "- commands: `OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/memory.py`, "
             "`OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/serving.py`, "
             "`OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serving/cpu_cost.py`, `python benchmarks/serving/report.py`",
             "", "### Resident memory of K = 8 experts (tensor storages, each counted once; dense = "
             f"{mem['dense_mib']:.2f} MiB)", "",
             "| experts | resident (MiB) | resident / dense | + one call's gathered weights / dense | on disk (MiB) | max abs diff vs materialised |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in mem["rows"]:
        lines.append(f"| {r['model']} | {r['resident_mib']:.2f} | {r['resident_over_dense']:.2f} | "
                     f"{r['peak_in_call_over_dense']:.2f} | {r['disk_mib']:.2f} | {r['max_abs_diff_vs_materialised']:.1e} |")
    sd = mem["sd21_lora_fraction_per_expert"]
    lines += ["", "SD2.1 (from its layer shapes, uncut: an upper bound): one expert's LoRA factors are "
              + ", ".join(f"{float(v):.4f} of the dense UNet at r = {k}" for k, v in sd.items())
              + f", so K = 8 shared experts at r = 8 would hold about {1 + 8 * float(sd['8']):.2f}x the dense weights.",
              "", f"### Serving: Poisson traces through `aptp.serving.ExpertScheduler` ({srv['requests']} requests, "
              f"{srv['steps']} denoising steps, max_batch {srv['max_batch']}, max_wait {srv['max_wait_s']} s)", "",
              f"Routed load-weighted mean kept MACs {srv['routed_load_weighted_macs']:.3f}, static {srv['static_macs']:.3f}. "
              "Wall-clock throughput and latency measure a machine shared with a training job (this process at nice 19); "
              "CPU throughput = requests / CPU seconds of the serving thread (routing + all groups), the contention-free figure.",
              "The burst (all requests at t = 0: saturation) is the median of 3 interleaved rounds; the Poisson loads one round each. "
              f"Scheduler: {srv.get('scheduler', 'encode twice (before reuse_text; see the CPU-cost table below)')}.",
              "", "| load | model | throughput (img/s) | CPU throughput (img/s) | CPU throughput / static | routing share of CPU | p50 (s) | p95 (s) | groups | mean group |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    static = {r["load"]: r["cpu_throughput"] for r in srv["rows"] if r["model"].startswith("static")}
    for r in srv["rows"]:
        lines.append(f"| {r['load']} | {r['model']} | {r['throughput']:.2f} | {r['cpu_throughput']:.2f} | "
                     f"{r['cpu_throughput'] / static[r['load']]:.2f} | {r['route_cpu_share']:.3f} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} | {r['groups']:.0f} | {r['mean_batch']:.1f} |")
    cost = HERE / "cpu_cost_world.json"
    if cost.is_file():
        cc = json.loads(cost.read_text())
        lines += ["", f"### CPU cost per image at saturation, before / after encoding each prompt once (`cpu_cost.py`, "
                  f"{cc['date']})", "",
                  f"Machine: {cc['machine']}; the table above is wall-clock and older, and is not "
                  f"comparable with this one. One call = the {cc['requests']}-request trace at once ({cc['steps']} steps, "
                  f"max_batch {cc['max_batch']}) served in the calling thread; every candidate in the same {cc['rounds']} "
                  f"interleaved rounds; median (p25-p75) thread CPU ms per image, routing and encoding included. "
                  f"Routed load {cc['routed_load']}, load-weighted mean kept MACs {cc['routed_load_weighted_macs']:.3f}. "
                  "'encode twice': the router's MiniLM encodes each prompt, then each group's generation encodes it again "
                  "with the backbone's MiniLM (the scheduler before); 'encode once': one backbone encoding per prompt at "
                  "routing time, reused by the generation, the routing embedding pooled from its token states "
                  "(`ExpertScheduler(reuse_text=True)`, the default now). Encoding share: CPU spent encoding and routing "
                  "at routing time (with 'encode once' it includes the text states the groups no longer compute).", "",
                  "| model | scheduler | CPU ms / image | CPU throughput (img/s) | vs static 0.575, encode once | encoding share | groups | mean group |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in cc["rows"]:
            model, how = (x.strip() for x in r["candidate"].split("|"))
            lines.append(f"| {model} | {how} | {r['cpu_ms_per_image_median']:.1f} ({r['cpu_ms_per_image_p25']:.1f}-"
                         f"{r['cpu_ms_per_image_p75']:.1f}) | {r['cpu_throughput']:.2f} | "
                         f"{r['throughput_vs_static_0575_once']:.3f} | {r['route_cpu_share']:.3f} | {r['groups']} | "
                         f"{r['mean_group']:.1f} |")
    lora = HERE / "lora_vs_full_world.json"
    if lora.is_file():
        lv = json.loads(lora.read_text())
        lines += ["", f"### Phase 2: full fine-tuning vs LoRA (`lora_vs_full.py`; one expert, {lv['steps']} steps at batch "
                  f"{lv['batch_size']}, the world preset's phase-2 loss weights)", "",
                  "Output-distillation MSE against the dense model on a fixed batch of the expert's prompts (a proxy of "
                  "quality, not the evaluation protocol), and the size of the stored diff (shared storage).", "",
                  "| phase 2 | lr | distill before | distill after | stored diff (MiB) | CPU s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in lv["rows"]:
            lines.append(f"| {r['phase2']} | {r['lr']:g} | {r['distill_before']:.4f} | {r['distill_after']:.4f} | "
                         f"{r['stored_diff_mib']:.2f} | {r['cpu_s']:.0f} |")
    lines.append(END)
    update_section(START, END, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
