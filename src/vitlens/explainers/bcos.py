"""B-cos explanations (Böhle, Fritz, Schiele, TPAMI 2024): the dynamic linear map of a B-cos ViT.

In explanation mode a B-cos network is exactly linear in its encoded input, ``logit_c = W(x)_c · x + const``
(the constant: the position-embedding path and the logit bias), and ``W(x)_c`` is the input gradient. The
contribution map ``Σ_channels x ⊙ W(x)_c``, summed over each patch, is the map on the patch grid (SPEC §3.2).
:func:`explain_bcos` also returns the weights, the pixel contributions and the colour explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..backbones.bcos_vit import BcosViT
from ..bcos import explanation_mode
from ..errors import VitlensError
from .base import Explainer, frozen_eval, register, resolve_target


def colour_explanation(inputs: Tensor, weights: Tensor, smooth: int = 15, alpha_percentile: float = 99.5) -> Tensor:
    """The B-cos colour explanation, batched: RGBA ``[B, H, W, 4]`` in [0, 1] (B-cos-v2 ``gradient_to_image``).

    Per pixel the six weights are divided by their largest magnitude and clamped at 0; colour =
    ``w[:3] / (w[:3] + w[3:])``; alpha = ‖w‖ where the contribution is positive, averaged over a
    ``smooth``×``smooth`` window and divided by the image's ``alpha_percentile``-th percentile, clipped.
    ``inputs`` and ``weights`` are the encoded images and their dynamic linear weights ``[B, 6, H, W]``.
    """
    contributions = (inputs * weights).sum(1, keepdim=True)
    rgb = (weights / (weights.abs().amax(1, keepdim=True) + 1e-12)).clamp(min=0)
    rgb = rgb[:, :3] / (rgb[:, :3] + rgb[:, 3:] + 1e-12)
    alpha = weights.norm(p=2, dim=1, keepdim=True)
    alpha = torch.where(contributions < 0, 1e-12, alpha)
    if smooth > 1:
        alpha = F.avg_pool2d(alpha, smooth, stride=1, padding=(smooth - 1) // 2)
    cut = torch.quantile(alpha.flatten(1), alpha_percentile / 100, dim=1)
    alpha = (alpha / cut[:, None, None, None]).clip(0, 1)
    return torch.cat([rgb, alpha], dim=1).permute(0, 2, 3, 1)


def colour_picture(rgba: Tensor, size: int = 256) -> Image.Image:
    """One colour explanation ``[H, W, 4]`` as an RGBA picture, scaled so its longer side is ``size``."""
    h, w = rgba.shape[:2]
    scale = size / max(h, w)
    pixels = F.interpolate(rgba.permute(2, 0, 1)[None].float().cpu(), size=(round(h * scale), round(w * scale)))
    return Image.fromarray((pixels[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8), "RGBA")


@dataclass
class BcosExplanation:
    """Everything one B-cos explanation pass yields, for a batch."""

    logits: Tensor  # [B, C] (computed in explanation mode: the same values as a plain forward)
    target: Tensor  # [B] the explained classes
    inputs: Tensor  # [B, 6, H, W] the encoded images [r, g, b, 1-r, 1-g, 1-b]
    weights: Tensor  # [B, 6, H, W] the dynamic linear weights W(x)_target
    contributions: Tensor  # [B, H, W] Σ_channels inputs ⊙ weights
    maps: Tensor  # [B, gh, gw] contributions summed over each patch
    colour: Tensor  # [B, H, W, 4] RGBA colour explanation

    def pictures(self, size: int = 256) -> list[Image.Image]:
        """The colour explanations as RGBA pictures."""
        return [colour_picture(c, size) for c in self.colour]


def default_smooth(size: tuple[int, int]) -> int:
    """The reference smoothing kernel (15 px at 224 px), scaled to the input size, odd."""
    return max(1, round(15 * min(size) / 224)) | 1


@register
class Bcos(Explainer):
    name = "bcos"
    paper = "Böhle, Fritz, Schiele, B-cos Alignment for Inherently Interpretable CNNs and ViTs, TPAMI 2024"
    cost = "1 forward + 1 backward (explanation mode)"

    def __init__(self, model, **options):
        super().__init__(model, **options)
        if not isinstance(self.backbone, BcosViT):
            raise VitlensError(
                f"method 'bcos' needs a B-cos ViT (bcos:NAME or a `vitlens train bcos` checkpoint), "
                f"not a {self.backbone.family} model"
            )

    @classmethod
    def options(cls) -> dict:
        # None: 15 px scaled to the input size (the reference value at 224 px)
        return {"smooth": None, "alpha_percentile": 99.5}

    def _linear(self, images: Tensor, target) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(encoded inputs, W(x)_target, logits, target): one forward and one backward in explanation mode."""
        model = self.backbone.model
        with torch.enable_grad(), explanation_mode(model):
            x = model.encode(self.backbone.normalize(images)).detach().requires_grad_(True)
            logits = model.forward_encoded(x)
            t = resolve_target(target, logits)
            (weights,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
        return x.detach(), weights, logits.detach(), t

    def _pool(self, contributions: Tensor) -> Tensor:
        """Pixel contributions ``[B, H, W]`` → their sum over each patch ``[B, gh, gw]``."""
        h, w = contributions.shape[-2:]
        gh, gw = self.backbone.grid_for((h, w))
        return F.adaptive_avg_pool2d(contributions[:, None], (gh, gw))[:, 0] * (h * w / (gh * gw))

    def explain(self, images: Tensor, target) -> Tensor:
        x, weights, _, _ = self._linear(images, target)
        return self._pool((x * weights).sum(1))

    def explain_and_predict(self, images: Tensor, target=None) -> tuple[Tensor, Tensor]:
        """(maps, logits) from the one explanation pass (the logits need no extra forward)."""
        images = self._check(images)
        with frozen_eval(self.backbone):
            x, weights, logits, _ = self._linear(images, target)
        return self._pool((x * weights).sum(1)).float(), logits

    def explain_full(self, images: Tensor, target=None) -> BcosExplanation:
        """The full explanation: weights, pixel contributions, patch map and colour explanation."""
        images = self._check(images)
        with frozen_eval(self.backbone):
            x, weights, logits, t = self._linear(images, target)
        contributions = (x * weights).sum(1)
        smooth = self.settings["smooth"] or default_smooth(tuple(images.shape[-2:]))
        return BcosExplanation(
            logits=logits, target=t, inputs=x, weights=weights, contributions=contributions,
            maps=self._pool(contributions).float(),
            colour=colour_explanation(x, weights, int(smooth), float(self.settings["alpha_percentile"])),
        )  # fmt: skip

    def explain_with_pictures(self, images: Tensor, target=None) -> tuple[Tensor, Tensor, dict]:
        """(maps, logits, {file suffix: pictures}) for ``vitlens explain``: the colour explanation."""
        full = self.explain_full(images, target)
        return full.maps, full.logits, {"bcos-colour": full.pictures()}


def explain_bcos(model, images: Tensor, target=None, **options) -> BcosExplanation:
    """Dynamic linear weights, pixel contributions, patch map and colour explanation of a B-cos ViT."""
    return Bcos(model, **options).explain_full(images, target)
