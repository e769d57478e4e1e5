"""Cascading model-parameter randomisation (Adebayo et al., *Sanity Checks for Saliency Maps*, NeurIPS 2018).

Protocol card (metric ``sanity``):

- **Cascade.** On a deep copy of the explainer (and so of its model) the parameters are randomised from
  the top down, cumulatively, down to the input: ``head`` (everything the model's head reads: the
  classifier and, where the model has one, the pooled-feature norm), ``final-norm``, ``blockL-1`` …
  ``block0``, ``position`` (position embedding and prefix tokens: class, distillation, register
  tokens; position terms the blocks read but none owns, such as BEiT's shared relative position
  bias) and ``patch-embed`` (the patch projection or convolutional stem with its norms). The parameters
  of each part are found from the autograd graph of the backbone's own ``embed``,
  ``add_prefix_and_position``, ``final_norm`` and ``head`` steps, so every backbone family is covered
  without a list of names; ``unassigned`` in the curves counts parameters in no level (0 on every
  supported family). After each level the map is recomputed for the same images and targets. Quantus'
  ``MPRT`` randomises the same way (every module, top down) with its own layer order.
- **Randomisation.** Each parameter tensor is replaced by Gaussian noise with the tensor's own mean and
  standard deviation (0.02 when it has none), so activations keep their scale; the noise is seeded per
  level, identical for every batch and process.
- **Similarity.** Spearman rank correlation between the original and the randomised map of each image,
  on the patch grid (average ranks for ties). When either map is constant the correlation is undefined:
  it is NaN (as Quantus returns), counted in ``sanity/undefined`` and left out of every mean — a constant
  map is never rewarded as "decorrelated".
- **Levels a method cannot see.** A level whose randomisation leaves every map of the data set unchanged
  (relative tolerance 1e-5) is *unseen*: the method does not read those parameters (the head for
  class-agnostic methods such as attention, rollout, flow or DiffMask, whose map does not depend on the
  class). Unseen levels are listed in the curves and excluded from the means.
- **Values.** ``sanity`` = mean over the seen levels of ``|ρ̄_ℓ|``, the absolute value of the mean
  correlation at level ℓ over the images where it is defined (lower is better: anti-correlation is no
  better than none); ``sanity/full`` = ``ρ̄`` with every parameter randomised (the last level);
  ``sanity/signed`` = mean of ``ρ̄_ℓ`` over the seen levels; ``sanity/undefined`` = share of (image, level)
  pairs with a constant map; ``sanity/pass`` = the verdict (1 pass, 0 fail, ``None`` undecided).
- **Verdict.** A method *passes* when its maps stop resembling the originals as the model is randomised:
  both the cascade's value ``sanity`` (mean ``|ρ̄_ℓ|`` over the seen levels) and ``|ρ̄_full|`` (every
  parameter randomised) are below ``threshold`` (option, default 0.5). It *fails* when either is at or
  above it — a map carried through most of the cascade and broken only by the last level (DiffMask's,
  which its embedding-level gate carries down to the patch embedding) fails — or when no level changes
  any map (the maps do not depend on the model). It is *undecided* when more than half of the fully
  randomised maps are constant (the correlation is undefined for most images).

- **Retraining** (option ``retrain_steps``, default 0: off). A trained explainer is applied to the
  randomised model as it is by the cascade; with ``retrain_steps=N`` it is also trained anew for ``N``
  steps on the fully randomised model (every level above, same noise), on the evaluated data set:
  DiffMask's gates from a fresh initialisation with the model frozen, PM's fine-tuning of the whole model
  on the images that carry a mask or box (as ``vitlens train pm`` with its recipe's learning rate). The
  retraining runs once, on the first batch. ``sanity/retrained`` = mean correlation between the original
  maps and the retrained explainer's (ρ, like ``/full``): near 0 means the trained map depends on the
  model; high means it comes back from the training data and the explainer's own parameters alone. Other
  methods have no trained part and give ``None``.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Batch, Metric, register, weighted_mean


def _used(output: Tensor, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters in ``output``'s autograd graph."""
    grads = torch.autograd.grad(output.float().sum(), params, allow_unused=True)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]


def cascade(backbone) -> list[tuple[str, list[nn.Parameter]]]:
    """Randomisation levels from the top: ``head``, ``final-norm``, ``blockL-1`` … ``block0``, ``position``,
    ``patch-embed`` (empty levels left out); each level lists the parameters it randomises."""
    params = list(backbone.parameters())
    flags = [p.requires_grad for p in params]
    blocks = list(backbone.blocks)
    size = backbone.preprocessing.input_size
    device = params[0].device if params else torch.device("cpu")
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            x = torch.full((1, 3, *size), 0.5, device=device)
            embeddings, grid = backbone.embed(backbone.normalize(x))
            patch = _used(embeddings, params)
            tokens = backbone.add_prefix_and_position(embeddings.detach().requires_grad_(True), grid)
            position = _used(tokens, params)
            h = tokens.detach()
            for block in blocks:
                h = block(h)
            through = _used(h, params)  # the blocks' own and what every block reads (BEiT's shared bias)
            normed = backbone.final_norm(tokens.detach().requires_grad_(True))
            norm = _used(normed, params)
            head = _used(backbone.head(normed.detach().requires_grad_(True)), params)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    taken: set[int] = set()

    def level(found) -> list[nn.Parameter]:
        out = [p for p in found if id(p) not in taken]
        taken.update(id(p) for p in out)
        return out

    levels = [("head", level(head)), ("final-norm", level(norm))]
    block_levels = [(f"block{i}", level(blocks[i].parameters())) for i in reversed(range(len(blocks)))]
    levels += block_levels + [("position", level(position + through)), ("patch-embed", level(patch))]
    return [(name, ps) for name, ps in levels if ps]


def unassigned(backbone, levels: list[tuple[str, list[nn.Parameter]]]) -> int:
    """How many parameter values no level randomises."""
    seen = {id(p) for _, ps in levels for p in ps}
    return sum(p.numel() for p in backbone.parameters() if id(p) not in seen)


@torch.no_grad()
def randomize_(params: list[nn.Parameter], seed: int) -> None:
    """Replace every parameter in ``params`` by seeded Gaussian noise with its own mean and std."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        x = p.detach().double()
        std = x.std().item() if p.numel() > 1 else 0.0
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * (std if std > 0 else 0.02)
        p.copy_((noise + x.mean().cpu()).to(p))


RETRAINABLE = ("diffmask", "pm")  # methods with a trained part that the retraining variant trains anew


def retrained_explainer(explainer, dataset, steps: int, seed: int):
    """``explainer`` trained anew for ``steps`` steps on its model with every cascade level randomised (the
    cascade's own noise): DiffMask's gates from scratch, PM's fine-tuning (see the card)."""
    from ..explainers import get_explainer
    from ..explainers.diffmask import DiffMask
    from ..training.diffmask import DiffMaskTask
    from ..training.loop import TrainConfig, train
    from ..training.pm import PMTask, labelled_indices

    if dataset is None:
        raise VitlensError("sanity: retrain_steps needs the evaluated data set (run it through vitlens evaluate)")
    explainer = copy.deepcopy(explainer)
    backbone = explainer.backbone
    for i, (_, params) in enumerate(cascade(backbone)):
        randomize_(params, seed * 1000 + i)
    device = str(backbone.mean.device)
    if explainer.name == "pm":
        labelled = labelled_indices(dataset)
        if not labelled:
            raise VitlensError("sanity: retraining PM needs images with a mask or a box in the evaluated data set")
        task = PMTask(backbone, dataset, labelled=labelled, total_steps=steps, seed=seed)
        cfg = TrainConfig(batch_size=32, lr=1e-4, warmup_steps=steps // 10, max_steps=steps, seed=seed, device=device,
                          checkpoint_every_s=float("inf"), log_every=max(1, steps))  # fmt: skip
    else:
        task = DiffMaskTask(backbone, seed=seed)
        cfg = TrainConfig(batch_size=32, lr=3e-4, warmup_steps=steps // 10, max_steps=steps, seed=seed, device=device,
                          checkpoint_every_s=float("inf"), log_every=max(1, steps))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        train(task, dataset, Path(tmp) / explainer.name, cfg)
    backbone.eval()
    if explainer.name == "diffmask":
        return DiffMask(backbone, task.gates)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PM-trained here, not from a PM checkpoint
        return get_explainer("pm", backbone)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the rows of ``a`` and ``b`` ``[B, N]`` (average ranks for ties); NaN where
    either row is constant (the correlation is undefined there)."""
    ra = rankdata(a.double().cpu().numpy(), axis=1)
    rb = rankdata(b.double().cpu().numpy(), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    return torch.from_numpy(np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan))


def unchanged(before: Tensor, after: Tensor, rtol: float = 1e-5) -> Tensor:
    """Rows of ``after`` equal to ``before`` ``[B, N]`` up to ``rtol`` of the row's largest magnitude."""
    a, b = before.double().cpu(), after.double().cpu()
    scale = a.abs().amax(1).clamp_min(1e-30)
    return ((a - b).abs().amax(1) <= rtol * scale) & torch.isfinite(b).all(1)


@register
class Sanity(Metric):
    __doc__ = __doc__
    name = "sanity"
    paper = "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018 (cascading randomisation)"
    needs = ("model", "explainer")
    higher_is_better = False

    @classmethod
    def options(cls) -> dict:
        return {"seed": 0, "threshold": 0.5, "retrain_steps": 0}

    def __init__(self, **options):
        super().__init__(**options)
        if not 0 < float(self.settings["threshold"]) <= 1:
            raise VitlensError(f"{self.name}: threshold must be in (0, 1], got {self.settings['threshold']}")
        steps = self.settings["retrain_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise VitlensError(f"{self.name}: retrain_steps must be a non-negative integer, got {steps!r}")
        self.sums["retrained"] = torch.zeros((), dtype=torch.float64)
        self.sums["retrained_defined"] = torch.zeros((), dtype=torch.float64)
        self.retrained = None  # the explainer trained anew on the randomised model (retrain_steps > 0)

    def setup(self, model, dataset) -> None:
        levels = cascade(model)
        self.levels = [name for name, _ in levels]
        self.unassigned = unassigned(model, levels)
        k = len(self.levels)
        for key in ("spearman", "defined", "unchanged"):
            self.sums[key] = torch.zeros(k, dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        if not hasattr(batch.explainer, "backbone"):
            raise VitlensError(f"{self.name} needs a vitlens explainer (with its backbone)")
        explainer = copy.deepcopy(batch.explainer)
        levels = cascade(explainer.backbone)
        if not hasattr(self, "levels"):
            self.setup(explainer.backbone, None)
        before = maps.detach().flatten(1)
        original = before
        rhos, same = [], []
        for i, (_, params) in enumerate(levels):
            randomize_(params, int(self.settings["seed"]) * 1000 + i)
            after = explainer(batch.images, batch.targets).maps.detach().flatten(1)
            rhos.append(spearman(original, after))
            same.append(unchanged(before, after))
            before = after
        rho = torch.stack(rhos, 1)  # [B, L], NaN where undefined
        same_ = torch.stack(same, 1)
        defined = ~rho.isnan()
        self.add("spearman", torch.where(defined, rho, 0.0).sum(0))
        self.add("defined", defined.double().sum(0))
        self.add("unchanged", same_.double().sum(0))
        self.add("n", len(rho))
        self.record(batch.index, spearman=rho, unchanged=same_)
        if self.settings["retrain_steps"] and batch.explainer.name in RETRAINABLE:
            if self.retrained is None:
                dataset = (batch.extra or {}).get("dataset")
                self.retrained = retrained_explainer(batch.explainer, dataset, self.settings["retrain_steps"],
                                                     int(self.settings["seed"]))  # fmt: skip
            rho_r = spearman(original, self.retrained(batch.images, batch.targets).maps.detach().flatten(1))
            defined_r = ~rho_r.isnan()
            self.add("retrained", torch.where(defined_r, rho_r, 0.0).sum())
            self.add("retrained_defined", defined_r.double().sum())

    # --- values ---------------------------------------------------------------------------------------

    def _levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean ρ per level, NaN where undefined everywhere; seen flags; share undefined per level)."""
        n = self.sums["n"].item()
        s, d = self.sums["spearman"].numpy(), self.sums["defined"].numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(d > 0, s / np.where(d > 0, d, 1), np.nan)
        seen = self.sums["unchanged"].numpy() < n
        return mean, seen, 1 - d / n

    def verdict(self) -> float | None:
        """1.0 pass, 0.0 fail, ``None`` undecided (see the card)."""
        if not self.used:
            return None
        mean, seen, undefined = self._levels()
        if not seen.any():
            return 0.0
        if undefined[-1] > 0.5 or np.isnan(mean[-1]):
            return None
        judged = mean[seen & ~np.isnan(mean)]
        threshold = float(self.settings["threshold"])
        return float(abs(mean[-1]) < threshold and np.abs(judged).mean() < threshold)

    def result(self) -> dict[str, float]:
        keys = ("", "/full", "/signed", "/undefined", "/pass")
        if not self.used:
            return {self.name + k: None for k in keys}
        mean, seen, undefined = self._levels()
        judged = mean[seen & ~np.isnan(mean)]
        retrained = {}
        if self.settings["retrain_steps"]:
            d = self.sums["retrained_defined"].item()
            retrained[f"{self.name}/retrained"] = float(self.sums["retrained"] / d) if d else None
        return {
            self.name: float(np.abs(judged).mean()) if len(judged) else None,
            f"{self.name}/full": None if np.isnan(mean[-1]) else float(mean[-1]),
            f"{self.name}/signed": float(judged.mean()) if len(judged) else None,
            f"{self.name}/undefined": float(undefined.mean()),
            f"{self.name}/pass": self.verdict(),
            **retrained,
        }

    def statistic(self, weights):
        rho = self.records.get("spearman", np.zeros((0, len(getattr(self, "levels", ())))))
        defined = ~np.isnan(rho)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (weights @ np.nan_to_num(rho)) / (weights @ defined)  # [R, L], NaN where none is defined
        seen = self._levels()[1] if self.used else np.zeros(rho.shape[1], bool)
        judged = np.where(seen[None], mean, np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN replicates stay NaN
            return {
                self.name: np.nanmean(np.abs(judged), 1),
                f"{self.name}/full": mean[:, -1] if rho.shape[1] else np.full(len(weights), np.nan),
                f"{self.name}/signed": np.nanmean(judged, 1),
                f"{self.name}/undefined": weighted_mean(weights, (~defined).mean(1)),
            }

    def direction(self, key: str) -> int:
        return -1 if key == self.name else 0  # |ρ̄| ranks; the signed, full, undefined values and the verdict do not

    def curves(self) -> dict:
        if not self.used:
            return {}
        mean, seen, undefined = self._levels()
        return {
            "levels": self.levels,
            "spearman": [None if np.isnan(v) else float(v) for v in mean],
            "seen": seen.tolist(),
            "undefined": undefined.tolist(),
            "unassigned": int(getattr(self, "unassigned", 0)),
            "threshold": float(self.settings["threshold"]),
        }

    def per_image(self) -> dict[str, list]:
        if not len(self.index):
            return {}
        rho = self.records["spearman"]
        return {
            "index": self.index.tolist(),
            "spearman": [[None if np.isnan(v) else float(v) for v in row] for row in rho],
        }
