"""Fashion-MNIST and the data sets built from it: ``fashion-canvas`` and ``fashion-grid``."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import VitlensError

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("VITLENS_CACHE", Path.home() / ".cache" / "vitlens"))


def _search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("VITLENS_DATA"):
        root = Path(os.environ["VITLENS_DATA"])
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs += [Path(DEBIAN_DIR), cache_dir() / "fashion-mnist", cache_dir() / "FashionMNIST" / "raw"]
    return dirs


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _download() -> Path:
    """Fetch Fashion-MNIST through torchvision into the cache (needs a network)."""
    from torchvision.datasets import FashionMNIST

    root = cache_dir()
    for train in (True, False):
        FashionMNIST(root, train=train, download=True)
    return root / "FashionMNIST" / "raw"


@lru_cache(maxsize=2)
def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train" / "test") → (images uint8 [N, 28, 28], labels int64 [N]).

    Looked up in ``$VITLENS_DATA``, Debian's ``dataset-fashion-mnist``, the vitlens cache, and
    finally downloaded through torchvision when a network is available.
    """
    if split not in FILES:
        raise VitlensError(f"Fashion-MNIST has no split {split!r} (use train or test)")
    images_name, labels_name = FILES[split]
    for d in _search_dirs():
        if (d / images_name).is_file() and (d / labels_name).is_file():
            break
    else:
        try:
            d = _download()
        except Exception as e:  # no network, proxy, disk: all mean "not available"
            raise VitlensError(
                "Fashion-MNIST not found: install Debian's dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist), set VITLENS_DATA to a folder with the *-ubyte.gz "
                f"files, or allow torchvision to download it ({type(e).__name__})"
            ) from e
    images, labels = _read_idx(d / images_name), _read_idx(d / labels_name)
    return images, labels.astype(np.int64)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    low = torch.from_numpy(rng.standard_normal((1, 3, cells, cells)).astype(np.float32))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0].numpy()


def render_canvas(
    item: np.ndarray, rng: np.random.Generator, size: int = 64, item_size: tuple[int, int] = (20, 36)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste one Fashion-MNIST item, rescaled and tinted, on a dark textured canvas.

    Returns (image float32 [3, S, S] in [0, 1], mask bool [S, S], box [x0, y0, x1, y1] inclusive).
    """
    base = rng.uniform(0.05, 0.35, size=3).astype(np.float32)
    amp = rng.uniform(0.04, 0.10)
    canvas = base[:, None, None] + amp * (_smooth_noise(rng, size, 8) + 0.5 * _smooth_noise(rng, size, 24))
    s = int(rng.integers(item_size[0], item_size[1] + 1))
    grey = np.asarray(Image.fromarray(item).resize((s, s), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    alpha = np.clip(grey * 1.6, 0, 1)
    colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.75, 1.0))
    fg = colour[:, None, None] * (0.55 + 0.45 * grey)[None]
    y, x = (int(v) for v in rng.integers(0, size - s + 1, size=2))
    region = canvas[:, y : y + s, x : x + s]
    canvas[:, y : y + s, x : x + s] = (1 - alpha) * region + alpha * fg
    mask = np.zeros((size, size), dtype=bool)
    mask[y : y + s, x : x + s] = alpha > 0.1
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    return np.clip(canvas, 0, 1), mask, box


class FashionCanvas(torch.utils.data.Dataset):
    """One Fashion-MNIST item per canvas, at a random place, scale and tint; class, mask and box known.

    Sample ``i`` is the ``i``-th item of the Fashion-MNIST split (cycled if ``n`` is larger) and is
    generated from ``(seed, i)`` alone, so the data set is deterministic and order-independent. Images
    are quantised to 8 bits like real ones; rendered samples are kept in memory (about 16 kB each at
    64 px, up to :attr:`cache_bytes` in all; larger canvases beyond it are rendered again when read) so
    later epochs cost nothing.
    """

    cache_bytes = 1 << 30  # the whole 60,000-image training split at 64 px fits

    name = "fashion-canvas"
    classes = CLASSES

    def __init__(self, split: str = "train", n: int | None = None, seed: int = 0, size: int = 64):
        self.split, self.seed, self.size = split, int(seed), int(size)
        self.items, self.item_labels = load_fashion_mnist(split)
        self.n = len(self.items) if n is None else int(n)
        if self.n <= 0:
            raise VitlensError(f"fashion-canvas needs n >= 1, got {self.n}")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._cached = 0  # bytes held by the cache

    def labelled_indices(self) -> range:
        """Every image carries its mask and boxes."""
        return range(self.n)

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        return int(self.item_labels[i % len(self.items)])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        sample = self._cache.get(i)
        if sample is None:
            rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, i])
            image, mask, box = render_canvas(self.items[i % len(self.items)], rng, self.size)
            sample = (np.round(image * 255).astype(np.uint8), mask, box)
            size = sum(a.nbytes for a in sample)
            if self._cached + size <= self.cache_bytes:
                self._cache[i] = sample
                self._cached += size
        image, mask, box = sample
        return {
            "image": torch.from_numpy(image).float().div_(255),
            "label": self.label(i),
            "mask": torch.from_numpy(mask),
            "boxes": torch.from_numpy(box)[None],
            "index": i,
        }


def compose_grid(images: torch.Tensor, masks: torch.Tensor, grid: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile groups of ``grid²`` images, each shrunk to one cell, into images of the same size (row-major).

    ``images`` ``[N, 3, S, S]`` and ``masks`` ``[N, S, S]`` → ``[N / grid², 3, S, S]`` and the per-object
    masks ``[N / grid², grid², S, S]`` (object k's mask in its cell, empty elsewhere).
    """
    k, size = grid**2, images.shape[-1]
    cell = size // grid
    small = F.interpolate(images, size=(cell, cell), mode="area")
    small_masks = F.interpolate(masks[:, None].float(), size=(cell, cell), mode="area")[:, 0] > 0.5
    tiled = images.new_zeros(len(images) // k, 3, size, size)
    object_masks = torch.zeros(len(images) // k, k, size, size, dtype=torch.bool, device=masks.device)
    for j in range(k):
        rows, cols = slice(j // grid * cell, (j // grid + 1) * cell), slice(j % grid * cell, (j % grid + 1) * cell)
        tiled[:, :, rows, cols] = small[j::k]
        object_masks[:, j, rows, cols] = small_masks[j::k]
    return tiled, object_masks


class FashionGrid(torch.utils.data.Dataset):
    """2×2 grids of fashion-canvas test images of four different classes (B-cos grid pointing game).

    Each cell is resized so the whole grid is ``size`` pixels. ``labels`` holds each cell's class in
    row-major order, ``cells`` each cell's box; ``label`` is the first cell's class.
    """

    name = "fashion-grid"
    classes = CLASSES

    def __init__(self, split: str = "test", n: int = 1000, seed: int = 0, size: int = 64, grid: int = 2):
        self.canvas = FashionCanvas(split, seed=seed, size=size)
        self.n, self.seed, self.size, self.grid = int(n), int(seed), int(size), int(grid)
        if self.size % self.grid:
            raise VitlensError(f"fashion-grid size {self.size} is not divisible by grid {self.grid}")
        labels = self.canvas.item_labels[: len(self.canvas)]
        self.by_class = [np.nonzero(labels == c)[0] for c in range(len(CLASSES))]

    def labelled_indices(self) -> range:
        """Every image carries its mask and boxes."""
        return range(self.n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, 2, i])
        k = self.grid**2
        classes = rng.choice(len(CLASSES), size=k, replace=False)
        cell = self.size // self.grid
        samples = [self.canvas[int(rng.choice(self.by_class[c]))] for c in classes]
        image, object_masks = compose_grid(
            torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples]), self.grid
        )
        boxes, cells = [], []
        for j, s in enumerate(samples):
            y0, x0 = j // self.grid * cell, j % self.grid * cell
            b, scale = s["boxes"][0], cell / self.size
            boxes.append([x0 + b[0] * scale, y0 + b[1] * scale, x0 + b[2] * scale, y0 + b[3] * scale])
            cells.append([x0, y0, x0 + cell - 1, y0 + cell - 1])
        return {
            "image": image[0],
            "label": int(classes[0]),
            "labels": torch.as_tensor(classes, dtype=torch.long),
            "mask": object_masks[0].any(0),
            "boxes": torch.tensor(boxes, dtype=torch.float32).floor(),
            "cells": torch.tensor(cells, dtype=torch.float32),
            "sources": torch.tensor([s["index"] for s in samples]),
            "index": i,
        }
