"""How long ``vitlens evaluate`` takes, beside Quantus' pixel-flipping and region-perturbation metrics.

Part 1 times ``evaluate`` with every metric that applies to the data (accuracy once, then every metric
for every method) on ``-n`` test images. Part 2 puts the perturbation metric next to Quantus on the
*same* maps (computed once, outside the timings) and the same model: vitlens deletion with 16 steps of
whole patches and of pixels, Quantus ``RegionPerturbation`` (patch-sized regions, 16 of them) and
``PixelFlipping`` (H·W/16 pixels per step, 16 steps), all with a black fill.

Run (the recorded figures: 1,000 images; the CPU should be otherwise idle)::

    python benchmarks/evaluate_cost.py --model vitlens:fashion-vit --data fashion-canvas:test -n 1000 \\
        --record benchmarks/evaluate_cost.json

Quantus is optional (``pip install quantus``); without it part 2 says so and times vitlens alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from vitlens import load_model
from vitlens.backbones import upsample
from vitlens.data import collate, open_dataset
from vitlens.explainers import get_explainer
from vitlens.io import atomic_write_json
from vitlens.metrics import Batch, evaluate, get_metric


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def vitlens_deletion(backbone, raw: dict, maps: torch.Tensor, granularity: str, batch_size: int) -> float:
    m = get_metric("deletion", fill="zero", granularity=granularity, steps=16)
    for s in range(0, len(maps), batch_size):
        sl = slice(s, s + batch_size)
        m.update(
            Batch(raw["image"][sl], raw["label"][sl], raw["label"][sl], raw["index"][sl], model=backbone), maps[sl]
        )
    m.finish()
    return m.result()["deletion"]


def full_run(model: str, methods: str, data: str, n: int, batch_size: int) -> dict:
    summary, seconds = timed(evaluate, model, methods, "all", data, limit=n, batch_size=batch_size)
    return {
        "seconds": round(seconds, 2),
        "images_per_second": round(summary["n"] / seconds, 2),
        "seconds_per_method": summary["seconds"],
        "metrics": sorted(summary["used"]),
        "accuracy": summary["accuracy"],
        "results": summary["results"],
    }


def side_by_side(model: str, methods: list[str], data: str, n: int, batch_size: int) -> dict:
    backbone = load_model(model).eval()
    dataset = open_dataset(data, size=backbone.preprocessing.input_size)
    raw = collate([dataset[i] for i in range(min(n, len(dataset)))])
    images, labels = raw["image"], raw["label"]
    h, w = images.shape[-2:]
    patch = backbone.patch_size[0]
    out: dict = {}
    try:
        import quantus
    except ImportError:
        quantus = None
        out["quantus"] = "not installed (pip install quantus): vitlens timed alone"
    for method in methods:
        explainer = get_explainer(method, backbone)
        maps = torch.cat([explainer(images[s : s + batch_size], labels[s : s + batch_size])
                          for s in range(0, len(images), batch_size)])  # fmt: skip
        row: dict = {}
        for granularity in ("patch", "pixel"):
            value, seconds = timed(vitlens_deletion, backbone, raw, maps, granularity, batch_size)
            row[f"vitlens deletion ({granularity} units, 16 steps)"] = {"seconds": round(seconds, 2), "auc": value}
        if quantus is not None:
            x, y = images.numpy(), labels.numpy()
            a = upsample(maps, (h, w))[:, None].numpy()
            common = dict(perturb_baseline="black", disable_warnings=True, display_progressbar=False)
            rp = quantus.RegionPerturbation(patch_size=patch, regions_evaluation=16, order="morf", **common)
            # its per-sample AUC calls np.trapz, gone in numpy 2.4: take the curves (same forward passes)
            pf = quantus.PixelFlipping(features_in_step=h * w // 16, return_auc_per_sample=False, **common)
            for name, metric in (("quantus RegionPerturbation (16 regions)", rp), ("quantus PixelFlipping", pf)):
                scores, seconds = timed(
                    metric, model=backbone, x_batch=x, y_batch=y, a_batch=a, channel_first=True, softmax=True,
                    device="cpu", batch_size=batch_size,
                )  # fmt: skip
                row[name] = {"seconds": round(seconds, 2), "mean": float(np.mean([np.mean(v) for v in scores]))}
        out[method] = row
    if quantus is not None:
        out["quantus_version"] = quantus.__version__
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vitlens:fashion-vit")
    p.add_argument("--data", default="fashion-canvas:test")
    p.add_argument("-n", type=int, default=1000, help="test images")
    p.add_argument("--methods", default="rollout,attention")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--record", help="also write the record (JSON) to this file")
    a = p.parse_args()
    record = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": a.model,
        "data": a.data,
        "n": a.n,
        "batch_size": a.batch_size,
        "evaluate_all_metrics": full_run(a.model, a.methods, a.data, a.n, a.batch_size),
        "same_maps_side_by_side": side_by_side(a.model, a.methods.split(","), a.data, a.n, a.batch_size),
    }
    print(json.dumps(record, indent=2))
    if a.record:
        atomic_write_json(a.record, record)


if __name__ == "__main__":
    main()
