"""The grid pointing game (Böhle, Fritz, Schiele, *B-cos Networks*, CVPR 2022; B-cos ViTs, TPAMI 2024).

Each ``fashion-grid`` image tiles n canvases of different classes. A cell counts when the model
classifies its source canvas on its own correctly and confidently. For every such cell the grid image
is explained for that cell's class, and the score is the share of the positive attribution that falls
inside the cell; the metric is the mean over cells (chance: 1 / n = 0.25 on 2×2 grids). The two
protocols are described in :class:`GridPointingGame`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import upsample
from ..data import resize
from ..errors import VitlensError
from .base import Batch, Metric, check_choice, register, weighted_mean


@register
class GridPointingGame(Metric):
    """Share of the positive attribution inside the explained class's cell, mean over confident cells.

    Protocols (option ``protocol``):

    - ``vitlens`` (default): a cell counts when the model's softmax probability of the cell's class on
      its source canvas is above ``confidence`` (0.5) and the class is the top-1 prediction. The patch
      map is upsampled bilinearly to the image, clamped at 0, and the share of its mass inside the
      (inclusive) cell is the score; bilinear upsampling lets mass of a border patch bleed into the
      neighbouring cell.
    - ``bcos``: B-cos-v2's ``interpretability/analyses/localisation.py``. A cell counts when its source
      canvas is classified correctly and ``sigmoid(logit of the class) > confidence`` (the threshold the
      B-cos models are trained for, with BCE). The attribution is taken per pixel: the B-cos explainer's
      pixel contributions ``Σ_channels W(x) ⊙ x`` where the explanation carries them (B-cos' ``extras``),
      otherwise the patch map upsampled by nearest neighbour (each patch's value on its own pixels, no
      bleeding across cell borders); optionally smoothed with ``smooth`` (odd kernel size,
      ``avg_pool2d(k, stride 1, padding (k − 1) / 2)``, zero padding counted, as B-cos' ``--smooth``);
      then clamped at 0 pixel by pixel; the score is the cell's sum over the total (0 when either is 0).
      B-cos builds each grid from the most confident images of distinct classes; on ``fashion-grid`` the
      grids are fixed and unconfident cells are skipped instead.

    Records per cell: ``cell`` (its index in the grid) and ``score``.
    """

    name = "grid-pointing-game"
    paper = "Böhle, Fritz, Schiele, B-cos Networks, CVPR 2022 (grid pointing game)"
    needs = ("fashion-grid", "model", "explainer")
    protocols = ("vitlens", "bcos")

    @classmethod
    def options(cls) -> dict:
        return {"confidence": 0.5, "protocol": "vitlens", "smooth": 0}

    @classmethod
    def applies_to(cls, dataset) -> bool:
        return hasattr(dataset, "canvas") and hasattr(dataset, "grid")

    def __init__(self, **options):
        super().__init__(**options)
        check_choice(self.name, "protocol", self.settings["protocol"], self.protocols)
        smooth = self.settings["smooth"]
        if not isinstance(smooth, int) or smooth < 0 or (smooth and smooth % 2 == 0):
            raise VitlensError(f"{self.name}: smooth must be 0 (none) or an odd kernel size, got {smooth!r}")
        if smooth and self.settings["protocol"] != "bcos":
            raise VitlensError(f"{self.name}: smooth belongs to protocol=bcos")
        self.sums["score"] = torch.zeros((), dtype=torch.float64)
        self.sums["cells"] = torch.zeros((), dtype=torch.float64)

    def setup(self, model, dataset) -> None:
        if not self.applies_to(dataset):
            raise VitlensError(f"{self.name} needs fashion-grid data (e.g. --data fashion-grid:test:n=500)")

    def confident(self, batch: Batch) -> Tensor:
        """Which cells' source canvases the model gets right with confidence ``[B, n]`` (once per batch)."""
        bcos = self.settings["protocol"] == "bcos"
        key = ("grid-confident", float(self.settings["confidence"]), bcos)
        if key not in batch.shared:
            sources, labels = batch.extra["sources"], batch.extra["labels"]
            canvas = batch.extra["dataset"].canvas
            images = torch.stack([canvas[int(s)]["image"] for s in sources.flatten()])
            images = resize(images, batch.size).to(batch.images.device)
            with torch.no_grad():
                logits = batch.model(images).float().cpu()
            cls = labels.flatten().cpu()
            chosen = logits.gather(1, cls[:, None])[:, 0]
            p = chosen.sigmoid() if bcos else logits.softmax(1).gather(1, cls[:, None])[:, 0]
            ok = (logits.argmax(1) == cls) & (p > float(self.settings["confidence"]))
            batch.shared[key] = ok.reshape(sources.shape)
        return batch.shared[key]

    def pixels(self, batch: Batch, images: Tensor, targets: Tensor) -> Tensor:
        """The attribution at image resolution ``[M, H, W]`` that the protocol scores."""
        explanation = batch.explainer(images, targets)
        if self.settings["protocol"] != "bcos":
            return upsample(explanation.maps.float(), batch.size).cpu()
        contributions = explanation.extras.get("contributions")  # B-cos: the pixel contributions
        if contributions is None:
            contributions = F.interpolate(explanation.maps.float()[:, None], size=batch.size, mode="nearest")[:, 0]
        x = contributions.detach().double().cpu()
        k = int(self.settings["smooth"])
        if k:
            x = F.avg_pool2d(x[:, None], k, stride=1, padding=(k - 1) // 2)[:, 0]
        return x

    def update(self, batch: Batch, maps: Tensor) -> None:
        if "sources" not in batch.extra or "cells" not in batch.extra:
            raise VitlensError(f"{self.name} needs fashion-grid samples (cells, labels and sources)")
        ok = self.confident(batch)
        self.add("cells", ok.numel())
        rows, cols = ok.nonzero(as_tuple=True)
        if not len(rows):
            return
        targets = batch.extra["labels"].cpu()[rows, cols]
        scores = []
        for s in range(0, len(rows), len(batch.images)):  # at most one batch of explanations at a time
            r = rows[s : s + len(batch.images)]
            pixels = self.pixels(batch, batch.images[r.to(batch.images.device)], targets[s : s + len(r)])
            cells = batch.extra["cells"].cpu()[r, cols[s : s + len(r)]]
            scores.append(self.share(pixels, cells))
        score = torch.cat(scores)
        self.add("score", score.sum())
        self.add("n", len(score))
        self.record(batch.index.cpu()[rows], cell=cols, score=score)

    @staticmethod
    def share(pixels: Tensor, cells: Tensor) -> Tensor:
        """Share of positive mass of ``pixels`` ``[M, H, W]`` inside the inclusive ``cells`` ``[M, 4]``."""
        pos = pixels.double().clamp_min(0)
        h, w = pos.shape[-2:]
        ys = torch.arange(h, dtype=torch.float64)[None, :, None]
        xs = torch.arange(w, dtype=torch.float64)[None, None, :]
        c = cells.double()
        inside = (ys >= c[:, 1, None, None]) & (ys <= c[:, 3, None, None])
        inside = inside & (xs >= c[:, 0, None, None]) & (xs <= c[:, 2, None, None])
        total = pos.flatten(1).sum(1)
        part = (pos * inside).flatten(1).sum(1)
        return torch.where(total > 0, part / torch.where(total > 0, total, 1.0), torch.zeros_like(total))

    def result(self) -> dict[str, float]:
        n = self.sums["n"].item()
        return {self.name: float(self.sums["score"] / n) if n else None}

    def statistic(self, weights):
        return {self.name: weighted_mean(weights, self.records.get("score", np.zeros(0)))}

    def curves(self) -> dict:
        return {"cells": int(self.sums["cells"].item()), "confident_cells": self.used}
