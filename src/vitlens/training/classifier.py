"""Training a classifier from scratch or fine-tuning one: cross-entropy with label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import collate
from .augment import flip_shift
from .distributed import Dist, all_reduce_sum
from .loop import Task


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
