"""The explainer contract (SPEC §1): ``explainer(images, target) -> maps [B, gh, gw]``.

One small base class in the spirit of pytorch-grad-cam's ``BaseCAM`` and captum's ``Attribution``:
target selection, model-state protection and the registry live here; a method file holds only what
is specific to its method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..backbones import Backbone, load_model
from ..errors import VitlensError

EXPLAINERS: dict[str, type[Explainer]] = {}


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator adding an explainer to the registry under ``cls.name``."""
    EXPLAINERS[cls.name] = cls
    return cls


@contextlib.contextmanager
def frozen_eval(backbone: Backbone) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards, even on error."""
    modes = [(m, m.training) for m in backbone.modules()]
    grads = [(p, p.requires_grad) for p in backbone.parameters()]
    try:
        backbone.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def check_target(target: int, num_classes: int) -> None:
    """A one-line error for a class index outside ``0 .. num_classes - 1``."""
    if not 0 <= target < num_classes:
        raise VitlensError(f"target {target} out of range: the model has {num_classes} classes (0..{num_classes - 1})")


def resolve_target(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    """``None`` → the predicted class; an int → the same class for every image; else one per image."""
    b, c = logits.shape
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(b)
    if t.numel() != b:
        raise VitlensError(f"got {t.numel()} targets for {b} images")
    if (t < 0).any() or (t >= c).any():
        raise VitlensError(
            f"target {t[(t < 0) | (t >= c)][0].item()} out of range: the model has {c} classes (0..{c - 1})"
        )
    return t


class Explainer:
    """Base class: subclasses set ``name``, ``paper``, ``cost`` and implement :meth:`explain`."""

    name: str = ""
    paper: str = ""
    cost: str = ""  # forward / backward passes per image, for ``vitlens methods``

    def __init__(self, model, **options):
        self.backbone: Backbone = load_model(model)
        unknown = set(options) - set(self.options())
        if unknown:
            known = ", ".join(self.options()) or "none"
            raise VitlensError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))} (known: {known})")
        self.settings = {**self.options(), **options}

    @classmethod
    def options(cls) -> dict:
        """Option names and their defaults."""
        return {}

    def __call__(self, images: Tensor, target: int | Sequence[int] | Tensor | None = None) -> Tensor:
        """Explain ``images`` ([B, 3, H, W] in [0, 1]) for ``target``; returns float32 ``[B, gh, gw]``."""
        images = self._check(images)
        with frozen_eval(self.backbone), torch.enable_grad():  # gradient methods work under no_grad too
            maps = self.explain(images, target)
        return maps.float()

    def explain(self, images: Tensor, target) -> Tensor:
        raise NotImplementedError

    def explain_and_predict(self, images: Tensor, target=None) -> tuple[Tensor, Tensor]:
        """(maps, logits) for ``images``: one plain forward for the logits, then the explanation.

        Methods whose explanation pass already yields the logits (PM) override it to do one pass.
        """
        images = self._check(images)
        with frozen_eval(self.backbone), torch.no_grad():
            logits = self.backbone(images)
        return self(images, resolve_target(target, logits)), logits

    def _check(self, images: Tensor) -> Tensor:
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise VitlensError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        if images.shape[0] == 0:
            raise VitlensError("got an empty batch")
        if not torch.isfinite(images).all():
            raise VitlensError("images contain NaN or Inf values")
        return images.to(self.backbone.mean.device, self.backbone.mean.dtype)


def explain(model, images: Tensor, method: str = "rollout", target=None, **options) -> Tensor:
    """``vitlens.explain``: maps ``[B, gh, gw]`` of ``method`` for ``images`` and ``target``."""
    return get_explainer(method, model, **options)(images, target)


def get_explainer(method: str, model, **options) -> Explainer:
    if method not in EXPLAINERS:
        raise VitlensError(f"unknown method {method!r} (known: {', '.join(sorted(EXPLAINERS))})")
    return EXPLAINERS[method](model, **options)
