"""The perturbation family: RISE (Petsiuk et al., BMVC 2018) and patch occlusion (Zeiler & Fergus 2014).

Both hide parts of the image in pixel space and watch the softmax probability of the target class.
Hidden pixels take the value of a ``fill`` image: ``"mean"`` (default: the model's normalisation mean
colour, i.e. zero after normalisation — what RISE's reference code does by multiplying the normalised
input with the mask, and captum's default baseline of 0 on a normalised input), ``"image-mean"`` (each
image's own mean colour), ``"black"`` (0), ``"blur"`` (the image blurred with σ = one patch width), a
number, or a tensor broadcastable to the images. The fill matters: a fill the model never saw can
dominate the probability change (with a partly trained fashion-vit, whose normalisation mean is a grey
that fashion canvases never show, ``"image-mean"`` or ``"blur"`` gave far sharper occlusion maps; on the
counting task only the grey, a non-target colour, is neutral). Masks are aligned to the patch grid, so a patch is either
seen or hidden.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import Backbone, gaussian_blur
from ..errors import VitlensError
from .base import Explainer, register
from .gradients import check_seed, positive_int, predicted_or_given
from .targets import Target

FILLS = ("mean", "image-mean", "black", "blur")
MAX_MASKS = 100_000  # RISE's masks for one batch are drawn at once (100,000 × a 14×14 grid: 78 MB)


def check_fill(method: str, fill) -> None:
    if torch.is_tensor(fill) or (isinstance(fill, str) and fill in FILLS):
        return
    if isinstance(fill, bool) or not isinstance(fill, int | float) or not math.isfinite(fill):
        raise VitlensError(f"{method}: fill must be one of {', '.join(FILLS)}, a number or a tensor, got {fill!r}")


def fill_image(backbone: Backbone, images: Tensor, fill) -> Tensor:
    """The values hidden pixels take (see the module docstring), as a 4-D tensor that broadcasts to the
    images ``[B, 3, H, W]`` without being expanded: ``[1, 3, 1, 1]`` for a colour, ``[B, 3, 1, 1]`` for each
    image's mean, ``[B, 3, H, W]`` for the blurred images."""
    if torch.is_tensor(fill):
        value = fill.to(images)
    elif fill == "blur":
        return gaussian_blur(images, float(backbone.patch_size[0]))
    elif fill == "mean":
        value = backbone.mean.to(images)
    elif fill == "image-mean":
        value = images.mean((2, 3), keepdim=True)
    else:
        value = torch.tensor(0.0 if fill == "black" else float(fill)).to(images)
    try:
        value.expand_as(images)
    except RuntimeError:
        raise VitlensError(
            f"fill of shape {tuple(value.shape)} does not fit images of shape {tuple(images.shape)}"
        ) from None
    return value.reshape((1,) * (4 - value.ndim) + tuple(value.shape))


def grid_to_pixels(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch-grid masks ``[K, gh, gw]`` → pixel masks ``[K, 1, H, W]`` (each patch's pixels take its value)."""
    return F.interpolate(masks[:, None], size=size, mode="nearest")


def keep_patches(images: Tensor, fill: Tensor, i: Tensor, keep: Tensor) -> Tensor:
    """``images[i]`` with every patch where the binary grid mask ``keep`` ``[K, gh, gw]`` is 0 taken from
    ``fill[i]`` (a :func:`fill_image` tensor): ``images[i] · M + fill[i] · (1 − M)`` for the pixel masks M.

    When the image is a whole number of patches, the masks select per patch on a ``[K, 3, gh, ph, gw, pw]``
    view: no pixel masks are built and every pixel is written once.
    """
    x = images[i]
    f = fill if fill.shape[0] == 1 else fill[i]
    (k, c, h, w), (gh, gw) = x.shape, keep.shape[-2:]
    if h % gh or w % gw:  # odd sizes (dynamic_img_size): nearest-neighbour pixel masks
        return torch.where(grid_to_pixels(keep, (h, w)) > 0, x, f)
    ph, pw = h // gh, w // gw
    if f.shape[-2:] != (1, 1):
        f = f.expand(f.shape[0], c, h, w).reshape(f.shape[0], c, gh, ph, gw, pw)
    else:
        f = f.reshape(f.shape[0], f.shape[1], 1, 1, 1, 1)
    mask = keep.reshape(k, 1, gh, 1, gw, 1) > 0
    return torch.where(mask, x.view(k, c, gh, ph, gw, pw), f).view(k, c, h, w)


@register
class RISE(Explainer):
    """RISE: ``map = Σ_m P_target(x ⊙ M_m + fill ⊙ (1 − M_m)) · M_m / (n_masks · p)`` on the patch grid.

    Default (``smooth=False``): each mask ``M_m`` is a binary patch-grid mask keeping each patch with
    probability ``p`` — on a ViT the patch is the unit the model sees, so hiding whole patches removes
    exactly their tokens' content and the map needs no pooling. ``smooth=True`` uses Petsiuk et al.'s
    masks: a binary grid of the same size upsampled bilinearly to ``(g + 1)`` cells and cropped at a
    random shift of up to one cell; the map then weights each patch by its mean mask value. Masks come
    from ``torch.Generator().manual_seed(seed)`` on the CPU and are shared by every image of the batch,
    so a map depends only on its image and the seed. The ``n_masks × B`` masked images run in chunks
    of ``internal_batch_size``. With a score function as the target, its value replaces the probability.

    Args:
        n_masks: random masks per image (at most 100,000).
        p: probability that a patch is kept in a mask.
        seed: seed of the masks (the same masks for every image).
        smooth: Petsiuk et al.'s smooth, shifted masks instead of binary patch masks.
        fill: what hidden pixels show: "mean", "image-mean", "black", "blur", a number or a tensor.
        internal_batch_size: masked images per forward pass.
    """

    name = "rise"
    paper = "Petsiuk, Das, Saenko, RISE: Randomized Input Sampling for Explanation, BMVC 2018"
    cost = "n_masks (1000) forward, + 1 forward for the logits"
    meaning = "the target's expected probability when each patch is visible (random masking)"

    def __init__(
        self,
        model,
        *,
        n_masks: int = 1000,
        p: float = 0.5,
        seed: int = 0,
        smooth: bool = False,
        fill: str | float | Tensor = "mean",
        internal_batch_size: int = 128,
    ):
        super().__init__(model)
        self.n_masks = positive_int(self.name, "n_masks", n_masks)
        if self.n_masks > MAX_MASKS:  # the masks are drawn at once: bound their memory before allocating
            raise VitlensError(f"rise: n_masks must be at most {MAX_MASKS:,}, got {n_masks}")
        self.internal_batch_size = positive_int(self.name, "internal_batch_size", internal_batch_size)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise VitlensError(f"rise: p (the keep probability) must be in (0, 1], got {p!r}")
        self.p = float(p)
        check_seed(self.name, seed)
        self.seed = int(seed)
        if not isinstance(smooth, bool):
            raise VitlensError(f"rise: smooth must be True or False, got {smooth!r}")
        self.smooth = smooth
        check_fill(self.name, fill)
        self.fill = fill

    def masks(self, grid: tuple[int, int], size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """The binary grids ``[n_masks, gh, gw]`` and, for ``smooth``, the shifts ``[n_masks, 2]`` (CPU)."""
        gen = torch.Generator().manual_seed(self.seed)
        cells = (torch.rand(self.n_masks, *grid, generator=gen) < self.p).float()
        if not self.smooth:
            return cells, None
        cell = [math.ceil(s / g) for s, g in zip(size, grid, strict=True)]
        shifts = torch.stack([torch.randint(0, c, (self.n_masks,), generator=gen) for c in cell], 1)
        return cells, shifts

    def pixel_masks(self, cells: Tensor, shifts: Tensor, size: tuple[int, int]) -> Tensor:
        """Grids ``[K, gh, gw]`` and shifts → the smooth pixel masks ``[K, 1, H, W]`` (``smooth=True``)."""
        (gh, gw), (h, w) = cells.shape[1:], size
        up = (math.ceil(h / gh) * (gh + 1), math.ceil(w / gw) * (gw + 1))
        big = F.interpolate(cells[:, None], size=up, mode="bilinear", align_corners=False)[:, 0]
        rows = shifts[:, 0, None] + torch.arange(h, device=cells.device)
        cols = shifts[:, 1, None] + torch.arange(w, device=cells.device)
        k = torch.arange(len(cells), device=cells.device)
        return big[k[:, None, None], rows[:, :, None], cols[:, None, :]][:, None]

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor | None]:
        bb = self.backbone
        b, size = len(images), tuple(images.shape[-2:])
        grid = bb.grid_for(size)
        t, logits = predicted_or_given(bb, images, target)
        fill = fill_image(bb, images, self.fill)
        cells, shifts = self.masks(grid, size)
        cells = cells.to(images)
        shifts = shifts.to(images.device) if shifts is not None else None
        saliency = images.new_zeros(b, *grid)
        for idx in torch.arange(self.n_masks * b, device=images.device).split(self.internal_batch_size):
            m, i = idx.div(b, rounding_mode="floor"), idx % b
            if shifts is None:  # binary patch masks
                x, weight = keep_patches(images, fill, i, cells[m]), cells[m]
            else:
                pix = self.pixel_masks(cells[m], shifts[m], size)
                x = images[i] * pix + (fill if fill.shape[0] == 1 else fill[i]) * (1 - pix)
                weight = F.adaptive_avg_pool2d(pix, grid)[:, 0]
            saliency.index_add_(0, i, t.subset(i).probability(bb(x)).view(-1, 1, 1) * weight)
        return saliency / (self.n_masks * self.p), logits


@register
class Occlusion(Explainer):
    """Patch occlusion: the drop in the target's softmax probability when a patch is hidden.

    A ``window × window``-patch square slides over the patch grid with a stride of one patch and is
    replaced by ``fill``; each patch gets the mean drop over the windows that cover it (captum's
    ``Occlusion`` with ``sliding_window_shapes = (3, window·p, window·p)`` and ``strides = (3, p, p)``).
    The windows × B occluded images run in chunks of ``internal_batch_size``. With a score function as
    the target, the drop in its value replaces the drop in probability.

    Args:
        window: side of the occluded square, in patches.
        fill: what hidden pixels show: "mean", "image-mean", "black", "blur", a number or a tensor.
        internal_batch_size: occluded images per forward pass.
    """

    name = "occlusion"
    paper = "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014 (patch-aligned)"
    cost = "1 + (gh - window + 1)(gw - window + 1) forward (window 1: 1 + patches)"
    scale = "signed"
    meaning = "how much the target's probability drops when the patch is hidden (signed)"

    def __init__(self, model, *, window: int = 1, fill: str | float | Tensor = "mean", internal_batch_size: int = 128):
        super().__init__(model)
        self.window = positive_int(self.name, "window", window)
        self.internal_batch_size = positive_int(self.name, "internal_batch_size", internal_batch_size)
        check_fill(self.name, fill)
        self.fill = fill

    def windows(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """One patch-grid mask per window position, ``[P, gh, gw]`` (row-major positions)."""
        k, (gh, gw) = self.window, grid
        if k > min(gh, gw):
            raise VitlensError(f"occlusion: window={k} patches does not fit the {gh}x{gw} patch grid")
        n = (gh - k + 1) * (gw - k + 1)
        corners = torch.eye(n, device=device).view(n, 1, gh - k + 1, gw - k + 1)
        return F.conv_transpose2d(corners, torch.ones(1, 1, k, k, device=device))[:, 0]

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        b, size = len(images), tuple(images.shape[-2:])
        grid = bb.grid_for(size)
        windows = self.windows(grid, images.device).to(images)
        logits = bb(images)
        t = target.fixed(logits)
        base = t.probability(logits)
        fill = fill_image(bb, images, self.fill)
        drops = images.new_zeros(b, len(windows))
        for idx in torch.arange(len(windows) * b, device=images.device).split(self.internal_batch_size):
            w, i = idx.div(b, rounding_mode="floor"), idx % b
            hidden = keep_patches(images, fill, i, 1 - windows[w])
            drops[i, w] = (base[i] - t.subset(i).probability(bb(hidden))).to(drops)
        return torch.einsum("bp,phw->bhw", drops, windows) / windows.sum(0), logits
