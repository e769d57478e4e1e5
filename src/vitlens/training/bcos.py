"""Training B-cos ViTs (Böhle, Fritz, Schiele, TPAMI 2024) through the one loop.

As in the official B-cos-v2 recipe: binary cross-entropy over all classes with off-class targets ``1/C``
(one-hot targets clamped below at ``1/C``), Adam without weight decay, warm-up + cosine (the loop's
schedule), and adaptive gradient clipping (Brock et al. 2021, λ = 0.01, eps = 1e-3) instead of global
norm clipping. AGC runs inside the optimiser's ``step`` (:class:`AGCAdam`), i.e. after the backward pass
and, under torchrun, after DDP's gradient all-reduce — so the loop needs no hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import Backbone
from ..backbones.bcos_vit import BcosViT
from ..bcos.vit import ARCHS, build_bcos_vit
from ..data import DataSpec, open_dataset, parse_data_spec
from ..errors import VitlensError
from .augment import flip_shift
from .classifier import held_out_accuracy
from .loop import Task, TrainConfig, check_resumable, held_out_spec, provenance, train

DEFAULT_ARCH = {"fashion-canvas": "bcos_vit_fashion", "fashion-grid": "bcos_vit_fashion"}


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """‖·‖ per output unit (row of a linear weight, filter of a conv); the whole tensor for vectors."""
    if x.squeeze().ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[torch.Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """AGC (Brock et al., ICML 2021): scale each unit's gradient down to ``clip_factor · max(‖w‖, eps)``."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p).clamp(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(p.grad)
        clipped = p.grad * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.copy_(torch.where(grad_norm < max_norm, p.grad, clipped))


class AGCAdam(torch.optim.Adam):
    """Adam (no weight decay) that applies adaptive gradient clipping to its parameters before each step."""

    def __init__(self, params, lr: float, clip_factor: float = 0.01, eps: float = 1e-3):
        super().__init__(params, lr=lr, weight_decay=0.0)
        self.clip_factor, self.clip_eps = clip_factor, eps

    def step(self, closure=None):
        adaptive_clip_grad_((p for g in self.param_groups for p in g["params"]), self.clip_factor, self.clip_eps)
        return super().step(closure)


def bcos_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE over all classes with off-class targets ``1/C`` (B-cos-v2 ``UniformOffLabelsBCEWithLogitsLoss``)."""
    c = logits.shape[-1]
    targets = F.one_hot(labels, c).to(logits.dtype).clamp(min=1.0 / c)
    return F.binary_cross_entropy_with_logits(logits, targets)


class BcosTask(Task):
    kind = "bcos"

    def __init__(self, backbone: Backbone, augment: bool = True, clip_factor: float = 0.01):
        if not isinstance(backbone, BcosViT):
            raise VitlensError(f"B-cos training needs a B-cos ViT, not a {backbone.family} model")
        super().__init__(backbone)
        self.augment, self.clip_factor = augment, clip_factor

    def optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        params = [p for p in self.modules().parameters() if p.requires_grad]
        return AGCAdam(params, lr=cfg.lr, clip_factor=self.clip_factor)

    def loss(self, module, batch, step):
        images = batch["image"]
        if self.augment:
            images, _ = flip_shift(images)
        logits = module(images)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return bcos_loss(logits, batch["label"]), {"train_acc": acc.item()}


def build_bcos(arch: str | None, spec: DataSpec, dataset) -> BcosViT:
    """A fresh B-cos ViT for ``dataset`` (random weights), input size set to the data's."""
    arch = arch or DEFAULT_ARCH.get(spec.name)
    if arch is None:
        raise VitlensError(f"--arch is required for {spec.name} data (B-cos architectures: {', '.join(ARCHS)})")
    kwargs: dict = {"num_classes": len(dataset.classes)}
    size = getattr(dataset, "size", None)
    if isinstance(size, int):
        kwargs["img_size"] = size
    backbone = BcosViT(build_bcos_vit(arch, **kwargs), classes=list(dataset.classes))
    backbone.spec = {"source": "bcos", "name": arch, "kwargs": kwargs}
    return backbone


def train_bcos(
    data: str, out: str | Path, cfg: TrainConfig, arch: str | None = None, resume: bool = False,
    eval_data: str | None = None, overwrite: bool = False,
) -> dict:  # fmt: skip
    """``vitlens train bcos``: train a B-cos ViT on ``data`` and report held-out accuracy.

    ``cfg.weight_decay`` and ``cfg.grad_clip`` are replaced by the B-cos recipe (no weight decay, AGC).

    Args:
        data: a data spec, e.g. ``"fashion-canvas:train"`` or ``"folder:/data/birds:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
        arch: a B-cos architecture (default: the data set's own; required for folder data).
        resume: continue the interrupted run in ``out``.
        eval_data: held-out data spec (default: the test split of ``data``).
        overwrite: replace a model already in ``out`` instead of refusing.

    Returns:
        The run's summary (training seconds, held-out accuracy), also stored in the checkpoint.

    Examples:
        >>> from vitlens.training import TrainConfig, train_bcos
        >>> summary = train_bcos("fashion-canvas:train", "runs/bcos", TrainConfig(max_steps=100))  # doctest: +SKIP
    """
    from ..models.checkpoint import load_checkpoint

    cfg = dataclasses.replace(cfg, weight_decay=0.0, grad_clip=None)
    spec = parse_data_spec(data, default_split="train")
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out, kind="bcos")
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    else:
        dataset = open_dataset(spec)
        torch.manual_seed(cfg.seed)  # the initial weights follow --seed too (same run, same weights)
        backbone = build_bcos(arch, spec, dataset)
        if spec.name == "folder":
            dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    held_out = held_out_spec(spec, eval_data)
    record = provenance(spec, held_out, arch=backbone.spec.get("name"),
                        recipe="BCE with off-class targets 1/C, Adam, warm-up + cosine, AGC 0.01")  # fmt: skip
    return train(BcosTask(backbone), dataset, out, cfg, resume=resume, provenance=record,
                 evaluate=held_out_accuracy(held_out), overwrite=overwrite)  # fmt: skip
