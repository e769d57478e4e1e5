"""Training entry points; each builds a :class:`Task` and hands it to the one loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone, adapt
from ..backbones.presets import PRESETS, build_preset
from ..data import DataSpec, collate, open_dataset, parse_data_spec
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
    "train_diffmask",
    "train_pm",
]

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
    eval_data: str | None = None, init: str | None = None, overwrite: bool = False,
) -> dict:  # fmt: skip
    """``vitlens train classifier``: train a classifier on ``data`` and report held-out accuracy.

    Args:
        data: a data spec, e.g. ``"fashion-canvas:train"`` or ``"folder:/data/birds:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
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
    held_out = _held_out(spec, eval_data)
    provenance = {
        "command": _command(),
        "data": str(spec),
        "eval_data": str(held_out),
        "arch": backbone.spec.get("name"),
    }
    if init is not None:
        provenance["init"] = {"model": str(init), "training": (backbone.config or {}).get("training", {})}
    elif resume:  # keep the original run's provenance
        provenance = {k: v for k, v in backbone.config["training"].items() if k in (*provenance, "init")}
    task = ClassifierTask(backbone)
    return train(task, dataset, out, cfg, resume=resume, provenance=provenance, evaluate=_test_accuracy(held_out),
                 overwrite=overwrite)  # fmt: skip


def _labels(dataset, indices: list[int]) -> set[int]:
    """The classes of some images: from the data set's ``label(i)`` when it has one, else by reading them."""
    if hasattr(dataset, "label"):
        return {int(dataset.label(i)) for i in indices}
    return {int(s["label"]) for s in map(dataset.__getitem__, indices) if "error" not in s}


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


def train_pm(
    model,
    data: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    mask_fraction: float | None = None,
    lam: float | None = None,
    pos_weight: float | None = None,
    mask_batch: int | None = None,
    composites: int | None = None,
    pseudo_rounds: int | None = None,
    negatives: bool | None = None,
    resume: bool = False,
    eval_data: str | None = None,
    overwrite: bool = False,
    classes_from_prompts: bool = False,
    log=None,
) -> dict:
    """``vitlens train pm``: PM fine-tuning of a classifier; reports accuracy before and after.

    Only images that carry a mask or a box are supervised: all of them, or ``mask_fraction`` of the
    training set drawn from them. Every setting left ``None`` (here and in ``cfg``: ``batch_size``,
    ``lr``, ``warmup_steps``, ``max_steps`` with ``epochs``) comes from the best fashion-canvas recipe,
    scaled to the data set (:func:`vitlens.training.pm.pm_settings`); what was chosen and why goes to
    ``log`` (default: stderr, on the main process).

    Args:
        model (str | PathLike): the classifier to fine-tune (URI, ``vitlens:NAME`` or checkpoint directory).
        data: a data spec whose images carry masks or boxes, e.g. ``"folder:/data/birds:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
        mask_fraction: share of the training set supervised with its mask or box (default: every image
            that has one).
        lam: weight of the patch-level BCE.
        pos_weight: weight of positive (object) patch targets.
        mask_batch: masked images in every batch (they replace ordinary ones).
        composites: 2×2 composites of masked images in every batch (class separation).
        pseudo_rounds: self-training rounds with pseudo-masks.
        negatives: train every ordinary image's patches towards 0 for every class but its label.
        resume: continue the interrupted run in ``out``.
        eval_data: held-out data spec (default: the test split of ``data``).
        overwrite: replace a model already in ``out`` instead of refusing.
        classes_from_prompts: ``model`` is an image–text model (CLIP, SigLIP): its zero-shot classifier over
            the data's class names is the classifier PM fine-tunes (:func:`prompt_classes`).
        log (Callable[[str], None] | None): where the chosen settings are reported (one line each).

    Returns:
        The run's summary (training seconds, held-out accuracy), also stored in the checkpoint.

    Raises:
        VitlensError: no image of ``data`` carries a mask or a box and no pseudo-mask rounds were asked for.
    """
    from dataclasses import replace

    from ..models import load_model
    from ..models.checkpoint import load_checkpoint
    from .pm import check_pm_settings, describe_pool, labelled_indices, pm_settings, select_mask_indices

    if log is None:
        main = int(os.environ.get("RANK", "0")) == 0

        def log(line: str) -> None:
            if main:
                print(f"vitlens: pm: {line}", file=sys.stderr, flush=True)

    spec = parse_data_spec(data, default_split="train")
    held_out = _held_out(spec, eval_data)
    check_pm_settings(mask_fraction, composites)
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out, kind="pm")
        before = backbone.config["training"].get("accuracy_before")
        source = backbone.config["training"].get("base_model")
    else:
        backbone = load_model(model)
        if backbone.spec is None:
            raise VitlensError("PM fine-tuning needs a model loaded from a URI or a vitlens checkpoint")
        before, source = None, str(model)
    dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    if classes_from_prompts and not resume:
        backbone = prompt_classes(backbone, dataset)
    labelled = labelled_indices(dataset)
    if not labelled and not pseudo_rounds:
        raise VitlensError(
            f"{spec}: no training image carries a mask or a box (folder data: boxes in localization.txt or "
            "masks/); PM needs some, or pass --pseudo-masks ROUNDS to train from pseudo-masks alone"
        )
    used = select_mask_indices(labelled, mask_fraction, cfg.seed, n=len(dataset))
    log(describe_pool(len(dataset), len(labelled), len(used), mask_fraction))
    classes_used = len(_labels(dataset, used[:2000]))
    given = {"batch_size": cfg.batch_size, "max_steps": cfg.max_steps, "epochs": cfg.epochs, "lr": cfg.lr,
             "warmup_steps": cfg.warmup_steps, "lam": lam, "pos_weight": pos_weight, "mask_batch": mask_batch,
             "composites": composites, "pseudo_rounds": pseudo_rounds, "negatives": negatives}  # fmt: skip
    settings, why = pm_settings(len(dataset), len(used), classes_used, given)
    if why:
        log("chosen (the best fashion-canvas recipe, run 9 of benchmarks/pm.md, scaled; flags override): "
            + "; ".join(why))  # fmt: skip
    cfg = replace(cfg, **{k: settings[k] for k in ("batch_size", "max_steps", "epochs", "lr", "warmup_steps")})
    if before is None:
        test = open_dataset(held_out, size=backbone.preprocessing.input_size)
        before = round(accuracy(backbone.to(cfg.device or "cpu"), test), 4)
    task = PMTask(
        backbone, dataset, mask_fraction=mask_fraction, labelled=labelled, lam=settings["lam"],
        pos_weight=settings["pos_weight"], mask_batch=settings["mask_batch"], composites=settings["composites"],
        pseudo_rounds=settings["pseudo_rounds"], negatives=settings["negatives"], seed=cfg.seed,
        total_steps=cfg.total_steps(len(dataset), int(os.environ.get("WORLD_SIZE", "1"))),
    )  # fmt: skip
    provenance = {"command": _command(), "data": str(spec), "eval_data": str(held_out), "base_model": source,
                  "accuracy_before": before}  # fmt: skip
    return train(task, dataset, out, cfg, resume=resume, provenance=provenance, evaluate=_test_accuracy(held_out),
                 overwrite=overwrite)  # fmt: skip


def train_diffmask(
    model,
    data: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    kl_margin: float = 0.1,
    multiplier_lr: float = 0.3,
    resume: bool = False,
    overwrite: bool = False,
    classes_from_prompts: bool = False,
) -> dict:
    """``vitlens train diffmask``: DiffMask gates for a frozen classifier.

    The checkpoint holds the classifier unchanged plus the gates, so it loads as the classifier with
    the ``diffmask`` explainer attached.

    Args:
        model (str | PathLike): the frozen classifier (URI, ``vitlens:NAME`` or checkpoint directory).
        data: a data spec, e.g. ``"counting:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
        kl_margin: KL(p_orig || p_masked) allowed, in nats.
        multiplier_lr: learning rate of the Lagrange multipliers.
        resume: continue the interrupted run in ``out``.
        overwrite: replace a model already in ``out`` instead of refusing.
        classes_from_prompts: ``model`` is an image–text model (CLIP, SigLIP): its zero-shot classifier over
            the data's class names is the classifier (:func:`prompt_classes`).

    Returns:
        The run's summary (training seconds, held-out KL and share within the margin).
    """
    from ..explainers.diffmask import DiffMaskGates
    from ..models import load_model
    from ..models.checkpoint import load_checkpoint
    from .diffmask import DiffMaskTask

    spec = parse_data_spec(data, default_split="train")
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out, kind="diffmask")
        task = DiffMaskTask(
            backbone, kl_margin=kl_margin, multiplier_lr=multiplier_lr, gates=DiffMaskGates.from_checkpoint(backbone)
        )
        source = backbone.config["training"].get("base_model")
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    else:
        backbone = load_model(model)
        if backbone.spec is None:
            raise VitlensError("DiffMask needs a model loaded from a URI or a vitlens checkpoint")
        if (backbone.config or {}).get("kind") == "diffmask":
            raise VitlensError(f"{model} is already a DiffMask checkpoint; pass the classifier it was trained on")
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
        if classes_from_prompts:
            backbone = prompt_classes(backbone, dataset)
        task = DiffMaskTask(backbone, kl_margin=kl_margin, multiplier_lr=multiplier_lr, seed=cfg.seed)
        source = str(model)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    provenance = {"command": _command(), "data": str(spec), "base_model": source}

    def evaluate(bb, d):
        test = open_dataset(_held_out(spec, None), size=bb.preprocessing.input_size)
        images = collate([test[i] for i in range(min(256, len(test)))])["image"].to(bb.mean.device)
        kl = task.masked_kl(images)
        frozen = all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
        if not frozen:
            raise RuntimeError("DiffMask training changed the frozen classifier")  # a bug, never a user error
        return {
            "held_out_kl": round(kl.mean().item(), 4),
            "held_out_within_margin": round((kl <= kl_margin).float().mean().item(), 4),
        }

    return train(task, dataset, out, cfg, resume=resume, provenance=provenance, evaluate=evaluate, overwrite=overwrite)
