"""Reading images from disk into float tensors in [0, 1] (one place for every command)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import VitlensError

Image.MAX_IMAGE_PIXELS = 2**31  # large photographs are fine; they are resized right away


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any PIL-readable file → ``[3, H, W]`` float in [0, 1]; EXIF orientation applied.

    Grey, palette, 16-bit and alpha images are converted to RGB (alpha composited on black). With
    ``size`` the image is resized (bilinear, antialiased) while still in PIL, so memory stays bounded.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                im = Image.fromarray(np.clip(arr / max(float(arr.max()), 1.0) * 255, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                black = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(black, im)
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError as e:
        raise VitlensError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise VitlensError(f"{path}: is a directory, not an image") from e
    except UnidentifiedImageError as e:
        raise VitlensError(f"{path}: not an image (PIL cannot identify it)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise VitlensError(f"{path}: cannot decode image ({e})") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` images (bilinear, antialiased) if they are not ``size`` already."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
