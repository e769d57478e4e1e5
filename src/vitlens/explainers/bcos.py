"""B-cos explanations (Böhle, Fritz, Schiele, TPAMI 2024): the dynamic linear map of a B-cos ViT.

In explanation mode a B-cos network is exactly linear in its encoded input, ``logit_c = W(x)_c · x + const``
(the constant: the position-embedding path and the logit bias), and ``W(x)_c`` is the input gradient. The
contribution map ``Σ_channels x ⊙ W(x)_c``, summed over each patch, is the map on the patch grid. The
explanation's ``extras`` also hold the pixel contributions and the colour explanation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..backbones.bcos_vit import BcosViT
from ..bcos import explanation_mode
from ..errors import VitlensError
from .base import Explainer, register
from .targets import Target


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


def default_smooth(size: tuple[int, int]) -> int:
    """The reference smoothing kernel (15 px at 224 px), scaled to the input size, odd."""
    return max(1, round(15 * min(size) / 224)) | 1


@register
class Bcos(Explainer):
    """The B-cos contribution map: ``Σ_channels x ⊙ W(x)_target`` of the dynamic linear map, per patch.

    The explanation's ``extras`` hold ``"weights"`` ``[B, 6, H, W]`` (the dynamic linear weights of the
    encoded input), ``"contributions"`` ``[B, H, W]`` (per pixel) and ``"colour"`` ``[B, H, W, 4]`` (the RGBA
    colour explanation). A score function as the target is explained through
    the same linear map (its gradient in explanation mode).

    Args:
        smooth: side of the alpha smoothing window in pixels (default: 15 px scaled to the input size).
        alpha_percentile: the percentile of the alpha values that maps to full opacity.
    """

    name = "bcos"
    paper = "Böhle, Fritz, Schiele, B-cos Alignment for Inherently Interpretable CNNs and ViTs, TPAMI 2024"
    cost = "1 forward + 1 backward (explanation mode)"
    scale = "positive"
    meaning = "each patch's exact contribution to the logit through the model's dynamic linear map"

    def __init__(self, model, *, smooth: int | None = None, alpha_percentile: float = 99.5):
        super().__init__(model)
        if not isinstance(self.backbone, BcosViT):
            raise VitlensError(
                f"method 'bcos' needs a B-cos ViT (bcos:NAME or a `vitlens train bcos` checkpoint), "
                f"not a {self.backbone.family} model"
            )
        self.smooth, self.alpha_percentile = smooth, alpha_percentile

    def _linear(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor, Tensor]:
        """(encoded inputs, W(x)_target, logits): one forward and one backward in explanation mode."""
        model = self.backbone.model
        with torch.enable_grad(), explanation_mode(model):
            x = model.encode(self.backbone.normalize(images)).detach().requires_grad_(True)
            logits = model.forward_encoded(x)
            (weights,) = torch.autograd.grad(target.fixed(logits).score(logits).sum(), x)
        return x.detach(), weights, logits.detach()

    def _pool(self, contributions: Tensor) -> Tensor:
        """Pixel contributions ``[B, H, W]`` → their sum over each patch ``[B, gh, gw]``."""
        h, w = contributions.shape[-2:]
        gh, gw = self.backbone.grid_for((h, w))
        return F.adaptive_avg_pool2d(contributions[:, None], (gh, gw))[:, 0] * (h * w / (gh * gw))

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor, dict]:
        x, weights, logits = self._linear(images, target)
        contributions = (x * weights).sum(1)
        smooth = self.smooth or default_smooth(tuple(images.shape[-2:]))
        colour = colour_explanation(x, weights, int(smooth), float(self.alpha_percentile))
        extras = {"weights": weights, "contributions": contributions, "colour": colour}
        return self._pool(contributions), logits, extras
