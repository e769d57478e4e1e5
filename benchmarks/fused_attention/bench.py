"""Before/after figures of the attention methods on the fused path: ``vitlens.bench.bench`` at deit_small,
224 px, batch 8, process CPU time on one thread (a shared machine), 5 interleaved rounds; the ratio of each
method to one plain (fused) forward pass. ``--autocast bf16`` times everything under CPU bf16 autocast.

    python benchmarks/fused_attention/bench.py --out benchmarks/fused_attention/after_fp32.json
"""

from __future__ import annotations

import argparse
import json

import torch

from vitlens.bench import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--autocast", choices=["bf16"])
    ap.add_argument("--model", default="timm:deit_small_patch16_224?pretrained=0")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    record = bench(a.model, ["pm", "attention", "rollout", "gae", "diffmask"], batch_size=a.batch_size,
                   repeat=a.repeat, cpu_time=True, autocast=torch.bfloat16 if a.autocast else None)  # fmt: skip
    with open(a.out, "w") as f:
        json.dump(record, f, indent=1)
    print({name: round(r["ratio_to_forward"], 3) for name, r in record["results"].items()})


if __name__ == "__main__":
    main()
