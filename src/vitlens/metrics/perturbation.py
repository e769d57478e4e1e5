"""Faithfulness by perturbation: insertion / deletion (Petsiuk et al., RISE, BMVC 2018) and positive /
negative perturbation (Chefer, Gur, Wolf, CVPR 2021; used by Vision DiffMask).

The image is perturbed in ``K`` steps (default 16, at most one per unit) following the map's ranking
(ties in row-major order): at step ``k`` the ``c_k = round(k · U / K)`` most relevant units (whole patches
of the model's grid by default, or pixels) are replaced by the ``fill`` (deletion, positive perturbation)
or are the only ones shown on top of it (insertion). Negative perturbation removes the least relevant
first: its step ``k`` keeps the ``c_{K−k}`` most relevant units, i.e. it is the insertion curve read
backwards, and the two share their forward passes (as deletion and positive perturbation do). Every
step of a batch is one batched forward pass; a curve has ``K + 1`` points from 0 to 100 % and its area
is the trapezoid rule on [0, 1] (RISE's ``auc``).

Fills: ``mean`` (default) — each image's own per-channel mean colour: on the fashion canvases that is
close to the background, so a removed region carries no trace of the object (on them it separated
methods best, where ``blur`` leaks the item's colour blob); ``blur`` — RISE's Gaussian blur (kernel 11,
σ 5); ``zero`` — black, as Chefer et al. (0 before normalisation); ``noise`` — uniform noise, seeded by
the data-set index so every run and every process sees the same noise. The mean is no neutral colour on
the counting task: an image with many red cells has a reddish mean that the model counts, so deleting
red cells barely changes its output there; use ``fill=zero`` on it (as Chefer et al. and Vision DiffMask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import gaussian_blur, upsample
from ..errors import VitlensError
from .base import Batch, Metric, check_choice, register

FILLS = ("mean", "blur", "zero", "noise")
GRANULARITIES = ("patch", "pixel")


def fill_images(images: Tensor, fill: str, index: Tensor) -> Tensor:
    """The replacement content for ``images`` ``[B, 3, H, W]``."""
    if fill == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    if fill == "zero":
        return torch.zeros_like(images)
    if fill == "blur":
        return gaussian_blur(images, sigma=5.0, radius=5)  # RISE's evaluation blur: an 11×11 kernel, σ = 5
    noise = [torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(int(i))) for i in index.tolist()]
    return torch.stack(noise).to(images)


def unit_ranks(maps: Tensor, size: tuple[int, int], granularity: str) -> Tensor:
    """Rank of every unit ``[B, U]``, 0 = most relevant (patch or pixel units; ties in row-major order)."""
    values = maps.detach().float() if granularity == "patch" else upsample(maps.detach().float(), size)
    order = values.flatten(1).argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)


def perturbation_curves(
    model, batch: Batch, maps: Tensor, *, keep_top: bool, fill: str, granularity: str, steps: int
) -> tuple[Tensor, Tensor]:
    """Probability of the explained class and top-1 correctness ``[B, K + 1]`` when the ``c_k`` most relevant
    units are replaced by the fill (``keep_top=False``) or are the only ones kept (``keep_top=True``)."""
    images = batch.images
    h, w = batch.size
    ranks = unit_ranks(maps, (h, w), granularity).to(images.device)
    units = ranks.shape[1]
    k = min(int(steps), units)
    counts = [(2 * i * units + k) // (2 * k) for i in range(k + 1)]  # round(i · U / K), half up
    grid = maps.shape[-2:] if granularity == "patch" else (h, w)
    base = fill_images(images, fill, batch.index).to(images.device)
    targets = batch.targets.to(images.device)
    labels = batch.labels.to(images.device)
    probs, correct = [], []
    with torch.no_grad():
        for c in counts:
            top = (ranks < c).float().reshape(len(images), 1, *grid)
            top = F.interpolate(top, size=(h, w), mode="nearest") > 0.5 if granularity == "patch" else top > 0.5
            x = torch.where(top, images, base) if keep_top else torch.where(top, base, images)
            p = model(x).float().softmax(1)
            probs.append(p.gather(1, targets[:, None])[:, 0])
            correct.append((p.argmax(1) == labels).float())
    return torch.stack(probs, 1).double().cpu(), torch.stack(correct, 1).double().cpu()


def auc(curve: Tensor) -> Tensor:
    """Trapezoid area of ``[B, K + 1]`` curves over [0, 1] (RISE's normalised AUC)."""
    k = curve.shape[1] - 1
    return (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / k


class _Perturbation(Metric):
    needs = ("model",)
    keep_top = False  # the curve shows only the top units (insertion) instead of removing them (deletion)
    backwards = False  # read the curve from its end (negative perturbation)
    higher_is_better = False

    @classmethod
    def options(cls) -> dict:
        return {"fill": "mean", "granularity": "patch", "steps": 16}

    def __init__(self, **options):
        super().__init__(**options)
        check_choice(self.name, "fill", self.settings["fill"], FILLS)
        check_choice(self.name, "granularity", self.settings["granularity"], GRANULARITIES)
        if int(self.settings["steps"]) < 1:
            raise VitlensError(f"{self.name}: steps must be at least 1, got {self.settings['steps']}")
        for key in ("probability", "accuracy"):
            self.sums[key] = torch.zeros((), dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        if batch.model is None:
            raise VitlensError(f"{self.name} needs the model")
        s = self.settings
        key = ("perturbation", self.keep_top, s["fill"], s["granularity"], int(s["steps"]))
        if key not in batch.cache:  # shared by deletion / positive and by insertion / negative perturbation
            batch.cache[key] = perturbation_curves(
                batch.model, batch, maps, keep_top=self.keep_top, fill=s["fill"], granularity=s["granularity"],
                steps=int(s["steps"]),
            )  # fmt: skip
        prob, correct = batch.cache[key]
        if self.backwards:
            prob, correct = prob.flip(1), correct.flip(1)
        if "curve_probability" not in self.sums:
            self.sums["curve_probability"] = torch.zeros(prob.shape[1], dtype=torch.float64)
            self.sums["curve_accuracy"] = torch.zeros(prob.shape[1], dtype=torch.float64)
        self.add("probability", auc(prob).sum())
        self.add("accuracy", auc(correct).sum())
        self.add("curve_probability", prob.sum(0))
        self.add("curve_accuracy", correct.sum(0))
        self.add("n", len(prob))
        self.record(batch.index, probability=auc(prob), accuracy=auc(correct))

    def setup(self, model, dataset) -> None:
        # the curve length depends on the model's grid: allocate here so every process has the same states
        size = model.preprocessing.input_size
        units = model.grid_for(size) if self.settings["granularity"] == "patch" else size
        k = min(int(self.settings["steps"]), units[0] * units[1])
        self.sums["curve_probability"] = torch.zeros(k + 1, dtype=torch.float64)
        self.sums["curve_accuracy"] = torch.zeros(k + 1, dtype=torch.float64)

    def mean(self, key: str) -> float | None:
        n = self.sums["n"].item()
        return float(self.sums[key] / n) if n else None

    def curves(self) -> dict:
        n = self.sums["n"].item()
        if not n:
            return {}
        k = len(self.sums["curve_probability"]) - 1
        return {
            "fraction": [i / k for i in range(k + 1)],
            "probability": (self.sums["curve_probability"] / n).tolist(),
            "accuracy": (self.sums["curve_accuracy"] / n).tolist(),
        }


@register
class Deletion(_Perturbation):
    """Remove the most relevant units first; AUC of the explained class's probability (lower is better)."""

    name = "deletion"
    paper = "Petsiuk et al., RISE, BMVC 2018 (deletion)"

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("probability")}


@register
class Insertion(_Perturbation):
    """Reveal the most relevant units first on the fill; AUC of the probability (higher is better)."""

    name = "insertion"
    paper = "Petsiuk et al., RISE, BMVC 2018 (insertion)"
    keep_top = True
    higher_is_better = True

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("probability")}


@register
class PositivePerturbation(_Perturbation):
    """Remove the most relevant units first; AUC of the top-1 accuracy (main value) and of the
    probability of the explained class (``/probability``); lower is better."""

    name = "positive-perturbation"
    paper = "Chefer, Gur, Wolf, CVPR 2021 (positive perturbation)"

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("accuracy"), f"{self.name}/probability": self.mean("probability")}


@register
class NegativePerturbation(_Perturbation):
    """Remove the least relevant units first (ties: the last in row-major order first); AUC of the accuracy
    and of the probability (higher is better)."""

    name = "negative-perturbation"
    paper = "Chefer, Gur, Wolf, CVPR 2021 (negative perturbation)"
    keep_top = True
    backwards = True
    higher_is_better = True

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("accuracy"), f"{self.name}/probability": self.mean("probability")}
