"""Cascading model-parameter randomisation (Adebayo et al., *Sanity Checks for Saliency Maps*, NeurIPS 2018).

On a deep copy of the explainer (and so of its model), the weights are randomised from the top down —
the classifier first, then the blocks from the last to the first, cumulatively — and after each level
the map is recomputed for the same target. The score is the Spearman rank correlation between the
original and the randomised map (per image, on the patch grid); the metric reports the mean over
levels and the curve per level. A faithful method's maps decorrelate quickly: **lower is better**; a
map that survives randomisation unchanged fails the check.

Each randomised tensor is replaced by Gaussian noise with the tensor's own mean and standard deviation
(0.02 when it has none), so activations keep their scale; the noise is seeded per level, identical for
every batch and process.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Batch, Metric, register


def cascade(backbone) -> list[tuple[str, list[nn.Module]]]:
    """Randomisation levels from the top: ``head`` (every linear classifier outside the blocks with one
    output per class) then ``blockL-1`` … ``block0``."""
    blocks = list(backbone.blocks)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    heads = [
        m
        for m in backbone.modules()
        if isinstance(m, nn.Linear) and m.out_features == backbone.num_classes and id(m) not in in_blocks
    ]
    levels = [("head", heads)] if heads else []
    return levels + [(f"block{i}", [blocks[i]]) for i in reversed(range(len(blocks)))]


@torch.no_grad()
def randomize_(modules: list[nn.Module], seed: int) -> None:
    """Replace every parameter of ``modules`` by seeded Gaussian noise with its own mean and std."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            x = p.detach().double()
            std = x.std().item() if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * (std if std > 0 else 0.02)
            p.copy_((noise + x.mean().cpu()).to(p))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of the rows of ``a`` and ``b`` ``[B, N]`` (average ranks for ties).
    Two constant rows count as identical (1), one constant row as uncorrelated (0)."""
    ra = rankdata(a.double().cpu().numpy(), axis=1)
    rb = rankdata(b.double().cpu().numpy(), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    flat = ((ra == 0).all(1) & (rb == 0).all(1)).astype(np.float64)
    return torch.from_numpy(np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), flat))


@register
class Sanity(Metric):
    name = "sanity"
    paper = "Adebayo et al., Sanity Checks for Saliency Maps, NeurIPS 2018 (cascading randomisation)"
    needs = ("model", "explainer")
    higher_is_better = False

    @classmethod
    def options(cls) -> dict:
        return {"seed": 0}

    def setup(self, model, dataset) -> None:
        self.levels = [name for name, _ in cascade(model)]
        self.sums["spearman"] = torch.zeros(len(self.levels), dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        if not hasattr(batch.explainer, "backbone"):
            raise VitlensError(f"{self.name} needs a vitlens explainer (with its backbone)")
        explainer = copy.deepcopy(batch.explainer)
        levels = cascade(explainer.backbone)
        if not hasattr(self, "levels"):
            self.setup(explainer.backbone, None)
        rhos = []
        for i, (_, modules) in enumerate(levels):
            randomize_(modules, int(self.settings["seed"]) * 1000 + i)
            randomised = explainer(batch.images, batch.targets).maps
            rhos.append(spearman(maps.detach().flatten(1), randomised.detach().flatten(1)))
        rho = torch.stack(rhos, 1)
        self.add("spearman", rho.sum(0))
        self.add("n", len(rho))
        self.record(batch.index, spearman=rho.mean(1))

    def result(self) -> dict[str, float]:
        n = self.sums["n"].item()
        return {self.name: float(self.sums["spearman"].mean() / n) if n else None}

    def curves(self) -> dict:
        n = self.sums["n"].item()
        return {"levels": self.levels, "spearman": (self.sums["spearman"] / n).tolist()} if n else {}
