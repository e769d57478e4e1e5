"""The gradient family: Grad-CAM on ViT tokens, Input×Gradient, Integrated Gradients and SmoothGrad.

Grad-CAM (Selvaraju et al., ICCV 2017) reads one layer's token activations, as pytorch-grad-cam does for
ViTs. The three pixel-attribution methods (Shrikumar et al. 2016 / Ancona et al. 2018; Sundararajan et
al., ICML 2017; Smilkov et al. 2017) differentiate the target logit with respect to the image in
``[0, 1]`` (the backbone normalises inside), as captum does for ``forward_func = backbone``; the
per-pixel attributions are summed over the colour channels and then over each patch
(:func:`pixels_to_grid`). Parameters never receive gradients (the base class freezes them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import Backbone, gaussian_blur
from ..errors import VitlensError
from .attention import block_index
from .base import Explainer, register
from .targets import Target


def pixels_to_grid(attr: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-pixel attributions ``[B, H, W]`` → patch-grid maps ``[B, gh, gw]``: the sum over each patch.

    When ``H, W`` are not multiples of the grid (odd sizes with ``dynamic_img_size``), each cell gets the
    mean over its adaptive-pooling bin times the mean patch area.
    """
    b, h, w = attr.shape
    gh, gw = grid
    if h % gh == 0 and w % gw == 0:
        return attr.reshape(b, gh, h // gh, gw, w // gw).sum((2, 4))
    return F.adaptive_avg_pool2d(attr[:, None], grid)[:, 0] * (h * w / (gh * gw))


def predicted_or_given(backbone: Backbone, images: Tensor, target: Target) -> tuple[Target, Tensor | None]:
    """The target with the predicted class filled in, and the clean logits when that took a forward pass
    (only the predicted class costs one)."""
    if target.is_function or target.classes is not None:
        return target, None
    with torch.no_grad():
        logits = backbone(images)
    return target.fixed(logits), logits


def weighted_input_gradients(
    backbone: Backbone,
    images: Tensor,
    target: Target,
    make: Callable[[Tensor, Tensor], Tensor],
    weights: Tensor,
    chunk: int,
) -> Tensor:
    """``Σ_s weights[s] · ∂ score / ∂x`` at the inputs ``make(s, i)``, for every image ``i``.

    The ``len(weights) × B`` inputs (sample-major, as captum expands them) run in chunks of ``chunk``
    images: no Python loop over samples or images, only over chunks. Returns ``[B, 3, H, W]``.
    """
    b = len(images)
    total = torch.zeros_like(images)
    for idx in torch.arange(len(weights) * b, device=images.device).split(chunk):
        s, i = idx.div(b, rounding_mode="floor"), idx % b
        x = make(s, i).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(target.subset(i).score(backbone(x)).sum(), x)
        total.index_add_(0, i, g * weights[s].view(-1, 1, 1, 1))
    return total


def positive_int(method: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise VitlensError(f"{method}: {name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(method: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise VitlensError(f"{method}: seed must be an integer, got {value!r}")


def non_negative(method: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise VitlensError(f"{method}: {name} must be a non-negative number, got {value!r}")
    return float(value)


@register
class GradCAM(Explainer):
    """Grad-CAM on the token activations ``A`` ``[T, D]`` of one layer, prefix tokens dropped.

    ``w_c`` = mean over the patch tokens of ``∂ logit_target / ∂A_c``; map = ``ReLU(Σ_c w_c A_c)`` per
    patch token — pytorch-grad-cam's ``GradCAM`` with a ``reshape_transform`` that drops the class,
    distillation and register tokens, without its min-max normalisation and resizing.

    The layer read is block ``layer``'s pre-attention LayerNorm (``backbone.attention_norm``), the target
    layer of pytorch-grad-cam's ViT tutorial (``model.blocks[-1].norm1``). Not the last block's output: a
    class-token head reads only the class token after the (per-token) final norm, so the gradient on the
    patch tokens there is exactly zero. On Swin, ``layer`` is a stage and only the last one is read: its
    last block's ``norm2``, pytorch-grad-cam's Swin target layer. The forward pass is cut at the chosen block
    (``run(grad_from=...)``), so the backward pass only goes through the blocks above it.

    Args:
        layer: the block whose pre-attention LayerNorm is read (negative counts from the end).
    """

    name = "gradcam"
    paper = "Selvaraju et al., Grad-CAM, ICCV 2017 (ViT tokens as in pytorch-grad-cam)"
    cost = "1 forward + 1 backward from the chosen block up"
    meaning = "patches whose features, weighted by the target's mean gradient, raise the target (ReLU)"

    def __init__(self, model, *, layer: int = -1):
        super().__init__(model)
        self.layer = layer
        self.block = block_index(self.name, "layer", int(layer) if isinstance(layer, np.integer) else layer,
                                 len(self.backbone.blocks))  # fmt: skip

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        with torch.enable_grad(), bb.capture_outputs({"a": bb.attention_norm(self.block)}) as found:
            trace = bb.run(images, grad_from=self.block)
        acts = found["a"]
        (grads,) = torch.autograd.grad(target.fixed(trace.logits).score(trace.logits).sum(), acts)
        p = trace.num_prefix_tokens
        weights = grads[:, p:].mean(1, keepdim=True)
        cam = (acts[:, p:].detach() * weights).sum(-1).clamp_min(0)
        return trace.to_grid(cam), trace.logits


@register
class InputXGradient(Explainer):
    """``x ⊙ ∂ score / ∂x`` for the image ``x`` in [0, 1], summed over channels (signed) and patches."""

    name = "inputxgrad"
    paper = "Shrikumar et al. 2016; Ancona et al., ICLR 2018 (Input x Gradient)"
    cost = "1 forward + 1 backward"
    scale = "signed"
    meaning = "first-order contribution of each patch's pixels to the target score (signed)"

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            logits = bb(x)
            (g,) = torch.autograd.grad(target.fixed(logits).score(logits).sum(), x)
        return pixels_to_grid((x.detach() * g).sum(1), bb.grid_for(tuple(images.shape[-2:]))), logits


@register
class IntegratedGradients(Explainer):
    """Integrated Gradients: ``(x − x') ⊙ ∫₀¹ ∂ logit_target / ∂x (x' + α(x − x')) dα``, summed over channels.

    The integral uses ``steps``-point Gauss–Legendre quadrature, captum's default ``method``
    ("gausslegendre"): exact for polynomials of degree ``2·steps − 1``, so the map sums to
    ``logit(x) − logit(x')`` far more closely than a Riemann sum with the same number of passes.
    ``baseline``: ``"black"`` (zeros in [0, 1]), ``"blur"`` (the image blurred with a Gaussian of
    ``blur_sigma`` pixels; default one patch width) or a tensor broadcastable to the images.
    The ``steps × B`` interpolated images run in chunks of ``internal_batch_size``.

    Args:
        steps: quadrature points of the path integral.
        baseline: ``"black"``, ``"blur"`` or a tensor broadcastable to the images (in [0, 1]).
        blur_sigma: σ in pixels of the ``"blur"`` baseline (default: one patch width).
        internal_batch_size: interpolated images per forward/backward pass.
    """

    name = "ig"
    paper = "Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017"
    cost = "steps (32) forward + backward, + 1 forward for the logits"
    scale = "signed"
    meaning = "each patch's share of the target score's change from the baseline image (signed, sums to it)"

    def __init__(
        self,
        model,
        *,
        steps: int = 32,
        baseline: str | Tensor = "black",
        blur_sigma: float | None = None,
        internal_batch_size: int = 64,
    ):
        super().__init__(model)
        self.steps = positive_int(self.name, "steps", steps)
        self.internal_batch_size = positive_int(self.name, "internal_batch_size", internal_batch_size)
        if not torch.is_tensor(baseline) and baseline not in ("black", "blur"):
            raise VitlensError(f"ig: baseline must be 'black', 'blur' or a tensor, got {baseline!r}")
        self.baseline = baseline
        self.blur_sigma = None if blur_sigma is None else non_negative(self.name, "blur_sigma", blur_sigma)

    def baseline_images(self, images: Tensor) -> Tensor:
        """The baseline image for every input, ``[B, 3, H, W]``."""
        base = self.baseline
        if torch.is_tensor(base):
            try:
                return base.to(images).expand_as(images)
            except RuntimeError:
                raise VitlensError(
                    f"ig: baseline of shape {tuple(base.shape)} does not fit images of shape {tuple(images.shape)}"
                ) from None
        if base == "black":
            return torch.zeros_like(images)
        sigma = self.blur_sigma
        return gaussian_blur(images, float(self.backbone.patch_size[0] if sigma is None else sigma))

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor | None]:
        bb = self.backbone
        t, logits = predicted_or_given(bb, images, target)
        base = self.baseline_images(images)
        delta = images - base
        nodes, weights = np.polynomial.legendre.leggauss(self.steps)
        alphas = torch.as_tensor(0.5 * (nodes + 1), dtype=images.dtype, device=images.device)
        weights = torch.as_tensor(0.5 * weights, dtype=images.dtype, device=images.device)

        def make(s: Tensor, i: Tensor) -> Tensor:
            return base[i] + alphas[s].view(-1, 1, 1, 1) * delta[i]

        with torch.enable_grad():
            grads = weighted_input_gradients(bb, images, t, make, weights, self.internal_batch_size)
        return pixels_to_grid((delta * grads).sum(1), bb.grid_for(tuple(images.shape[-2:]))), logits


@register
class SmoothGrad(Explainer):
    """SmoothGrad: the mean gradient of the target logit over ``n_samples`` noisy copies ``x + σ·ε``.

    ``σ = sigma · (max(x) − min(x))`` per image (the paper's noise level; default 0.15), ``ε ~ N(0, 1)``
    drawn on the CPU from ``torch.Generator().manual_seed(seed)`` with shape ``[n_samples, 3, H, W]`` and
    shared by every image of the batch, so a map depends only on its image and the seed (same on CPU and
    GPU). Noisy copies are not clipped to [0, 1] (as in captum's NoiseTunnel). The map is the absolute
    value of the mean gradient, summed over channels and patches: a magnitude, like the paper's maps.

    Args:
        n_samples: noisy copies per image.
        sigma: noise level as a fraction of each image's value range.
        seed: seed of the noise (the same noise for every image).
        internal_batch_size: noisy images per forward/backward pass.
    """

    name = "smoothgrad"
    paper = "Smilkov et al., SmoothGrad: removing noise by adding noise, 2017"
    cost = "n_samples (16) forward + backward, + 1 forward for the logits"
    meaning = "how sensitive the target score is to each patch's pixels, averaged over noisy copies"

    def __init__(
        self, model, *, n_samples: int = 16, sigma: float = 0.15, seed: int = 0, internal_batch_size: int = 64
    ):
        super().__init__(model)
        self.n_samples = positive_int(self.name, "n_samples", n_samples)
        self.internal_batch_size = positive_int(self.name, "internal_batch_size", internal_batch_size)
        self.sigma = non_negative(self.name, "sigma", sigma)
        check_seed(self.name, seed)
        self.seed = int(seed)

    def noise(self, shape: tuple[int, ...]) -> Tensor:
        """The standard-normal draws ``ε`` ``[n_samples, *shape]`` (CPU, seeded)."""
        return torch.randn((self.n_samples, *shape), generator=torch.Generator().manual_seed(self.seed))

    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor | None]:
        bb = self.backbone
        t, logits = predicted_or_given(bb, images, target)
        eps = self.noise(tuple(images.shape[1:])).to(images)
        flat = images.flatten(1)
        sigma = self.sigma * (flat.amax(1) - flat.amin(1))

        def make(s: Tensor, i: Tensor) -> Tensor:
            return images[i] + sigma[i].view(-1, 1, 1, 1) * eps[s]

        n = self.n_samples
        weights = torch.full((n,), 1.0 / n, dtype=images.dtype, device=images.device)
        with torch.enable_grad():
            grads = weighted_input_gradients(bb, images, t, make, weights, self.internal_batch_size)
        return pixels_to_grid(grads.abs().sum(1), bb.grid_for(tuple(images.shape[-2:]))), logits
