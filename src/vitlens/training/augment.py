"""Batch augmentation shared by the trainers: horizontal flip and a small shift, masks following."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def flip_shift(images: torch.Tensor, masks: torch.Tensor | None = None, max_shift: int = 4):
    """Randomly flip each image and shift it by up to ``max_shift`` px (edges replicated).

    Uses the global torch RNG, which the loop seeds per step. Masks (``[B, H, W]``) move with their
    images so localisation targets stay aligned.
    """
    b, _, h, w = images.shape
    if b == 0:
        return images, masks
    flip = torch.rand(b, device=images.device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if masks is not None:
        masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
    if max_shift <= 0:
        return images, masks
    s = max_shift
    dy, dx = torch.randint(0, 2 * s + 1, (2, b)).tolist()
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    images = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if masks is not None:
        pm = F.pad(masks[:, None].float(), (s, s, s, s))[:, 0]
        masks = torch.stack([pm[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)]).to(masks.dtype)
    return images, masks
