"""Training entry points; each builds a :class:`Task` and hands it to the one loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..backbones import Backbone, adapt
from ..backbones.presets import PRESETS, build_preset
from ..data import DataSpec, open_dataset, parse_data_spec
from ..errors import VitlensError
from .classifier import ClassifierTask, accuracy
from .loop import Task, TrainConfig, check_resumable, train
from .pm import PMTask

__all__ = [
    "ClassifierTask",
    "PMTask",
    "Task",
    "TrainConfig",
    "accuracy",
    "build_classifier",
    "train",
    "train_classifier",
    "train_pm",
]

DEFAULT_ARCH = {"fashion-canvas": "fashion-vit", "fashion-grid": "fashion-vit", "counting": "counting-vit"}


def build_classifier(arch: str | None, spec: DataSpec, dataset) -> Backbone:
    """A fresh model for ``dataset``: a vitlens preset or any timm architecture name (random weights)."""
    arch = arch or DEFAULT_ARCH.get(spec.name)
    if arch is None:
        raise VitlensError(f"--arch is required for {spec.name} data (presets: {', '.join(PRESETS)}, or a timm name)")
    classes = list(dataset.classes)
    if arch in PRESETS:
        overrides = {}
        if spec.name == "counting":
            overrides = {"img_size": dataset.size, "patch_size": dataset.cell}
        module, prep = build_preset(arch, num_classes=len(classes), **overrides)
        backbone = adapt(module, prep, classes)
        backbone.spec = {"source": "preset", "name": arch, "kwargs": {"num_classes": len(classes), **overrides}}
        return backbone
    import timm

    if arch not in timm.list_models():
        raise VitlensError(f"unknown architecture {arch!r} (presets: {', '.join(PRESETS)}, or a timm model name)")
    size = getattr(dataset, "size", None)
    kwargs = {"num_classes": len(classes)}
    if isinstance(size, int):
        kwargs["img_size"] = size
    backbone = adapt(timm.create_model(arch, pretrained=False, **kwargs), classes=classes)
    backbone.spec = {"source": "timm", "name": arch, "kwargs": kwargs}
    return backbone


def _held_out(spec: DataSpec, eval_data: str | None) -> DataSpec:
    return parse_data_spec(eval_data) if eval_data else DataSpec(spec.name, "test", spec.options, spec.root)


def _test_accuracy(held_out: DataSpec):
    """The loop's end-of-run evaluation: top-1 accuracy on the held-out split (sharded)."""

    def evaluate(bb, d):
        try:
            test = open_dataset(held_out, size=bb.preprocessing.input_size)
        except VitlensError:
            return {}
        return {"test_accuracy": round(accuracy(bb, test, d), 4), "test_n": len(test)}

    return evaluate


def _command() -> str:
    return "vitlens " + " ".join(sys.argv[1:]) if sys.argv else ""


def train_classifier(
    data: str, out: str | Path, cfg: TrainConfig, arch: str | None = None, resume: bool = False,
    eval_data: str | None = None,
) -> dict:  # fmt: skip
    """``vitlens train classifier``: train a classifier on ``data`` and report held-out accuracy."""
    spec = parse_data_spec(data, default_split="train")
    if resume:
        from ..checkpoint import load_checkpoint

        check_resumable(out)
        backbone = load_checkpoint(out)
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    else:
        dataset = open_dataset(spec)
        backbone = build_classifier(arch, spec, dataset)
        if spec.name == "folder":
            dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    held_out = _held_out(spec, eval_data)
    provenance = {
        "command": _command(),
        "data": str(spec),
        "eval_data": str(held_out),
        "arch": backbone.spec.get("name"),
    }
    task = ClassifierTask(backbone)
    return train(task, dataset, out, cfg, resume=resume, provenance=provenance, evaluate=_test_accuracy(held_out))


def train_pm(
    model,
    data: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    mask_fraction: float = 0.01,
    lam: float = 10.0,
    pos_weight: float = 1.0,
    mask_batch: int = 8,
    pseudo_rounds: int = 0,
    resume: bool = False,
    eval_data: str | None = None,
) -> dict:
    """``vitlens train pm``: PM fine-tuning of a classifier (SPEC §3.1); reports accuracy before and after."""
    from ..backbones import load_model
    from ..checkpoint import load_checkpoint

    spec = parse_data_spec(data, default_split="train")
    held_out = _held_out(spec, eval_data)
    if not 0 < mask_fraction <= 1:
        raise VitlensError(f"--mask-fraction must be in (0, 1], got {mask_fraction}")
    if resume:
        check_resumable(out)
        backbone = load_checkpoint(out, kind="pm")
        before = backbone.config["training"].get("accuracy_before")
        source = backbone.config["training"].get("base_model")
    else:
        backbone = load_model(model)
        if backbone.spec is None:
            raise VitlensError("PM fine-tuning needs a model loaded from a URI or a vitlens checkpoint")
        before, source = None, str(model)
    dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    if before is None:
        test = open_dataset(held_out, size=backbone.preprocessing.input_size)
        before = round(accuracy(backbone.to(cfg.device or "cpu"), test), 4)
    task = PMTask(
        backbone, dataset, mask_fraction=mask_fraction, lam=lam, pos_weight=pos_weight, mask_batch=mask_batch,
        pseudo_rounds=pseudo_rounds, total_steps=cfg.total_steps(len(dataset), int(os.environ.get("WORLD_SIZE", "1"))),
        seed=cfg.seed,
    )  # fmt: skip
    provenance = {"command": _command(), "data": str(spec), "eval_data": str(held_out), "base_model": source,
                  "accuracy_before": before}  # fmt: skip
    return train(task, dataset, out, cfg, resume=resume, provenance=provenance, evaluate=_test_accuracy(held_out))
