"""The grid pointing game (Böhle, Fritz, Schiele, *B-cos Networks*, CVPR 2022; B-cos ViTs, TPAMI 2024).

Each ``fashion-grid`` image tiles n canvases of different classes. A cell counts when the model
classifies its source canvas on its own correctly and confidently (softmax probability of the class
above ``confidence``, default 0.5, B-cos's threshold on its sigmoid outputs). For every such cell the
grid image is explained for that cell's class, and the score is the share of the positive attribution
(the upsampled map clamped at 0) that falls inside the cell; the metric is the mean over cells
(chance: 1 / n = 0.25 on 2×2 grids).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones import upsample
from ..data import resize
from ..errors import VitlensError
from .base import Batch, Metric, register


@register
class GridPointingGame(Metric):
    name = "grid-pointing-game"
    paper = "Böhle, Fritz, Schiele, B-cos Networks, CVPR 2022 (grid pointing game)"
    needs = ("fashion-grid", "model", "explainer")

    @classmethod
    def options(cls) -> dict:
        return {"confidence": 0.5}

    @classmethod
    def applies_to(cls, dataset) -> bool:
        return hasattr(dataset, "canvas") and hasattr(dataset, "grid")

    def __init__(self, **options):
        super().__init__(**options)
        self.sums["score"] = torch.zeros((), dtype=torch.float64)
        self.sums["cells"] = torch.zeros((), dtype=torch.float64)

    def setup(self, model, dataset) -> None:
        if not self.applies_to(dataset):
            raise VitlensError(f"{self.name} needs fashion-grid data (e.g. --data fashion-grid:test:n=500)")

    def confident(self, batch: Batch) -> Tensor:
        """Which cells' source canvases the model gets right with confidence ``[B, n]`` (once per batch)."""
        key = ("grid-confident", float(self.settings["confidence"]))
        if key not in batch.shared:
            sources, labels = batch.extra["sources"], batch.extra["labels"]
            canvas = batch.extra["dataset"].canvas
            images = torch.stack([canvas[int(s)]["image"] for s in sources.flatten()])
            images = resize(images, batch.size).to(batch.images.device)
            with torch.no_grad():
                probs = batch.model(images).float().softmax(1).cpu()
            cls = labels.flatten().cpu()
            p = probs.gather(1, cls[:, None])[:, 0]
            ok = (probs.argmax(1) == cls) & (p > float(self.settings["confidence"]))
            batch.shared[key] = ok.reshape(sources.shape)
        return batch.shared[key]

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
            m = batch.explainer(batch.images[r.to(batch.images.device)], targets[s : s + len(r)]).maps
            cells = batch.extra["cells"].cpu()[r, cols[s : s + len(r)]]
            scores.append(self.share(upsample(m.detach().float(), batch.size).cpu(), cells))
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

    def curves(self) -> dict:
        return {"cells": int(self.sums["cells"].item()), "confident_cells": self.used}
