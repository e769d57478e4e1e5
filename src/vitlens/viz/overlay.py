"""Explanation overlays: the image, the map in a perceptually uniform colour map, boxes and a caption.

The one place where maps are drawn: ``vitlens explain``, the demo and the HTML report all use it, so
every picture has the same style — the map upsampled with the shared bilinear upsampler, coloured with
``inferno`` (perceptually uniform, readable in grey scale), opacity growing with the map value so that
low-evidence regions show the image, ground-truth boxes green and predicted (WSOL) boxes cyan.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..backbones import upsample
from ..errors import VitlensError
from ..io import atomic_write
from .colormaps import apply_colormap

GT_COLOUR = (80, 230, 120)
PRED_COLOUR = (60, 200, 255)
BACKGROUND = (24, 24, 28)
SCALES = ("minmax", "probability", "positive")
# How a method's values map to colours: probabilities keep their absolute scale (0 → 1), signed linear
# contributions show their positive part relative to the largest; everything else is min-max normalised.
METHOD_SCALES = {"pm": "probability", "diffmask": "probability", "bcos": "positive"}


def scale_for(method: str) -> str:
    """The display scale of ``method``'s maps (see :data:`METHOD_SCALES`)."""
    return METHOD_SCALES.get(method, "minmax")


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def normalise_for_display(m: torch.Tensor, scale: str = "minmax") -> torch.Tensor:
    """Map values → [0, 1] for colouring: min-max per map, clamped as is (probabilities), or the positive
    part divided by the maximum (signed contributions)."""
    if scale not in SCALES:
        raise VitlensError(f"unknown display scale {scale!r} (known: {', '.join(SCALES)})")
    if scale == "probability":
        return m.clamp(0, 1)
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
    size: int = 256,
    cmap: str = "inferno",
    scale: str = "minmax",
) -> Image.Image:
    """One picture: ``image`` [3, H, W] in [0, 1] under ``heat`` [gh, gw] (upsampled bilinearly).

    The map, brought to [0, 1] by ``scale`` (:func:`normalise_for_display`), is coloured with ``cmap``
    at an opacity of ``0.85 · value`` over the slightly dimmed image. Ground-truth ``boxes`` are green,
    predicted (WSOL) ``pred_boxes`` cyan (inclusive pixel corners of the image); ``title`` goes in a
    caption bar underneath. The longer side of the picture is ``size`` pixels.
    """
    h, w = image.shape[-2:]
    factor = size / max(h, w)
    out_h, out_w = round(h * factor), round(w * factor)
    img = torch.nn.functional.interpolate(image[None].float().cpu(), size=(out_h, out_w), mode="bilinear")[0]
    m = normalise_for_display(upsample(heat[None].float().cpu(), (out_h, out_w))[0], scale)
    colours = torch.from_numpy(apply_colormap(m.numpy(), cmap)).permute(2, 0, 1).float()
    alpha = 0.85 * m
    blended = (1 - alpha) * 0.8 * img.clamp(0, 1) + alpha * colours
    pic = Image.fromarray((blended.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    draw_boxes(draw, boxes, GT_COLOUR, factor)
    draw_boxes(draw, pred_boxes, PRED_COLOUR, factor)
    return captioned(pic, title) if title else pic


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
