"""Explanation overlays: the image, the map in a perceptually uniform colour map, boxes and a caption."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from ..backbones import upsample
from ..io import atomic_write

GT_COLOUR = (80, 230, 120)
PRED_COLOUR = (90, 170, 255)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def normalise_for_display(m: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Map values → [0, 1] for colouring: min-max per map, or clamped as is for probabilities."""
    if absolute:
        return m.clamp(0, 1)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def overlay(
    image: torch.Tensor,
    heat: torch.Tensor,
    *,
    title: str = "",
    boxes: Sequence[Sequence[float]] = (),
    pred_boxes: Sequence[Sequence[float]] = (),
    size: int = 256,
    cmap: str = "inferno",
    absolute: bool = False,
) -> Image.Image:
    """One picture: ``image`` [3, H, W] in [0, 1] under ``heat`` [gh, gw] (upsampled bilinearly).

    Opacity follows the map (0.15 → 0.75), so low-evidence regions keep showing the image. Ground-truth
    boxes are green, predicted (WSOL) boxes blue; ``title`` goes in a caption bar underneath.
    """
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    out_h, out_w = round(h * scale), round(w * scale)
    img = torch.nn.functional.interpolate(image[None].float().cpu(), size=(out_h, out_w), mode="bilinear")[0]
    m = normalise_for_display(upsample(heat[None].float().cpu(), (out_h, out_w))[0], absolute)
    colours = torch.from_numpy(colormaps[cmap](m.numpy())[..., :3]).permute(2, 0, 1).float()
    alpha = 0.15 + 0.6 * m
    blended = (1 - alpha) * img.clamp(0, 1) + alpha * colours
    pic = Image.fromarray((blended.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for colour, group in ((GT_COLOUR, boxes), (PRED_COLOUR, pred_boxes)):
        for b in group:
            x0, y0, x1, y1 = (float(v) for v in b)
            draw.rectangle(
                [x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1], outline=colour, width=2
            )
    if not title:
        return pic
    font = _font(max(11, size // 18))
    bar = max(18, size // 12)
    canvas = Image.new("RGB", (out_w, out_h + bar), (24, 24, 28))
    canvas.paste(pic, (0, 0))
    ImageDraw.Draw(canvas).text((6, out_h + bar // 2), title, fill=(235, 235, 235), font=font, anchor="lm")
    return canvas


def save_png(picture: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
