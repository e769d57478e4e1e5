"""Faithfulness by perturbation: insertion / deletion (Petsiuk et al., RISE, BMVC 2018) and positive /
negative perturbation (Chefer, Gur, Wolf, CVPR 2021; used by Vision DiffMask).

Protocol ``vitlens`` (default). The image is perturbed in ``K`` steps (default 16, at most one per unit)
following the map's ranking (ties in row-major order): at step ``k`` the ``c_k = round(k · U / K)`` most
relevant units (whole patches of the model's grid by default, or pixels of the bilinearly upsampled map)
are replaced by the ``fill`` (deletion, positive perturbation) or are the only ones shown on top of it
(insertion). Negative perturbation removes the least relevant first: its step ``k`` keeps the
``c_{K−k}`` most relevant units, i.e. it is the insertion curve read backwards, and the two share their
forward passes (as deletion and positive perturbation do). Every step of a batch is one batched forward
pass; a curve has ``K + 1`` points from 0 to 100 % and its area is the trapezoid rule on [0, 1] (RISE's
``auc``). The probability is that of the explained class (the ``--target`` of ``vitlens evaluate``),
the accuracy is top-1 against the label. All images count. This is exactly the
``positive = deletion`` / ``negative = insertion read backwards`` pairing, so with the same fill and
steps positive perturbation's probability equals deletion and negative's equals insertion.

Protocol ``rise`` (insertion, deletion; RISE's ``evaluation.py``, ``CausalMetric``): pixels of the
bilinearly upsampled map, ``W`` pixels (one image row's worth, RISE's ``step = 224``) per step, so ``H``
steps and ``H + 1`` points; order ``np.flip(np.argsort(map))`` (ties: the last in row-major order first);
deletion fills with the data set's mean colour (RISE's ``torch.zeros_like`` on normalised images, i.e.
the model's normalisation mean, fill ``dataset-mean``), insertion starts from RISE's blur (fill
``rise-blur``: ``scipy.ndimage.gaussian_filter`` of an 11×11 delta with σ 5 — a nearly flat kernel —
convolved with zero padding in normalised space); the score is the softmax probability of the class the
model predicts on the clean image (``pred[0, c]``), whatever the map explains (use ``--target
predicted`` so the maps explain that class); AUC by the same normalised trapezoid.

Protocol ``chefer`` (positive, negative perturbation; Chefer et al.'s ``pertubation_eval_from_hdf5.py``):
pixels of the bilinearly upsampled map; at 0 %, 10 %, …, 90 % of the pixels, the ``int(H · W · f)`` most
(positive) or least (negative: the map negated) relevant pixels are set to 0 before normalisation (fill
``zero``); the score is top-1 accuracy against the label, the 0 % point the clean accuracy; the value is
``np.trapz(accuracy, x)`` over ``x = 0, 0.1, …, 0.9`` (at most 0.9; × 100 gives the figure of their
tables). Their maps explain the predicted class (``--target predicted``). ``/probability`` is the same
area for the probability of the explained class.

Protocol ``diffmask`` (positive, negative perturbation; Vision DiffMask's ``quantitative_comparison.ipynb``,
``auc_kld`` / ``auc_accuracy``): pixels of the bilinearly upsampled map; ``i = 0, s, 2s, …`` pixels removed
with ``s`` = seven patches' worth of pixels (their ``256 * num_tokens`` with ``num_tokens=7`` at patch 16),
up to all of them (their calls pass ``k=1``; the function's default ``k=0.2`` is not what their figures
use); positive perturbation keeps the ``H·W − i`` least relevant pixels, negative the ``H·W − i`` most
relevant; the removed pixels show uniform noise in ``[−1, 1]`` after normalisation from seed 123 (fill
``diffmask-noise``: ``torch.manual_seed(123); torch.rand(...) * 2 − 1``, one noise image for every image as
with their batch size 1, drawn on the CPU); the scores are, for the class predicted on the clean image,
its probability (their "accuracy" curve, the main value) and ``KL(onehot ‖ p) = −log p`` (``/kl``: their
"KL-divergence", higher is better for positive perturbation and lower for negative); each value is
``np.trapz(curve)`` with unit spacing (the area over step indices, not over [0, 1]), as their table.

Ties: RISE's ``np.argsort`` (quicksort) and Chefer et al.'s ``torch.topk`` order equal values in no
defined way; vitlens orders them deterministically as stated, so the protocols equal their reference
code exactly on maps without ties (a bilinearly upsampled patch map repeats its border values).

Fills: ``mean`` (default) — each image's own per-channel mean colour: on the fashion canvases that is
close to the background, so a removed region carries no trace of the object (it separated methods best
there, where ``blur`` leaks the item's colour blob); ``blur`` — a Gaussian blur with σ 5, radius 5 and
reflected borders (not RISE's kernel: that is ``rise-blur``); ``zero`` — black, as Chefer et al. (0
before normalisation); ``noise`` — uniform noise, seeded by the data-set index so every run and every
process sees the same noise; ``dataset-mean`` — the model's normalisation mean (0 after normalisation);
``rise-blur`` — RISE's blur, above; ``diffmask-noise`` — Vision DiffMask's noise, above. The mean is no
neutral colour on the counting task: an image with many red cells has a reddish mean that the model
counts, so deleting red cells barely changes its output there; use ``fill=zero`` on it (as Chefer et al.
and Vision DiffMask).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import Tensor

from ..backbones import gaussian_blur, upsample
from ..errors import VitlensError
from .base import Batch, Metric, check_choice, register, weighted_mean

FILLS = ("mean", "blur", "zero", "noise", "dataset-mean", "rise-blur", "diffmask-noise")
DIFFMASK_STEP_PATCHES = 7  # Vision DiffMask removes seven patches' worth of pixels per step
GRANULARITIES = ("patch", "pixel")
CHEFER_FRACTIONS = tuple(i / 10 for i in range(10))  # 0 %, 10 %, …, 90 %


@cache
def rise_kernel(size: int = 11, sigma: float = 5.0) -> Tensor:
    """RISE's ``gkern``: ``scipy.ndimage.gaussian_filter`` of a ``size``×``size`` delta (reflected borders)."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1
    return torch.from_numpy(gaussian_filter(delta, sigma).astype(np.float32))


def normalisation(model, images: Tensor) -> tuple[Tensor, Tensor]:
    """The model's normalisation mean and std ``[1, C, 1, 1]`` each (0 and 1 after normalisation)."""
    pre = getattr(model, "preprocessing", None)
    if pre is None:
        raise VitlensError("fills dataset-mean, rise-blur and diffmask-noise need a vitlens model (its normalisation)")
    return tuple(
        torch.tensor(v, dtype=images.dtype, device=images.device).view(1, -1, 1, 1) for v in (pre.mean, pre.std)
    )


def dataset_mean(model, images: Tensor) -> Tensor:
    """The model's normalisation mean ``[1, C, 1, 1]`` (what 0 is after normalisation)."""
    return normalisation(model, images)[0]


def fill_images(images: Tensor, fill: str, index: Tensor, model=None) -> Tensor:
    """The replacement content for ``images`` ``[B, 3, H, W]``."""
    if fill == "mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    if fill == "zero":
        return torch.zeros_like(images)
    if fill == "blur":
        return gaussian_blur(images, sigma=5.0, radius=5)
    if fill == "dataset-mean":
        return dataset_mean(model, images).expand_as(images)
    if fill == "rise-blur":  # RISE blurs normalised images with zero padding: blur(x − mean) + mean
        mean = dataset_mean(model, images)
        k = rise_kernel().to(images)
        c = images.shape[1]
        out = F.conv2d(images - mean, k[None, None].expand(c, 1, *k.shape), padding=k.shape[-1] // 2, groups=c)
        return out + mean
    if fill == "diffmask-noise":  # uniform in [-1, 1] after normalisation, seed 123, the same for every image
        mean, std = normalisation(model, images)
        noise = torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(123)) * 2 - 1
        return (noise.to(images) * std + mean).expand_as(images)
    noise = [torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(int(i))) for i in index.tolist()]
    return torch.stack(noise).to(images)


def unit_ranks(maps: Tensor, size: tuple[int, int], granularity: str, ties: str = "first") -> Tensor:
    """Rank of every unit ``[B, U]``, 0 = most relevant (patch or pixel units); ties in row-major order
    (``first``) or reverse row-major order (``last``: RISE's ``np.flip(np.argsort(map))``)."""
    values = maps.detach().float() if granularity == "patch" else upsample(maps.detach().float(), size)
    values = values.flatten(1)
    if ties == "last":
        order = values.argsort(dim=1, stable=True).flip(1)
    else:
        order = values.argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)


def perturbation_curves(
    model, batch: Batch, maps: Tensor, *, keep_top: bool, fill: str, granularity: str, steps: int,
    counts: list[int] | None = None, ties: str = "first", targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Probability of the explained class (or of ``targets``) and top-1 correctness ``[B, len(counts)]`` when
    the ``c`` most relevant units are replaced by the fill (``keep_top=False``) or are the only ones kept
    (``keep_top=True``), for ``c`` in ``counts`` (default ``round(k · U / K)``, ``k = 0 … K``)."""
    images = batch.images
    h, w = batch.size
    ranks = unit_ranks(maps, (h, w), granularity, ties).to(images.device)
    units = ranks.shape[1]
    if counts is None:
        k = min(int(steps), units)
        counts = [(2 * i * units + k) // (2 * k) for i in range(k + 1)]  # round(i · U / K), half up
    grid = maps.shape[-2:] if granularity == "patch" else (h, w)
    base = fill_images(images, fill, batch.index, model).to(images.device)
    targets = (batch.targets if targets is None else targets).to(images.device)
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


def trapz(curve: Tensor, x: list[float]) -> Tensor:
    """Trapezoid area of ``[B, P]`` curves over the points ``x`` (``np.trapz(curve, x)``; NumPy 2:
    ``np.trapezoid``)."""
    dx = torch.tensor(np.diff(x), dtype=torch.float64)
    return ((curve[:, 1:] + curve[:, :-1]) / 2 * dx).sum(1)


class _Perturbation(Metric):
    needs = ("model",)
    keep_top = False  # the curve shows only the top units (insertion) instead of removing them (deletion)
    backwards = False  # read the curve from its end (negative perturbation)
    main = "probability"  # the record behind the main value
    higher_is_better = False
    protocols: tuple[str, ...] = ("vitlens",)

    @classmethod
    def options(cls) -> dict:
        return {"fill": "mean", "granularity": "patch", "steps": 16, "protocol": "vitlens"}

    def __init__(self, **options):
        super().__init__(**options)
        check_choice(self.name, "fill", self.settings["fill"], FILLS)
        check_choice(self.name, "granularity", self.settings["granularity"], GRANULARITIES)
        check_choice(self.name, "protocol", self.settings["protocol"], self.protocols)
        if int(self.settings["steps"]) < 1:
            raise VitlensError(f"{self.name}: steps must be at least 1, got {self.settings['steps']}")
        if self.settings["protocol"] != "vitlens":
            fixed = [k for k in ("fill", "granularity", "steps") if self.settings[k] != self.options()[k]]
            if fixed:
                raise VitlensError(f"{self.name}: protocol={self.settings['protocol']} sets {', '.join(fixed)} itself")
        for key in ("probability", "accuracy") + (("kl",) if self.settings["protocol"] == "diffmask" else ()):
            self.sums[key] = torch.zeros((), dtype=torch.float64)

    def plan(self, size: tuple[int, int], grid: tuple[int, int], model=None) -> dict:
        """The protocol's steps for images of ``size`` with a map ``grid``: units, removal counts, x-axis, …
        (``model``: its own patch grid sets the ``diffmask`` step when the maps come at another grid)."""
        s, protocol = self.settings, self.settings["protocol"]
        h, w = size
        if protocol == "rise":  # W pixels per step: RISE's step = 224 at 224 × 224
            counts = [min(i * w, h * w) for i in range(-(-h * w // w) + 1)]
            fill = "rise-blur" if self.keep_top else "dataset-mean"
            x = [c / (h * w) for c in counts]
            return dict(granularity="pixel", counts=counts, fill=fill, ties="last", keep_top=self.keep_top,
                        flip=False, x=x, predicted=True, area="auc")  # fmt: skip
        if protocol == "chefer":  # remove int(H·W·f) pixels, the most (positive) or least (negative) relevant
            u = h * w
            removed = [int(u * f) for f in CHEFER_FRACTIONS]
            counts = [u - c for c in removed] if self.keep_top else removed
            return dict(granularity="pixel", counts=counts, fill="zero", ties="first", keep_top=self.keep_top,
                        flip=False, x=list(CHEFER_FRACTIONS), predicted=False, area="trapz")  # fmt: skip
        if protocol == "diffmask":  # seven patches' worth of pixels per step, up to all of them
            u = h * w
            gh, gw = model.grid_for(size) if hasattr(model, "grid_for") else grid
            step = DIFFMASK_STEP_PATCHES * (h // gh) * (w // gw)
            removed = list(range(0, u + 1, step))
            counts = [u - c for c in removed] if self.keep_top else removed
            return dict(granularity="pixel", counts=counts, fill="diffmask-noise", ties="first", keep_top=self.keep_top,
                        flip=False, x=[c / u for c in removed], predicted=True, area="steps", kl=True)  # fmt: skip
        units = grid if s["granularity"] == "patch" else size
        k = min(int(s["steps"]), units[0] * units[1])
        x = [i / k for i in range(k + 1)]
        return dict(granularity=s["granularity"], counts=None, fill=s["fill"], ties="first", keep_top=self.keep_top,
                    flip=self.backwards, x=x, predicted=False, area="auc", steps=k)  # fmt: skip

    def update(self, batch: Batch, maps: Tensor) -> None:
        if batch.model is None:
            raise VitlensError(f"{self.name} needs the model")
        plan = self.plan(batch.size, tuple(maps.shape[-2:]), batch.model)
        targets = None
        if plan["predicted"]:  # RISE scores the class predicted on the clean image
            if batch.logits is None:
                with torch.no_grad():
                    batch.logits = batch.model(batch.images)
            targets = batch.logits.argmax(1).cpu()
        counts = plan["counts"]
        key = ("perturbation", plan["keep_top"], plan["fill"], plan["granularity"], plan.get("steps"),
               None if counts is None else tuple(counts), plan["ties"], plan["predicted"])  # fmt: skip
        if key not in batch.cache:  # shared by deletion / positive and by insertion / negative perturbation
            batch.cache[key] = perturbation_curves(
                batch.model, batch, maps, keep_top=plan["keep_top"], fill=plan["fill"], granularity=plan["granularity"],
                steps=plan.get("steps", 1), counts=counts, ties=plan["ties"], targets=targets,
            )  # fmt: skip
        prob, correct = batch.cache[key]
        if plan["flip"]:
            prob, correct = prob.flip(1), correct.flip(1)
        area = {"auc": auc, "trapz": lambda c: trapz(c, plan["x"]), "steps": lambda c: trapz(c, range(c.shape[1]))}[
            plan["area"]
        ]
        extra = {}
        if plan.get("kl"):  # KL(onehot(predicted) ‖ p) = −log p, from the probability as their F.kl_div reads it
            extra["kl"] = area(-prob.log())
            self.add("kl", extra["kl"].sum())
        if "curve_probability" not in self.sums:
            self.sums["curve_probability"] = torch.zeros(prob.shape[1], dtype=torch.float64)
            self.sums["curve_accuracy"] = torch.zeros(prob.shape[1], dtype=torch.float64)
        self.x = plan["x"]
        self.add("probability", area(prob).sum())
        self.add("accuracy", area(correct).sum())
        self.add("curve_probability", prob.sum(0))
        self.add("curve_accuracy", correct.sum(0))
        self.add("n", len(prob))
        self.record(batch.index, probability=area(prob), accuracy=area(correct), **extra)

    def setup(self, model, dataset) -> None:
        # the curve length depends on the model's grid: allocate here so every process has the same states
        size = tuple(model.preprocessing.input_size)
        self.x = self.plan(size, tuple(model.grid_for(size)))["x"]
        self.sums["curve_probability"] = torch.zeros(len(self.x), dtype=torch.float64)
        self.sums["curve_accuracy"] = torch.zeros(len(self.x), dtype=torch.float64)

    def mean(self, key: str) -> float | None:
        n = self.sums["n"].item()
        return float(self.sums[key] / n) if n else None

    def values(self) -> dict[str, float]:
        """The metric's values: under protocol ``diffmask`` the probability area (main) and ``/kl``."""
        if self.settings["protocol"] == "diffmask":
            return {self.name: self.mean("probability"), f"{self.name}/kl": self.mean("kl")}
        return {self.name: self.mean("accuracy"), f"{self.name}/probability": self.mean("probability")}

    def direction(self, key: str) -> int:
        better = 1 if self.higher_is_better else -1
        return -better if key.endswith("/kl") else better

    def statistic(self, weights):
        out = {}
        main = "probability" if self.settings["protocol"] == "diffmask" else self.main
        for key in self.result():  # the main value's record, or the one a ``name/record`` key names
            record = key.split("/")[1] if "/" in key else main
            out[key] = weighted_mean(weights, self.records.get(record, np.zeros(0)))
        return out

    def curves(self) -> dict:
        n = self.sums["n"].item()
        if not n:
            return {}
        k = len(self.sums["curve_probability"]) - 1
        return {
            "fraction": list(getattr(self, "x", [i / k for i in range(k + 1)])),
            "probability": (self.sums["curve_probability"] / n).tolist(),
            "accuracy": (self.sums["curve_accuracy"] / n).tolist(),
        }


@register
class Deletion(_Perturbation):
    """Remove the most relevant units first; AUC of the explained class's probability (lower is better)."""

    name = "deletion"
    paper = "Petsiuk et al., RISE, BMVC 2018 (deletion)"
    protocols = ("vitlens", "rise")

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("probability")}


@register
class Insertion(_Perturbation):
    """Reveal the most relevant units first on the fill; AUC of the probability (higher is better)."""

    name = "insertion"
    paper = "Petsiuk et al., RISE, BMVC 2018 (insertion)"
    protocols = ("vitlens", "rise")
    keep_top = True
    higher_is_better = True

    def result(self) -> dict[str, float]:
        return {self.name: self.mean("probability")}


@register
class PositivePerturbation(_Perturbation):
    """Remove the most relevant units first; AUC of the top-1 accuracy (main value) and of the
    probability of the explained class (``/probability``); lower is better. Protocol ``diffmask``: the
    probability area (main) and the KL area (``/kl``, higher is better)."""

    name = "positive-perturbation"
    protocols = ("vitlens", "chefer", "diffmask")
    main = "accuracy"
    paper = "Chefer, Gur, Wolf, CVPR 2021 (positive perturbation)"

    def result(self) -> dict[str, float]:
        return self.values()


@register
class NegativePerturbation(_Perturbation):
    """Remove the least relevant units first (ties: the last in row-major order first); AUC of the accuracy
    and of the probability (higher is better). Protocol ``diffmask``: the probability area (main) and the KL
    area (``/kl``, lower is better)."""

    name = "negative-perturbation"
    protocols = ("vitlens", "chefer", "diffmask")
    main = "accuracy"
    paper = "Chefer, Gur, Wolf, CVPR 2021 (negative perturbation)"
    keep_top = True
    backwards = True
    higher_is_better = True

    def result(self) -> dict[str, float]:
        return self.values()


# --- ROAD: remove and debias (Rong et al. 2022) ---------------------------------------------------------------

ROAD_FRACTIONS = tuple(i / 10 for i in range(1, 10))  # 10 %, …, 90 % of the pixels removed
# the neighbours a removed pixel is interpolated from, with their weights (ROAD's noisy linear imputation)
ROAD_NEIGHBOURS = tuple(
    ((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
)


def linear_impute(image: Tensor, removed: Tensor) -> Tensor:
    """Fill the ``removed`` pixels ``[H, W]`` of ``image`` ``[C, H, W]`` so that each equals the weighted mean
    of its neighbours inside the image (direct neighbours 1/6, diagonal 1/12, renormalised at the border):
    one sparse linear system per image, all channels at once (Rong et al.'s linear imputation, noise-free)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = image.shape
    flat = removed.flatten().cpu().numpy()
    unknown = np.flatnonzero(flat)
    if not len(unknown):
        return image.clone()
    values = image.detach().double().cpu().numpy().reshape(c, -1)
    slot = np.full(h * w, -1)
    slot[unknown] = np.arange(len(unknown))
    y, x = np.divmod(unknown, w)
    rows, cols, weights = [], [], []
    rhs = np.zeros((len(unknown), c))
    diagonal = np.zeros(len(unknown))
    for (dy, dx), weight in ROAD_NEIGHBOURS:
        ny, nx = y + dy, x + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        j = np.where(inside, ny * w + nx, 0)
        diagonal += np.where(inside, weight, 0.0)
        free = inside & flat[j]
        rows.append(np.flatnonzero(free))
        cols.append(slot[j[free]])
        weights.append(np.full(int(free.sum()), weight))
        known = inside & ~flat[j]
        rhs[known] += weight * values[:, j[known]].T
    rows.append(np.arange(len(unknown)))
    cols.append(np.arange(len(unknown)))
    weights.append(-diagonal)
    n = len(unknown)
    a = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsc()
    solution = np.asarray(spsolve(a, -rhs)).reshape(n, c)
    out = values.copy()
    out[:, unknown] = solution.T
    return torch.from_numpy(out.reshape(c, h, w)).to(image)


def road_removed(pixels: Tensor, fraction: float, most_relevant: bool) -> Tensor:
    """The pixels ROAD removes ``[H, W]``: at ``fraction``, those at or above the ``100 · (1 − fraction)``-th
    percentile of the map (most relevant first) or of the negated map (least relevant first)."""
    values = pixels.double().cpu().numpy()
    values = values if most_relevant else -values
    return torch.from_numpy(values >= np.percentile(values, 100 * (1 - fraction)))


@register
class Road(Metric):
    """ROAD — remove and debias (Rong, Leemann, Borisov, Kasneci, Kasneci, *A Consistent and Efficient
    Evaluation Strategy for Attribution Methods*, ICML 2022; reference code tleemann/road_evaluation, as
    shipped in pytorch-grad-cam's ``ROADCombined``).

    Removed pixels are not replaced by a fill whose shape gives the removed region away (the out-of-
    distribution problem of deletion and insertion) but imputed from their surroundings: each removed pixel
    is the weighted mean of its eight neighbours (1/6 direct, 1/12 diagonal; :func:`linear_impute`), plus
    Gaussian noise of standard deviation ``noise`` (0.01) in normalised units (× the model's per-channel
    std in pixel space), seeded by the data-set index.

    Steps: the map is upsampled bilinearly to pixels; for each fraction f in 10 %, …, 90 % the most relevant
    (MoRF: pixels at or above the map's ``100 · (1 − f)``-th percentile) or the least relevant (LeRF: the
    same on the negated map) pixels are imputed; the score is the softmax probability of the explained
    class. Values: ``road`` = mean over f of ``(LeRF_f − MoRF_f) / 2`` (grad-cam's ``ROADCombined``,
    higher is better); ``road/morf`` = mean MoRF probability (lower is better); ``road/lerf`` = mean LeRF
    probability (higher is better). All images count; 18 batched forward passes per batch and 18 sparse
    linear solves per image (seconds per image at 224 px), so ``--metrics all`` leaves it out: name it.
    """

    name = "road"
    in_all = False  # 18 sparse solves per image: run when named
    paper = "Rong et al., A Consistent and Efficient Evaluation Strategy for Attribution Methods (ROAD), ICML 2022"
    needs = ("model",)

    @classmethod
    def options(cls) -> dict:
        return {"noise": 0.01}

    def __init__(self, **options):
        super().__init__(**options)
        if float(self.settings["noise"]) < 0:
            raise VitlensError(f"{self.name}: noise must be 0 or more, got {self.settings['noise']}")
        for key in ("road", "morf", "lerf"):
            self.sums[key] = torch.zeros((), dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        if batch.model is None:
            raise VitlensError(f"{self.name} needs the model")
        images = batch.images
        pixels = upsample(maps.detach().float(), batch.size).cpu()
        pre = getattr(batch.model, "preprocessing", None)
        std = torch.tensor(pre.std if pre is not None else (1.0,) * images.shape[1], dtype=torch.float64)
        targets = batch.targets.to(images.device)
        curves = {}
        for most in (True, False):
            probs = []
            for f_index, f in enumerate(ROAD_FRACTIONS):
                filled = []
                for image, pix, index in zip(images.cpu(), pixels, batch.index.tolist(), strict=True):
                    removed = road_removed(pix, f, most)
                    out = linear_impute(image, removed).double()
                    g = torch.Generator().manual_seed(int(index) * 1000 + f_index * 2 + int(most))
                    noise = torch.randn(out.shape, generator=g, dtype=torch.float64) * std[:, None, None]
                    filled.append(torch.where(removed, out + float(self.settings["noise"]) * noise, out))
                with torch.no_grad():
                    x = torch.stack(filled).to(images)
                    p = batch.model(x).float().softmax(1).gather(1, targets[:, None])[:, 0]
                probs.append(p.double().cpu())
            curves[most] = torch.stack(probs, 1)  # [B, F]
        morf, lerf = curves[True].mean(1), curves[False].mean(1)
        road = (lerf - morf) / 2
        if "curve_morf" not in self.sums:
            for key in ("curve_morf", "curve_lerf"):
                self.sums[key] = torch.zeros(len(ROAD_FRACTIONS), dtype=torch.float64)
        self.add("road", road.sum())
        self.add("morf", morf.sum())
        self.add("lerf", lerf.sum())
        self.add("curve_morf", curves[True].sum(0))
        self.add("curve_lerf", curves[False].sum(0))
        self.add("n", len(road))
        self.record(batch.index, road=road, morf=morf, lerf=lerf)

    def setup(self, model, dataset) -> None:
        for key in ("curve_morf", "curve_lerf"):
            self.sums[key] = torch.zeros(len(ROAD_FRACTIONS), dtype=torch.float64)

    def result(self) -> dict[str, float]:
        n = self.sums["n"].item()
        mean = {k: float(self.sums[k] / n) if n else None for k in ("road", "morf", "lerf")}
        return {self.name: mean["road"], f"{self.name}/morf": mean["morf"], f"{self.name}/lerf": mean["lerf"]}

    def direction(self, key: str) -> int:
        return -1 if key.endswith("/morf") else 1

    def statistic(self, weights):
        return {
            self.name: weighted_mean(weights, self.records.get("road", np.zeros(0))),
            f"{self.name}/morf": weighted_mean(weights, self.records.get("morf", np.zeros(0))),
            f"{self.name}/lerf": weighted_mean(weights, self.records.get("lerf", np.zeros(0))),
        }

    def curves(self) -> dict:
        n = self.sums["n"].item()
        if not n:
            return {}
        return {
            "fraction": list(ROAD_FRACTIONS),
            "morf": (self.sums["curve_morf"] / n).tolist(),
            "lerf": (self.sums["curve_lerf"] / n).tolist(),
        }
