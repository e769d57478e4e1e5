"""Reading images from disk into float tensors in [0, 1] (one place for every command)."""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, UnidentifiedImageError

from ..errors import VitlensError

Image.MAX_IMAGE_PIXELS = 2**31  # PIL's own bomb check; ours below applies after JPEG draft decoding
MAX_PIXELS = 2**28  # ~268 megapixels decoded (0.8 GB as 8-bit RGB): the memory bound of one image
HIGH_DEPTH = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": None}
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


def _resample(im: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is None or im.size == (size[1], size[0]):
        return im
    return im.resize((size[1], size[0]), Image.Resampling.BILINEAR)  # = torch bilinear, antialias=True


TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation → the transposition that displays the image upright (as ImageOps.exif_transpose)


def _high_depth(im: Image.Image, size: tuple[int, int] | None, path) -> Image.Image:
    """16-bit / 32-bit integer and float grey images → a float (mode ``F``) image in [0, 1], resized in float.

    Integer modes are read as 16-bit (``value / 65535``); float images as [0, 1] when their values lie
    in it, else on PIL's 0..255 scale. Values outside the range are clipped. Integer images are resized
    before the conversion, so a large 16-bit image never exists as a full-resolution float array.
    """
    scale = HIGH_DEPTH[im.mode]
    if scale is not None and size is not None:
        # PIL resizes 16/32-bit integer images itself (to within 1e-5 of float); Pillow < 11 cannot resize
        # 16-bit ones bilinearly ("image has wrong mode"), so there they are widened to 32 bits first
        try:
            im = _resample(im, size)
        except ValueError:
            im = _resample(Image.fromarray(np.asarray(im, dtype=np.int32)), size)
    arr = np.asarray(im, dtype=np.float32)
    if scale is None:
        if not np.isfinite(arr).all():
            raise VitlensError(f"{path}: image contains NaN or Inf values")
        scale = 1.0 if arr.size == 0 or float(arr.max()) <= 1.0 else 255.0
    return _resample(Image.fromarray(np.clip(arr / scale, 0.0, 1.0), mode="F"), size)


def _decode(im: Image.Image, size: tuple[int, int] | None, path) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an opened image: ``([H, W, 3] uint8 or [H, W] float32, original (H, W) after EXIF orientation)``.

    Resizing happens before the colour conversion and the EXIF transposition (both commute with it), so
    only the decoded image itself ever exists at full resolution.
    """
    w, h = im.size
    if size is not None:
        side = max(size)
        im.draft(None, (side, side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below ``size``
    if im.width * im.height > MAX_PIXELS:
        raise VitlensError(f"{path}: image too large ({im.width}×{im.height} pixels; at most {MAX_PIXELS} decoded)")
    opened = im.getexif().get(ExifTags.Base.Orientation, 1)
    im.load()
    # The orientation still to apply (PIL's TIFF reader applies it while loading and drops the tag).
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation != opened:  # applied while loading: Pillow < 11 reported the stored size until then
        w, h = im.size
    turned = orientation in (5, 6, 7, 8)  # rotated by 90° on display
    original = (w, h) if turned else (h, w)
    if size is not None and turned:
        size = (size[1], size[0])
    if im.mode in HIGH_DEPTH:
        im = _high_depth(im, size, path)
    else:
        alpha = im.mode in ALPHA or "transparency" in im.info
        if alpha or im.mode not in ("L", "RGB"):  # palette, CMYK, bilevel, …: to RGB(A) before resampling
            im = im.convert("RGBA" if alpha else "RGB")
        im = _resample(im, size)
        if alpha:  # composite on black
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
        im = im.convert("RGB")
    if orientation in TRANSPOSE:
        im = im.transpose(TRANSPOSE[orientation])
    return np.array(im, dtype=np.float32 if im.mode == "F" else np.uint8), original


def read_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`load_image` plus the image's own size ``(H, W)`` on disk (after EXIF orientation)."""
    if (
        isinstance(path, str | os.PathLike)
        and os.path.exists(path)
        and not os.path.isdir(path)
        and not os.path.isfile(path)
    ):
        raise VitlensError(f"{path}: not a regular file")  # a FIFO or device would block or never end
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore")  # PIL warns about corrupt metadata; the file is still read or refused
            arr, original = _decode(im, size, path)
    except VitlensError:
        raise
    except FileNotFoundError as e:
        raise VitlensError(f"{path}: no such file") from e
    except IsADirectoryError as e:
        raise VitlensError(f"{path}: is a directory, not an image") from e
    except PermissionError as e:
        raise VitlensError(f"{path}: permission denied") from e
    except UnidentifiedImageError as e:
        raise VitlensError(f"{path}: not an image (PIL cannot identify it)") from e
    except Image.DecompressionBombError as e:
        raise VitlensError(f"{path}: image too large ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as e:  # corrupt data
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitlensError(f"{path}: cannot decode image ({first})") from e
    if arr.ndim == 2:  # grey, high bit depth: already in [0, 1]
        return torch.from_numpy(arr).expand(3, -1, -1).clone(), original
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255), original


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Any PIL-readable file → ``[3, H, W]`` float in [0, 1]; EXIF orientation applied.

    Grey, palette, 16-bit, float and alpha images are converted to RGB (alpha composited on black;
    16-bit values scaled by 1/65535, never clipped at 255). With ``size`` the image is resized
    (bilinear, antialiased) while still decoded at 8 or 16 bits in PIL, and JPEGs are decoded at a
    reduced scale, so a large photograph never exists as a full-resolution float tensor. A file that
    cannot be read raises :class:`VitlensError` naming it.
    """
    return read_image(path, size)[0]


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an image suffix (how folders are scanned for images)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, 3, H, W]`` images (bilinear, antialiased) if they are not ``size`` already."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
