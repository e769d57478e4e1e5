"""Training entry points; each builds a :class:`Task` and hands it to the one loop."""

from __future__ import annotations

import sys
from pathlib import Path

from ..backbones import Backbone, adapt
from ..backbones.presets import PRESETS, build_preset
from ..data import DataSpec, open_dataset, parse_data_spec
from ..errors import VitlensError
from .classifier import ClassifierTask, accuracy
from .loop import Task, TrainConfig, check_resumable, train

__all__ = ["ClassifierTask", "Task", "TrainConfig", "accuracy", "build_classifier", "train", "train_classifier"]

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
    held_out = parse_data_spec(eval_data) if eval_data else DataSpec(spec.name, "test", spec.options, spec.root)
    provenance = {"command": "vitlens " + " ".join(sys.argv[1:]) if sys.argv else "", "data": str(spec),
                  "eval_data": str(held_out), "arch": backbone.spec.get("name")}  # fmt: skip

    def evaluate(bb, d):
        try:
            test = open_dataset(held_out, size=bb.preprocessing.input_size)
        except VitlensError:
            return {}
        return {"test_accuracy": round(accuracy(bb, test, d), 4), "test_n": len(test)}

    return train(ClassifierTask(backbone), dataset, out, cfg, resume=resume, provenance=provenance, evaluate=evaluate)
