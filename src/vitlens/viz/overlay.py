"""Explanation overlays: the image, the map in a perceptually uniform colour map, boxes and a caption.

The one place where maps are drawn: ``vitlens explain``, ``Explanation.overlay``, ``vitlens.show``, the demo
and the HTML report all use it, so every picture has the same style — the map upsampled with the shared
bilinear upsampler to the image's own resolution (aspect kept), coloured with ``inferno`` (perceptually
uniform, readable in grey scale) or, for signed maps, a diverging map centred at 0 (red positive, blue
negative), opacity growing with the map's magnitude so that low-evidence regions show the image,
ground-truth boxes green and predicted (WSOL) boxes cyan. A constant map is labelled as such, not drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..backbones import upsample
from ..errors import VitlensError
from ..explainers import EXPLAINERS
from ..explainers.explanation import SCALES
from ..io import atomic_write
from .colormaps import apply_colormap

GT_COLOUR = (80, 230, 120)
PRED_COLOUR = (60, 200, 255)
BACKGROUND = (24, 24, 28)
DIVERGING = "RdBu_r"


def scale_for(method: str) -> str:
    """The display scale of ``method``'s maps (the explainer's ``scale``; ``minmax`` for unknown names)."""
    return EXPLAINERS[method].scale if method in EXPLAINERS else "minmax"


def is_constant(m: torch.Tensor) -> bool:
    """Whether a map is constant (no evidence anywhere), as :attr:`Explanation.degenerate` decides."""
    lo, hi = float(m.min()), float(m.max())
    return hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1e-30)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def normalise_for_display(m: torch.Tensor, scale: str = "minmax") -> torch.Tensor:
    """Map values → [0, 1] for colouring (``[-1, 1]`` for ``signed``): min-max per map, clamped as is
    (probabilities), the positive part divided by the maximum, or divided by the largest magnitude."""
    if scale not in SCALES:
        raise VitlensError(f"unknown display scale {scale!r} (known: {', '.join(SCALES)})")
    if scale == "probability":
        return m.clamp(0, 1)
    if scale == "signed":
        top = m.abs().max()
        return m / top if top > 0 else torch.zeros_like(m)
    if scale == "positive":
        hi = m.max()
        return (m / hi).clamp(0, 1) if hi > 0 else torch.zeros_like(m)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def draw_boxes(draw: ImageDraw.ImageDraw, boxes: Sequence[Sequence[float]], colour, scale: float) -> None:
    """Inclusive pixel boxes ``(x0, y0, x1, y1)`` at ``scale``, with a dark rim so they read on any map."""
    width = max(2, round(scale / 2)) if scale >= 2 else 1
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b)
        rect = [x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1]
        draw.rectangle([rect[0] - 1, rect[1] - 1, rect[2] + 1, rect[3] + 1], outline=(0, 0, 0), width=width + 2)
        draw.rectangle(rect, outline=colour, width=width)


def overlay(
    image: torch.Tensor,
    heat: torch.Tensor,
    *,
    title: str = "",
    boxes: Sequence[Sequence[float]] = (),
    pred_boxes: Sequence[Sequence[float]] = (),
    size: int | None = None,
    cmap: str | None = None,
    scale: str = "minmax",
) -> Image.Image:
    """One picture: ``image`` [3, H, W] in [0, 1] (any resolution) under ``heat`` [gh, gw] (upsampled bilinearly).

    The map, brought to [0, 1] by ``scale`` (:func:`normalise_for_display`), is coloured with ``cmap``
    (default ``inferno``; a diverging map centred at 0 for ``signed``) at an opacity of ``0.85 · |value|``
    over the slightly dimmed image. A constant map is not coloured: the picture says so. Ground-truth
    ``boxes`` are green, predicted (WSOL) ``pred_boxes`` cyan (inclusive pixel corners of the image);
    ``title`` goes in a caption bar underneath. The longer side of the picture is ``size`` pixels (default:
    the image's own, at least 256 and at most 2048), the image's aspect kept.
    """
    h, w = image.shape[-2:]
    size = size or min(max(h, w, 256), 2048)
    factor = size / max(h, w)
    out_h, out_w = round(h * factor), round(w * factor)
    img = torch.nn.functional.interpolate(image[None].float().cpu(), size=(out_h, out_w), mode="bilinear")[0]
    constant = is_constant(heat)
    m = normalise_for_display(upsample(heat[None].float().cpu(), (out_h, out_w))[0], scale)
    if scale == "signed":
        colours = colour_lookup(cmap or DIVERGING, (m + 1) / 2)
    else:
        colours = colour_lookup(cmap or "inferno", m)
    alpha = torch.zeros_like(m) if constant else 0.85 * m.abs()
    blended = (1 - alpha) * 0.8 * img.clamp(0, 1) + alpha * colours
    pic = Image.fromarray((blended.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    draw_boxes(draw, boxes, GT_COLOUR, factor)
    draw_boxes(draw, pred_boxes, PRED_COLOUR, factor)
    if constant:
        note = "constant map: no evidence"
        draw.text((out_w / 2, out_h / 2), note, fill=(255, 255, 255), font=font(max(10, out_w // 16)),
                  anchor="mm", stroke_width=2, stroke_fill=(0, 0, 0))  # fmt: skip
    return captioned(pic, title) if title else pic


def colour_lookup(cmap: str, values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] ``[H, W]`` → RGB ``[3, H, W]`` through the colour map ``cmap``."""
    return torch.from_numpy(apply_colormap(values.numpy(), cmap)).permute(2, 0, 1).float()


def explanation_overlays(explanation, images: torch.Tensor | None, *, size: int | None = None, title: bool = True):
    """Every map of an :class:`~vitlens.Explanation` over its image: ``B`` pictures (``B × K``, image-major)."""
    if images is None:
        raise ValueError("overlay() needs the images: this explanation keeps none")
    if len(images) != len(explanation):
        raise VitlensError(f"got {len(images)} images for an explanation of {len(explanation)}")
    pictures = []
    for i in range(len(explanation)):
        maps = explanation.maps[i] if explanation.multi_target else explanation.maps[i][None]
        names = explanation.class_names[i] if explanation.multi_target else [explanation.class_names[i]]
        for m, name in zip(maps, names, strict=True):
            caption = f"{explanation.method} · {name}" if title else ""
            pictures.append(overlay(images[i], m.cpu(), title=caption, size=size, scale=explanation.scale))
    return pictures


def plain(image: torch.Tensor, *, boxes: Sequence[Sequence[float]] = (), size: int = 256) -> Image.Image:
    """The image alone at the overlays' size, with its ground-truth boxes."""
    h, w = image.shape[-2:]
    factor = size / max(h, w)
    img = torch.nn.functional.interpolate(image[None].float().cpu(), size=(round(h * factor), round(w * factor)))
    pic = Image.fromarray((img[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw_boxes(ImageDraw.Draw(pic), boxes, GT_COLOUR, factor)
    return pic


def on_background(rgba: Image.Image, colour=BACKGROUND) -> Image.Image:
    """An RGBA picture (e.g. the B-cos colour explanation) composited on the dark background."""
    base = Image.new("RGBA", rgba.size, (*colour, 255))
    return Image.alpha_composite(base, rgba.convert("RGBA")).convert("RGB")


def captioned(pic: Image.Image, title: str) -> Image.Image:
    """``pic`` with ``title`` in a caption bar underneath."""
    w, h = pic.size
    bar = max(18, w // 12)
    canvas = Image.new("RGB", (w, h + bar), BACKGROUND)
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text(
        (6, h + bar // 2), title, fill=(235, 235, 235), font=font(max(11, w // 18)), anchor="lm"
    )
    return canvas


def save_png(picture: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
