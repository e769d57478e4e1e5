"""The markdown tables of ``benchmarks/RESULTS.md`` from the JSON records ``bench_deit_small.sh`` writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"pm": 1.10, "attention": 1.35, "rollout": 1.45, "gradcam": 1.6, "gae": 2.6, "chefer": 3.0, "attnlrp": 3.0,
           "diffmask": 1.5, "bcos": 3.5}  # fmt: skip
COUNTS = {"ig": "steps", "smoothgrad": "n_samples", "rise": "n_masks", "occlusion": "window"}


def positions(window: int, grid: int = 14) -> int:
    return (grid - window + 1) ** 2


def device(record: dict) -> str:
    """The device in words: the GPU's name or the CPU's threads, and the autocast dtype if any."""
    name = f"{record['device']} ({record['threads']} threads)" if record["device"] == "cpu" else record["device"]
    return name + (f", {record['autocast']} autocast" if record.get("autocast") else ", fp32")


def table(folder: Path) -> str:
    methods = json.loads((folder / "methods.json").read_text())
    bcos = json.loads((folder / "bcos.json").read_text())
    rows = [
        f"`{methods['model']}`, batch {methods['batch_size']}, {device(methods)}, "
        f"forward {methods['forward_s'] * 1000:.0f} ms per batch, median of {methods['repeat']} interleaved rounds; "
        f"`bcos` on `{bcos['model']}` (forward {bcos['forward_s'] * 1000:.0f} ms), as a ratio to that model's "
        "own forward.",
        "",
        "| method | ratio to forward | target | met? | ms/image | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in [*methods["results"].items(), *bcos["results"].items()]:
        ratio, target = r["ratio_to_forward"], TARGETS.get(name)
        met = "—" if target is None else ("yes" if ratio <= target else "**no**")
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        rows.append(f"| {name} | {ratio:.2f}× | {'' if target is None else f'≤ {target:.2f}×'} | {met} | "
                    f"{r['seconds_per_image'] * 1000:.2f} | {peak} |")  # fmt: skip
    scaling = folder / "scaling.json"
    if scaling.exists():
        low, high = json.loads(scaling.read_text())
        rows += ["", "| method | count | ratio to forward | count | ratio to forward | cost per unit of count |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for name, key in COUNTS.items():
            n1, n2 = low["options"][name][key], high["options"][name][key]
            r1, r2 = low["results"][name]["ratio_to_forward"], high["results"][name]["ratio_to_forward"]
            if name == "occlusion":
                n1, n2 = positions(n1), positions(n2)
                label = "windows"
            else:
                label = key
            slope = (r2 - r1) / (n2 - n1)
            rows.append(f"| {name} | {n1} {label} | {r1:.2f}× | {n2} {label} | {r2:.2f}× | {slope:.2f}× forward |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/bench_deit_small")))
