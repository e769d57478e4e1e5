"""Training a classifier from scratch or fine-tuning one: cross-entropy with label smoothing."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import Backbone, adapt
from ..backbones.presets import PRESETS, build_preset
from ..data import DataSpec, collate, open_dataset, parse_data_spec
from ..errors import VitlensError
from .augment import flip_shift
from .distributed import Dist, all_reduce_sum
from .loop import Task, TrainConfig, check_resumable, held_out_spec, provenance, train


class ClassifierTask(Task):
    kind = "classifier"

    def __init__(self, backbone, label_smoothing: float = 0.1, augment: bool = True):
        super().__init__(backbone)
        self.label_smoothing, self.augment = label_smoothing, augment

    def loss(self, module, batch, step):
        images = batch["image"]
        if self.augment:
            images, _ = flip_shift(images)
        logits = module(images)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return loss, {"train_acc": acc.item()}


@torch.no_grad()
def accuracy(backbone, dataset, d: Dist | None = None, batch_size: int = 256) -> float:
    """Top-1 accuracy over ``dataset``, sharded across torchrun processes and reduced."""
    rank, world = (d.rank, d.world) if d is not None else (0, 1)
    device = next(backbone.parameters()).device
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, collate_fn=collate
    )
    was_training = backbone.training
    backbone.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        pred = backbone(batch["image"].to(device)).argmax(1).cpu()
        counts += torch.tensor([(pred == batch["label"]).sum().item(), len(pred)], dtype=torch.float64)
    backbone.train(was_training)
    correct, n = all_reduce_sum(counts.to(device)).cpu().tolist()
    return correct / max(1.0, n)


DEFAULT_ARCH = {"fashion-canvas": "fashion-vit", "fashion-grid": "fashion-vit", "counting": "counting-vit",
                "shapes": "fashion-vit"}  # fmt: skip


def folder_input_size(dataset, sample: int = 32) -> int:
    """The input side for folder data: the median shorter side of the first ``sample`` readable images,
    rounded to a multiple of 8 (the ``fashion-vit`` stem's stride) and kept within 32..224 pixels."""
    from PIL import Image

    sides = []
    for rel, _ in dataset.files[:sample]:
        try:
            with Image.open(dataset.root / rel) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    side = int(np.median(sides)) if sides else 64
    return int(min(224, max(32, round(side / 8) * 8)))


def build_classifier(arch: str | None, spec: DataSpec, dataset) -> Backbone:
    """A fresh model for ``dataset``: a vitlens preset or any timm architecture name (random weights).

    Without ``arch``: the data set's own preset, or for folder data the ``fashion-vit`` design (conv stem of
    stride 8, dim 128, 4 blocks) at an input size sized to the images (:func:`folder_input_size`).
    """
    overrides = {}
    if arch is None and spec.name == "folder":
        arch, overrides = "fashion-vit", {"img_size": folder_input_size(dataset)}
        print(f"vitlens: no --arch: training fashion-vit at {overrides['img_size']} px for this folder data "
              "(its median image side)", file=sys.stderr)  # fmt: skip
    arch = arch or DEFAULT_ARCH.get(spec.name)
    if arch is None:
        raise VitlensError(f"--arch is required for {spec.name} data (presets: {', '.join(PRESETS)}, or a timm name)")
    classes = list(dataset.classes)
    if arch in PRESETS:
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


def held_out_accuracy(held_out: DataSpec):
    """The loop's end-of-run evaluation: top-1 accuracy on the held-out split (sharded)."""

    def evaluate(bb, d):
        try:
            test = open_dataset(held_out, size=bb.preprocessing.input_size)
        except VitlensError:
            return {}
        return {"test_accuracy": round(accuracy(bb, test, d), 4), "test_n": len(test)}

    return evaluate


#: A classifier trained from scratch without ``epochs`` or ``max_steps``: this many passes over the data,
#: within these bounds on the steps (a ViT from scratch needs thousands of steps; one pass over a small
#: folder data set is a few dozen; benchmarks/pm.md: 2,500 steps on 3,000 small objects in clutter left the
#: loss still falling).
SCRATCH_EPOCHS, SCRATCH_STEPS = 100, (2000, 10000)


def scratch_steps(n_images: int, images_per_step: int) -> int:
    """The default length of a classifier trained from scratch, in steps.

    Examples:
        >>> scratch_steps(1400, 64), scratch_steps(3000, 64), scratch_steps(60000, 64)
        (2100, 4600, 10000)
    """
    per_epoch = max(1, n_images // images_per_step)
    return min(SCRATCH_STEPS[1], max(SCRATCH_STEPS[0], SCRATCH_EPOCHS * per_epoch))


def train_classifier(
    data: str, out: str | Path, cfg: TrainConfig, arch: str | None = None, resume: bool = False,
    eval_data: str | None = None, init: str | None = None, overwrite: bool = False,
) -> dict:  # fmt: skip
    """``vitlens train classifier``: train a classifier on ``data`` and report held-out accuracy.

    Args:
        data: a data spec, e.g. ``"fashion-canvas:train"`` or ``"folder:/data/birds:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings; without ``epochs`` and ``max_steps``, a classifier trained from scratch
            runs :func:`scratch_steps` steps (one epoch with ``init``).
        arch: an architecture preset or a timm model name (default: the preset of the data set, or for
            folder data a default sized to its images).
        resume: continue the interrupted run in ``out``.
        eval_data: held-out data spec (default: the test split of ``data``).
        init: start from the weights of a model (URI or checkpoint) instead of a fresh ``arch`` — a second
            stage with a fresh optimizer and schedule, recorded as such in the checkpoint.
        overwrite: replace a model already in ``out`` instead of refusing.

    Returns:
        The run's summary (training seconds, held-out accuracy), also stored in the checkpoint.
    """
    from ..models import load_model
    from ..models.checkpoint import load_checkpoint

    spec = parse_data_spec(data, default_split="train")
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out)
    elif init is not None:
        backbone = load_model(init)
        if backbone.spec is None:
            raise VitlensError("--init needs a model loaded from a URI or a vitlens checkpoint")
    else:
        torch.manual_seed(cfg.seed)  # the initial weights follow --seed too (same run, same weights)
        backbone = build_classifier(arch, spec, open_dataset(spec))
    dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    if cfg.epochs is None and cfg.max_steps is None and not resume and init is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = replace(cfg, max_steps=scratch_steps(len(dataset), cfg.batch_size * world))
        print(f"vitlens: no --epochs or --max-steps: {cfg.max_steps} steps for a classifier trained from scratch "
              f"({SCRATCH_EPOCHS} epochs of {len(dataset)} images, within {SCRATCH_STEPS[0]:,}..{SCRATCH_STEPS[1]:,} "
              "steps)", file=sys.stderr)  # fmt: skip
    held_out = held_out_spec(spec, eval_data)
    record = provenance(spec, held_out, arch=backbone.spec.get("name"))
    if init is not None:
        record["init"] = {"model": str(init), "training": (backbone.config or {}).get("training", {})}
    elif resume:  # keep the original run's provenance
        record = {k: v for k, v in backbone.config["training"].items() if k in (*record, "init")}
    task = ClassifierTask(backbone)
    return train(task, dataset, out, cfg, resume=resume, provenance=record, evaluate=held_out_accuracy(held_out),
                 overwrite=overwrite)  # fmt: skip


def prompt_classes(backbone: Backbone, dataset) -> Backbone:
    """An image–text model as a classifier of ``dataset``: :func:`vitlens.zero_shot` over its class names with
    the model's prompt templates. The class embeddings become the classifier's weights (trained with the rest).
    """
    from ..backbones.image_text import ImageTextBackbone
    from ..models.image_text import zero_shot

    if not isinstance(backbone, ImageTextBackbone):
        raise VitlensError(f"--classes-from-prompts needs an image–text model (CLIP, SigLIP), not {backbone.family}")
    classes = getattr(dataset, "classes", None)
    if not classes:
        raise VitlensError("--classes-from-prompts needs data with class names")
    return zero_shot(backbone, [str(c) for c in classes])
