"""The performance issue's table: ``vitlens bench`` at deit_small, 224 px, batch 16, every method.

Three parts, each one ``vitlens.bench.bench`` run (the forward pass and the methods interleaved, one
warm-up each, then ``--repeat`` rounds; medians), each written as JSON to ``--out``:

- ``methods.json``: pm, attention, rollout, gradcam, gae, chefer, attnlrp, diffmask (seeded untrained gates;
  the probes are timed) on ``timm:deit_small_patch16_224?pretrained=0``;
- ``bcos.json``: bcos on a B-cos ViT-S/16 (``bcos:simple_vit_s_patch16_224?pretrained=0``), as a ratio
  to that model's own forward pass;
- ``scaling.json``: ig, smoothgrad, rise and occlusion at two step / sample / window counts.

``--cpu-time`` (with one thread) measures this process's CPU time instead of wall time: on a machine
shared with higher-priority jobs, wall-clock ratios measure the scheduler, not the methods. Then
``bench_table.py`` prints the markdown for ``RESULTS.md``. ``bench_deit_small.sh`` runs both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vitlens.bench import bench

MODEL = "timm:deit_small_patch16_224?pretrained=0"
BCOS = "bcos:simple_vit_s_patch16_224?pretrained=0"
METHODS = ["pm", "attention", "rollout", "gradcam", "gae", "chefer", "attnlrp", "diffmask"]
SCALING = [  # occlusion: window 12 → 3×3 positions, 11 → 4×4 on the 14×14 patch grid
    {"ig": {"steps": 2}, "smoothgrad": {"n_samples": 2}, "rise": {"n_masks": 8}, "occlusion": {"window": 12}},
    {"ig": {"steps": 4}, "smoothgrad": {"n_samples": 4}, "rise": {"n_masks": 16}, "occlusion": {"window": 11}},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/bench_deit_small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scaling-repeat", type=int, default=3, help="rounds for the (long) sampling methods")
    ap.add_argument("--parts", default="methods,bcos,scaling")
    ap.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time (a shared machine)")
    ap.add_argument("--model", default=MODEL, help="the classifier for the methods and scaling parts")
    ap.add_argument("--bcos-model", default=BCOS, help="the B-cos ViT for the bcos part")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], help="run everything under torch.autocast")
    a = ap.parse_args()
    if a.cpu_time:
        torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.autocast)
    common = {"batch_size": a.batch_size, "cpu_time": a.cpu_time, "device": a.device, "autocast": autocast}
    parts = a.parts.split(",")
    if "methods" in parts:
        record = bench(a.model, METHODS, repeat=a.repeat, **common)
        (out / "methods.json").write_text(json.dumps(record, indent=1))
    if "bcos" in parts:
        record = bench(a.bcos_model, ["bcos"], repeat=a.repeat, **common)
        (out / "bcos.json").write_text(json.dumps(record, indent=1))
    if "scaling" in parts:
        records = [bench(a.model, list(s), repeat=a.scaling_repeat, options=s, **common) for s in SCALING]
        (out / "scaling.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
