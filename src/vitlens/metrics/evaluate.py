"""``vitlens evaluate``: every metric for every method over a data set, batched and sharded.

Classification accuracy is computed once; then, batch by batch, each method's maps for the batch's
targets (the ground-truth class by default, as WSOL and the pointing games prescribe) go to every
metric's ``update``. Under ``torchrun`` process ``r`` of ``W`` takes the samples ``r, r + W, …``; the
metrics' states are sums, reduced with ``all_reduce`` at the end, and per-image values are gathered
back into data-set order, so a sharded run equals a single-process one up to float summation order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backbones import Backbone
from ..data import collate, open_dataset, parse_data_spec, resize
from ..errors import VitlensError
from ..explainers import EXPLAINERS, get_explainer
from ..io import atomic_write_json, check_output_file
from ..models import load_model
from ..options import parse_finite
from ..training.distributed import all_reduce_sum, setup, teardown
from . import progress as progress_state
from .base import METRICS, Batch, get_metric
from .gallery import gallery_payload, pick_indices
from .uncertainty import LEVEL, best_methods, bootstrap

TARGETS = ("label", "predicted")


def parse_names(value: str | Sequence[str], known: dict, kind: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → names, each checked against the registry ``known``."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    if not names:
        raise VitlensError(f"no {kind}s given (known: {', '.join(sorted(known))})")
    for n in names:
        if n not in known:
            raise VitlensError(f"unknown {kind} {n!r} (known: {', '.join(sorted(known))})")
    return list(dict.fromkeys(names))


def metric_names(value: str | Sequence[str], dataset) -> list[str]:
    """Metric names; ``all`` = every registered metric that applies to ``dataset``, except the costly ones
    (``in_all = False``: ROAD solves 18 sparse systems per image), which run when named."""
    if value == "all" or (not isinstance(value, str) and list(value) == ["all"]):
        return [n for n in sorted(METRICS) if METRICS[n].in_all and METRICS[n].applies_to(dataset)]
    names = parse_names(value, METRICS, "metric")
    for n in names:
        if not METRICS[n].applies_to(dataset):
            raise VitlensError(f"metric {n!r} does not apply to this data set (it needs {', '.join(METRICS[n].needs)})")
    return names


def parse_options(items: Sequence[str]) -> dict[str, dict]:
    """``["deletion.fill=blur", "rollout.residual=false"]`` → ``{"deletion": {"fill": "blur"}, …}``."""
    options: dict[str, dict] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not (dot and eq and name and key):
            raise VitlensError(f"bad option {item!r}: expected NAME.KEY=VALUE, e.g. deletion.fill=blur")
        if key in options.get(name, {}):
            raise VitlensError(f"option {name}.{key} given twice")
        options.setdefault(name, {})[key] = parse_finite(value, f"option {item!r}")
    return options


def collate_batch(samples: list[dict]) -> dict:
    """:func:`vitlens.data.collate` plus fashion-grid's ``sources`` (the canvases of the cells)."""
    batch = collate(samples)
    good = [s for s in samples if "error" not in s]
    if good and "sources" in good[0]:
        batch["sources"] = torch.stack([s["sources"] for s in good])
    return batch


def fit_to(batch: dict, size: tuple[int, int]) -> dict:
    """Resize images (bilinear), masks (nearest) and boxes / cells (scaled and floored, as wsolevaluation's
    ``resize_bbox``) to the model's input ``size``."""
    h, w = batch["image"].shape[-2:]
    if (h, w) == tuple(size):
        return batch
    sx, sy = size[1] / w, size[0] / h
    scale = torch.tensor([sx, sy, sx, sy])

    def boxes(b: torch.Tensor) -> torch.Tensor:
        return (b.double() * scale.double()).floor().float()

    out = dict(batch)
    out["image"] = resize(batch["image"], size)
    out["mask"] = F.interpolate(batch["mask"][:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    if "ignore" in batch:
        out["ignore"] = F.interpolate(batch["ignore"][:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    out["boxes"] = [boxes(b) for b in batch["boxes"]]
    if "cells" in batch:
        out["cells"] = boxes(batch["cells"])
    return out


def evaluate(
    model: str | os.PathLike | Backbone,
    methods: str | Sequence[str],
    metrics: str | Sequence[str] = "all",
    data: str = "fashion-canvas:test",
    *,
    limit: int | None = None,
    batch_size: int = 32,
    target: str = "label",
    options: dict[str, dict] | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    gallery: int = 8,
    protocol: str | None = None,
    replicates: int = 1000,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every_s: float = 30.0,
) -> dict | None:
    """Score ``methods`` with ``metrics`` on ``data``; returns the summary on the main process, ``None`` on
    the others.

    Summary: ``{"model", "data", "n", "accuracy", "results": {method: {key: value}}, "seconds":
    {method: s}, "used": {metric: samples}}`` (values in [0, 1]; ``None`` where a metric had no sample).
    ``out`` writes the summary plus ``per_image`` values, the evaluated ``images`` (index, label and
    predicted class of each, for per-class views), ``curves``, the ``settings``, the run's
    ``classes``, ``versions`` and ``cost`` (seconds per image of each method's maps and their ratio to
    the plain forward pass of the same batches) and a ``gallery`` of ``gallery`` evaluated images with
    every method's maps, as JSON (atomically): everything ``vitlens report`` needs. ``options`` maps a
    method or metric name to its options. ``protocol`` (e.g. ``wsol``, ``bcos``) sets the ``protocol``
    option of every chosen metric that has a protocol of that name (an explicit option wins); it is an
    error when none has.

    Uncertainty (:mod:`vitlens.metrics.uncertainty`): ``replicates`` bootstrap resamples of the images
    (seeded by ``seed``, the same for every method: paired) give ``intervals`` ``{method: {key: [lo,
    hi]}}`` (95 %) and ``best`` ``{key: {"best": [methods], "significant": bool, "versus": …}}``: the
    best method and those not significantly different from it. ``replicates=0`` skips both.

    Args:
        model: anything :func:`vitlens.load_model` accepts.
        methods: method names, as a list or ``"pm,gae"``.
        metrics: metric names, or ``"all"`` for every metric that applies to ``data``.
        data: a data spec (``"fashion-canvas:test"``, ``"folder:/data/birds:test"``).
        limit: evaluate the first ``limit`` samples only.
        batch_size: images per forward pass.
        target: the class the maps explain: ``"label"`` (the ground truth) or ``"predicted"``.
        options: ``{method or metric name: {option: value}}``, e.g. ``{"deletion": {"fill": "blur"}}``.
        device: ``"cpu"`` or ``"cuda"`` (default: cuda when available).
        out: write the full results (JSON) to this file.
        progress: show a progress bar.
        gallery: images (with every method's maps) kept in ``out`` for the report.
        protocol: a reference protocol for every chosen metric that has it (``wsol``, ``bcos``, ``rise``,
            ``chefer``).
        replicates: bootstrap resamples for the intervals (0: none).
        seed: seed of the bootstrap.
        resume: continue the interrupted run that was writing ``out`` (same settings), from the state it
            saved at its last batch boundary (:mod:`vitlens.metrics.progress`).
        checkpoint_every_s: with ``out``, save the state for ``resume`` at most this often (seconds).

    Returns:
        The summary on the main process, ``None`` on the others.
    """
    if target not in TARGETS:
        raise VitlensError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise VitlensError("batch size and limit must be at least 1")
    if out is not None:
        check_output_file(out, "output file")
    if gallery < 0:
        raise VitlensError(f"gallery must be 0 or more images, got {gallery}")
    if replicates < 0:
        raise VitlensError(f"bootstrap replicates must be 0 or more, got {replicates}")
    if resume and out is None:
        raise VitlensError("--resume continues an evaluation that writes --out: give the same --out")
    joined = dist.is_initialized()
    d = setup(device)
    try:
        return _evaluate(
            model, methods, metrics, data, limit, batch_size, target, options or {}, d, out, progress, gallery,
            protocol, (replicates, seed), (resume, checkpoint_every_s),
        )  # fmt: skip
    finally:
        if not joined:
            teardown()


def _evaluate(
    model, methods, metrics, data, limit, batch_size, target, options, d, out, progress, gallery, protocol, boot,
    saving,
):  # fmt: skip
    backbone = load_model(model).to(d.device)
    was_training = backbone.training
    backbone.eval()
    try:
        return _run(
            backbone, model, methods, metrics, data, limit, batch_size, target, options, d, out, progress, gallery,
            protocol, boot, saving,
        )  # fmt: skip
    finally:
        backbone.train(was_training)


def _run(
    backbone, model, methods, metrics, data, limit, batch_size, target, options, d, out, progress, gallery, protocol,
    boot, saving,
):  # fmt: skip
    size = backbone.preprocessing.input_size
    spec = parse_data_spec(data) if isinstance(data, str) else data
    dataset = open_dataset(spec, size=size)
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) > backbone.num_classes:  # labels the model has no output for
        raise VitlensError(f"{spec}: the data has {len(classes)} classes, but the model has {backbone.num_classes} "
                           "outputs")  # fmt: skip
    method_list = parse_names(methods, EXPLAINERS, "method")
    metric_list = metric_names(metrics, dataset)
    for name in options:
        if name not in method_list and name not in metric_list:
            raise VitlensError(f"options given for {name!r}, which is not among the chosen methods and metrics")
    options = apply_protocol(protocol, metric_list, options)
    explainers = {m: get_explainer(m, backbone, **options.get(m, {})) for m in method_list}
    scores = {m: {k: get_metric(k, **options.get(k, {})) for k in metric_list} for m in method_list}
    for per_method in scores.values():
        for metric in per_method.values():
            metric.setup(backbone, dataset)

    n = len(dataset) if limit is None else min(limit, len(dataset))
    indices = list(range(d.rank, n, d.world))
    run = {
        "seconds": dict.fromkeys(method_list, 0.0),
        "explain_seconds": dict.fromkeys(["forward", *method_list], 0.0),  # the maps alone, and the plain forward
        "batch_ratios": {m: [] for m in method_list},  # each timed batch's maps time / its forward time
        "timed": 0,  # images in those times: the first batch (lazy initialisation) is left out when there are more
        "counts": torch.zeros(2, dtype=torch.float64),
        "several_objects": False,  # multi-object samples (fashion-grid): one label per image is not the answer
        "skipped": [],  # samples that could not be read (folder data): left out, reported
        "seen": [],  # (index, label, predicted) of every evaluated image, for per-class views
    }
    resume, every = saving
    signature = {"model": str(model), "methods": method_list, "metrics": metric_list, "data": str(spec), "n": n,
                 "batch_size": batch_size, "target": target, "options": json.loads(json.dumps(options, default=str)),
                 "world": d.world, "rank": d.rank}  # fmt: skip
    done = 0
    if resume:
        done, saved, states = progress_state.load(out, d.rank, signature)
        run.update(saved)
        for m, per in scores.items():
            for k, metric in per.items():
                progress_state.restore(metric, (states.get(m) or {}).get(k, {}), f"{out} (resumed state)")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices[done * batch_size :]), batch_size=batch_size, collate_fn=collate_batch
    )
    seconds, explain_seconds, counts = run["seconds"], run["explain_seconds"], run["counts"]
    skipped, seen = run["skipped"], run["seen"]
    from tqdm import tqdm

    bar = tqdm(total=len(indices), desc="evaluate", unit="img", file=sys.stderr, disable=not (progress and d.main))
    bar.update(min(done * batch_size, len(indices)))
    last_save = time.monotonic()
    for step, raw in enumerate(loader, done):
        skipped.extend(raw["errors"])
        if "image" not in raw:
            continue
        b = fit_to(raw, size)
        images = b["image"].to(d.device)
        clock = step > 0 or len(loader) == 1
        start = time.perf_counter()
        with torch.no_grad():
            logits = backbone(images)
        forward_time = time.perf_counter() - start
        if clock:
            explain_seconds["forward"] += forward_time
            run["timed"] += len(images)
        labels = b["label"]
        seen += [
            list(s) for s in zip(b["index"].tolist(), labels.tolist(), logits.argmax(1).cpu().tolist(), strict=True)
        ]
        run["several_objects"] = run["several_objects"] or "labels" in b
        counts += torch.tensor([(logits.argmax(1).cpu() == labels).sum().item(), len(labels)], dtype=torch.float64)
        targets = labels if target == "label" else logits.argmax(1).cpu()
        extra = {k: b[k] for k in ("labels", "cells", "sources") if k in b}
        extra["dataset"] = dataset
        shared: dict = {}
        for m, explainer in explainers.items():
            start = time.perf_counter()
            maps = explainer(images, targets.to(d.device)).maps
            if clock:
                explain_seconds[m] += time.perf_counter() - start
                run["batch_ratios"][m].append((time.perf_counter() - start) / max(forward_time, 1e-9))
            batch = Batch(
                images=images, labels=labels, targets=targets, index=b["index"], boxes=b["boxes"], masks=b["mask"],
                has_mask=b["has_mask"], logits=logits, model=backbone, explainer=explainer, extra=extra,
                shared=shared, ignore=b.get("ignore"),
            )  # fmt: skip
            for metric in scores[m].values():
                metric.update(batch, maps)
            seconds[m] += time.perf_counter() - start
        bar.update(len(images))
        if out is not None and time.monotonic() - last_save >= every:
            progress_state.save(out, d.rank, signature, step + 1, run, scores)
            last_save = time.monotonic()
    bar.close()
    timed, several_objects = run["timed"], run["several_objects"]
    seen = [tuple(s) for s in seen]

    correct, total = all_reduce_sum(counts.to(d.device)).cpu().tolist()
    batch_ratios = run["batch_ratios"]
    if dist.is_initialized():
        parts: list = [None] * d.world
        dist.all_gather_object(parts, batch_ratios)
        batch_ratios = {m: [r for part in parts for r in part[m]] for m in method_list}
        dist.all_gather_object(parts, skipped)
        skipped = sorted((s for part in parts for s in part), key=lambda s: s["index"])
        dist.all_gather_object(parts, seen)
        seen = [s for part in parts for s in part]
    seen.sort()
    elapsed = torch.tensor([seconds[m] for m in method_list], dtype=torch.float64, device=d.device)
    explain_elapsed = torch.tensor([*explain_seconds.values(), timed], dtype=torch.float64, device=d.device)
    if dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        dist.all_reduce(explain_elapsed)
    for per_method in scores.values():
        for metric in per_method.values():
            metric.finish()
    if not d.main:
        if out is not None:
            progress_state.remove(out, d.rank)
        return None
    first = scores[method_list[0]]
    summary = {
        "model": os.fspath(model) if isinstance(model, str | os.PathLike) else type(model).__name__,
        "data": data if isinstance(data, str) else str(spec),
        "n": int(total),
        "accuracy": correct / total if total and not several_objects else None,  # one label per image only
        "results": {m: {k: v for metric in scores[m].values() for k, v in metric.result().items()} for m in scores},
        "seconds": {m: round(s, 3) for m, s in zip(method_list, elapsed.cpu().tolist(), strict=True)},
        "used": {k: first[k].used for k in metric_list},
        "skipped": skipped,
    }
    intervals, samples = bootstrap(scores, replicates=boot[0], seed=boot[1])
    directions = {key: first[k].direction(key) for k in metric_list for key in first[k].result()}
    summary["intervals"] = intervals
    summary["best"] = best_methods(summary["results"], samples, directions) if boot[0] else {}
    summary["bootstrap"] = {"replicates": boot[0], "seed": boot[1], "level": LEVEL, "unit": "image"}
    if out is not None:
        shown = collate_batch([dataset[i] for i in pick_indices(dataset, gallery, n)]) if gallery else {}
        pictures = gallery_payload(backbone, explainers, fit_to(shown, size), target) if "image" in shown else None
        seconds_each = (explain_elapsed[:-1] / explain_elapsed[-1].clamp(min=1)).cpu().tolist()
        per_image = dict(zip(explain_seconds, seconds_each, strict=True))
        atomic_write_json(
            out,
            {
                **summary,
                "format": "vitlens-results",
                "classes": list(backbone.classes),
                "versions": versions(),
                "device": device_name(d.device),
                "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "cost": {
                    "forward_seconds_per_image": per_image["forward"],
                    "methods": {
                        m: {
                            "seconds_per_image": per_image[m],
                            "ratio_to_forward": per_image[m] / per_image["forward"] if per_image["forward"] else None,
                            **ratio_spread(batch_ratios[m]),
                        }
                        for m in method_list
                    },
                },
                "gallery": pictures,
                "settings": {
                    "target": target,
                    "batch_size": batch_size,
                    "limit": limit,
                    "gallery": gallery,
                    "world_size": d.world,
                    "methods": {m: explainers[m].settings for m in method_list},
                    "metrics": {k: first[k].settings for k in metric_list},
                },
                "curves": {m: {k: metric.curves() for k, metric in scores[m].items()} for m in scores},
                "per_image": {m: {k: metric.per_image() for k, metric in scores[m].items()} for m in scores},
                "images": {key: [s[i] for s in seen] for i, key in enumerate(("index", "label", "predicted"))},
            },
        )
        progress_state.remove(out, d.rank)  # finished: nothing left to resume
    return summary


def ratio_spread(ratios: list[float]) -> dict:
    """The noise of a cost ratio: the 10th–90th percentile of the per-batch ratios and their count."""
    if len(ratios) < 2:
        return {"batches": len(ratios)}
    lo, hi = np.percentile(ratios, [10, 90]).tolist()
    return {"ratio_p10_p90": [lo, hi], "batches": len(ratios)}


def apply_protocol(protocol: str | None, metric_list: list[str], options: dict[str, dict]) -> dict[str, dict]:
    """``options`` with ``protocol`` set on every metric of ``metric_list`` that follows it (explicit options
    win); a one-line error when no chosen metric has a protocol of that name."""
    if protocol is None:
        return options
    takers = [k for k in metric_list if protocol in METRICS[k].protocols]
    if not takers:
        known = sorted({p for k in metric_list for p in METRICS[k].protocols})
        raise VitlensError(
            f"no chosen metric follows protocol {protocol!r} (their protocols: {', '.join(known) or 'none'})"
        )
    out = {k: dict(v) for k, v in options.items()}
    for k in takers:
        out.setdefault(k, {}).setdefault("protocol", protocol)
    return out


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries a result depends on."""
    import contextlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("vitlens", "torch", "timm", "transformers", "torchvision"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def format_table(summary: dict) -> str:
    """The summary as a plain-text table: one row per metric value (↑ higher / ↓ lower is better), one
    column per method, the samples each metric used, and the seconds per method. Where the summary has
    bootstrap intervals each value carries its 95 % interval ``[lo, hi]``; ``*`` marks the best method when
    its paired difference to every other method is significant, ``=`` the methods tied for best."""
    methods = list(summary["results"])
    keys = list(dict.fromkeys(k for m in methods for k in summary["results"][m]))
    used = summary.get("used", {})
    intervals = summary.get("intervals", {})
    best = summary.get("best", {})

    def label(key: str) -> str:
        base = key.split("/")[0]
        if base not in METRICS:
            return key
        sign = METRICS[base]().direction(key)  # 0: not ranked (a verdict, a signed correlation, a share)
        return f"{key} {'↑' if sign > 0 else '↓'}" if sign else key

    def number(v) -> str:
        return "—" if v is None else f"{v:.4f}"

    def cell(method: str, key: str) -> str:
        v = summary["results"][method].get(key)
        text = number(v)
        ci = intervals.get(method, {}).get(key)
        if v is not None and ci:
            text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        mark = best.get(key)
        if mark and method in mark["best"]:
            return text + (" *" if mark["significant"] else " =")
        return text + ("  " if best else "")

    acc = summary.get("accuracy")
    head = [
        f"model:    {summary['model']}",
        f"data:     {summary['data']}  (n = {summary['n']}, accuracy {number(acc)})",
        "",
    ]
    rows = [["metric", "n", *methods]]
    rows += [[label(k), str(used.get(k.split("/")[0], "")), *(cell(m, k) for m in methods)] for k in keys]
    rows.append(["seconds", "", *(f"{summary['seconds'][m]:.2f}" + ("  " if best else "") for m in methods)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows
    ]
    boot = summary.get("bootstrap", {})
    if any(intervals.values()):
        lines += [
            "",
            f"[lo, hi]: {round(100 * boot.get('level', 0.95))}% bootstrap interval over images "
            f"({boot.get('replicates')} replicates, paired between methods, seed {boot.get('seed')})",
        ]
    if best:
        lines.append("*: best, significantly better than every other method (paired);  =: tied for best")
    return "\n".join(head + lines)
