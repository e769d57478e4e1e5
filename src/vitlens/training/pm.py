"""PM fine-tuning: cross-entropy on every image + λ · patch-level BCE on the few with masks.

``L = CE(cls_logits, y) + λ · L_pm``. ``L_pm`` is binary cross-entropy over all classes and patches of
the images that carry a mask (or boxes, turned into a box mask): target = the fraction of the patch the
object covers for the true class, 0 for every other class. Those images are a fixed, seeded fraction of
the training set (default 1%); ``mask_batch`` of them take the place of ordinary images in every batch,
so a step costs the same as a classifier step. ``composites`` more slots hold 2×2 tiles of four masked
images at half size, each object's patches the target of its own class only: they teach the map to
separate the classes of several objects in one image (no CE on them, no extra labels). Optional
pseudo-mask rounds (self-training) add confidently, correctly classified training images whose current
PM map, thresholded, becomes their target.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, boxes_to_mask, patch_coverage
from ..data import collate
from ..data.fashion import compose_grid
from ..explainers.pm import patch_probabilities
from .augment import flip_shift
from .loop import Task


def pm_targets(masks: torch.Tensor, labels: torch.Tensor, num_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, C, gh, gw]`` BCE targets: patch coverage of each object's mask for its class, 0 elsewhere.

    ``masks`` ``[B, H, W]`` with ``labels`` ``[B]`` (one object per image), or ``[B, K, H, W]`` with
    ``[B, K]`` (K objects per image, e.g. composites; objects of one class take the larger coverage).
    """
    if masks.dim() == 3:
        masks, labels = masks[:, None], labels[:, None]
    b, k = labels.shape
    coverage = patch_coverage(masks.flatten(0, 1), grid).view(b, k, *grid)
    targets = torch.zeros(b, num_classes, *grid, device=masks.device)
    return targets.scatter_reduce(1, labels[..., None, None].expand(-1, -1, *grid), coverage, reduce="amax")


def pm_loss(patch_logits: torch.Tensor, targets: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Mean binary cross-entropy between PM logits ``[B, C, gh, gw]`` and ``targets`` (positives weighted)."""
    weight = 1 + (pos_weight - 1) * targets
    return F.binary_cross_entropy_with_logits(patch_logits, targets, weight=weight)


class PMForward(nn.Module):
    """One forward giving the class logits of all images and the PM logits of the last ``n_masked``.

    The trainable module of the task (wrapped in DDP under torchrun), so both losses' gradients are
    synchronised.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, n_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
        trace = self.backbone.run(images)
        patch_logits = self.backbone.token_logits(trace.patch_tokens[len(images) - n_masked :])
        return trace.logits, trace.to_grid(patch_logits).permute(0, 3, 1, 2)


def select_mask_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The fixed, seeded subset of training images whose masks are used (at least one)."""
    k = max(1, round(fraction * n))
    return sorted(np.random.default_rng([seed, 7]).choice(n, size=k, replace=False).tolist())


class PMTask(Task):
    kind = "pm"

    def __init__(
        self,
        backbone: Backbone,
        dataset,
        *,
        mask_fraction: float = 0.01,
        lam: float = 10.0,
        pos_weight: float = 1.0,
        mask_batch: int = 8,
        composites: int = 0,
        pseudo_rounds: int = 0,
        pseudo_pool: int = 2000,
        pseudo_threshold: float = 0.5,
        pseudo_confidence: float = 0.9,
        total_steps: int = 1,
        seed: int = 0,
        label_smoothing: float = 0.1,
    ):
        super().__init__(backbone)
        self.net = PMForward(backbone)
        self.dataset, self.lam, self.pos_weight, self.mask_batch = dataset, lam, pos_weight, mask_batch
        self.composites = composites
        self.label_smoothing, self.seed = label_smoothing, seed
        self.mask_fraction = mask_fraction
        self.mask_indices = select_mask_indices(len(dataset), mask_fraction, seed)
        self.pseudo_rounds, self.pseudo_pool = pseudo_rounds, pseudo_pool
        self.pseudo_threshold, self.pseudo_confidence = pseudo_threshold, pseudo_confidence
        self.round_steps = {total_steps * (r + 1) // (pseudo_rounds + 1) for r in range(pseudo_rounds)}
        self.grid = backbone.grid_for(backbone.preprocessing.input_size)
        self.pseudo_indices: list[int] = []
        self.pseudo_targets = torch.zeros(0)
        self._load_pool()

    def _load_pool(self) -> None:
        """The images with real masks (or box masks), kept in memory with their labels."""
        batch = collate([self.dataset[i] for i in self.mask_indices])
        masks = batch["mask"]
        for j, has in enumerate(batch["has_mask"].tolist()):
            if not has:
                masks[j] = boxes_to_mask(batch["boxes"][j], tuple(masks.shape[-2:]))
        self.pool = {"image": batch["image"], "label": batch["label"], "mask": masks}

    def _mask_batch(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mask_batch`` images from the real pool and the pseudo-mask pool, with their BCE targets."""
        n_real, n_pseudo = len(self.mask_indices), len(self.pseudo_indices)
        pick = torch.randint(0, n_real + n_pseudo, (self.mask_batch,)).tolist()
        real = [i for i in pick if i < n_real]
        images, masks = flip_shift(self.pool["image"][real], self.pool["mask"][real])
        labels = self.pool["label"][real]
        targets = pm_targets(masks.to(device), labels.to(device), self.backbone.num_classes, self.grid)
        pseudo = [i - n_real for i in pick if i >= n_real]
        if pseudo:
            extra = collate([self.dataset[self.pseudo_indices[i]] for i in pseudo])
            flip = torch.rand(len(pseudo)) < 0.5
            img = torch.where(flip[:, None, None, None], extra["image"].flip(-1), extra["image"])
            tgt = self.pseudo_targets[pseudo]
            tgt = torch.where(flip[:, None, None, None], tgt.flip(-1), tgt)
            images, labels = torch.cat([images, img]), torch.cat([labels, extra["label"]])
            targets = torch.cat([targets, tgt.to(device)])
        return images.to(device), labels.to(device), targets

    def _composite_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``composites`` 2×2 tiles of four pool images each, with every object's target for its class."""
        pick = torch.randint(0, len(self.mask_indices), (4 * self.composites,))
        images, masks = flip_shift(self.pool["image"][pick], self.pool["mask"][pick])
        tiles, object_masks = compose_grid(images, masks, grid=2)
        labels = self.pool["label"][pick].view(-1, 4)
        targets = pm_targets(object_masks.to(device), labels.to(device), self.backbone.num_classes, self.grid)
        return tiles.to(device), targets

    def modules(self) -> nn.Module:
        return self.net

    def loss(self, module, batch, step):
        """CE on the ordinary and the masked images, λ · BCE on the masked images and the composites."""
        x, y = flip_shift(batch["image"])[0], batch["label"]
        mx, my, targets = self._mask_batch(x.device)
        parts, n_patch = [mx], len(mx)
        if self.composites:
            tiles, tile_targets = self._composite_batch(x.device)
            parts, targets, n_patch = [mx, tiles], torch.cat([targets, tile_targets]), n_patch + len(tiles)
        keep = max(0, len(x) - n_patch)  # masked images and composites replace ordinary ones: same batch size
        logits, patch_logits = module(torch.cat([x[:keep], *parts]), n_patch)
        ce = F.cross_entropy(logits[: keep + len(mx)], torch.cat([y[:keep], my]), label_smoothing=self.label_smoothing)
        bce = pm_loss(patch_logits, targets, self.pos_weight)
        return ce + self.lam * bce, {"ce": ce.item(), "pm_bce": bce.item()}

    def after_step(self, step: int) -> None:
        if step + 1 in self.round_steps:
            self.pseudo_label_round()

    @torch.no_grad()
    def pseudo_label_round(self) -> None:
        """Threshold the current PM maps of confident, correct, unlabelled images into targets."""
        was = self.backbone.training
        self.backbone.eval()
        rng = np.random.default_rng([self.seed, 11, len(self.pseudo_indices)])
        taken = set(self.mask_indices) | set(self.pseudo_indices)
        candidates = [i for i in rng.permutation(len(self.dataset))[: self.pseudo_pool * 2] if i not in taken]
        device = self.backbone.mean.device
        new_idx, new_targets = [], []
        for start in range(0, min(len(candidates), self.pseudo_pool), 256):
            chunk = candidates[start : start + 256]
            b = collate([self.dataset[i] for i in chunk])
            trace = self.backbone.run(b["image"].to(device))
            probs = trace.logits.softmax(1)
            conf, pred = probs.max(1)
            ok = (pred.cpu() == b["label"]) & (conf.cpu() >= self.pseudo_confidence)
            volume = patch_probabilities(self.backbone, trace)
            hard = (volume[torch.arange(len(pred)), pred] > self.pseudo_threshold).float()
            for j in torch.nonzero(ok).flatten().tolist():
                t = torch.zeros_like(volume[j])
                t[b["label"][j]] = hard[j]
                new_idx.append(int(chunk[j]))
                new_targets.append(t.cpu())
        if new_idx:
            self.pseudo_indices += new_idx
            stacked = torch.stack(new_targets)
            self.pseudo_targets = stacked if not len(self.pseudo_targets) else torch.cat([self.pseudo_targets, stacked])
        self.backbone.train(was)

    def state_dict(self) -> dict:
        return {"pseudo_indices": self.pseudo_indices, "pseudo_targets": self.pseudo_targets}

    def load_state_dict(self, state: dict) -> None:
        self.pseudo_indices = list(state.get("pseudo_indices", []))
        self.pseudo_targets = state.get("pseudo_targets", torch.zeros(0))

    def save_extras(self) -> tuple[dict, dict]:
        return {}, {
            "pm": {
                "mask_fraction": self.mask_fraction,
                "mask_indices": self.mask_indices,
                "masks_used": len(self.mask_indices),
                "lambda": self.lam,
                "pos_weight": self.pos_weight,
                "mask_batch": self.mask_batch,
                "composites": self.composites,
                "pseudo_rounds": self.pseudo_rounds,
                "pseudo_labelled": len(self.pseudo_indices),
            }
        }
