"""``shapes``: procedurally drawn shapes on textured backgrounds, several per image, with boxes and masks.

A localisation benchmark that no PM setting was tuned on. Every image holds 1 to ``objects`` shapes of
one kind (the class: circle, cross, diamond, hexagon, ring, square, star or triangle), each at its own
place, size, small rotation, colour and fill texture (solid, stripes, checks or dots), on a dark
background with a faint texture and thin distractor lines. Colour and texture say nothing about the
class; only the outline does. Every shape has its own box; the mask is their union.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import VitlensError

CLASSES = ("circle", "cross", "diamond", "hexagon", "ring", "square", "star", "triangle")  # sorted: folder order


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, inradius: float, phase: float) -> np.ndarray:
    """Inside a regular polygon with ``sides`` edges whose normals start at angle ``phase``."""
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = phase + 2 * np.pi * k / sides
        inside &= u * np.cos(a) + v * np.sin(a) <= inradius
    return inside


def shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels of shape ``kind`` of radius ``r`` at local coordinates ``(u, v)`` (shape centred at 0)."""
    rho = np.hypot(u, v)
    if kind == "circle":
        return rho <= r
    if kind == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if kind == "cross":
        arm = 0.32 * r
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    if kind == "triangle":
        return _polygon(u, v + 0.15 * r, 3, 0.55 * r, np.pi / 2)  # apex up, centred on its area
    if kind == "hexagon":
        return _polygon(u, v, 6, 0.87 * r, 0.0)
    if kind == "star":
        phi = np.arctan2(v, u) + np.pi / 2
        return rho <= r * (0.42 + 0.58 * ((np.cos(5 * phi) + 1) / 2) ** 2)
    raise ValueError(kind)


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A random fill pattern in {0, 1}: solid, stripes, checks or dots."""
    kind = int(rng.integers(4))
    period = rng.uniform(3.0, 6.0)
    a = rng.uniform(0, np.pi)
    if kind == 0:
        return np.ones(u.shape, dtype=np.float32)
    if kind == 1:
        return (np.sin(2 * np.pi * (u * np.cos(a) + v * np.sin(a)) / period) > 0).astype(np.float32)
    if kind == 2:
        return ((np.floor(u / period * 2) + np.floor(v / period * 2)) % 2).astype(np.float32)
    return (np.hypot((u % period) - period / 2, (v % period) - period / 2) > period / 4).astype(np.float32)


def render_shapes(
    rng: np.random.Generator, kind: str, size: int = 64, objects: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image of 1..``objects`` shapes of ``kind``.

    Returns:
        (image float32 [3, S, S] in [0, 1], mask bool [S, S], boxes float32 [K, 4] inclusive x0, y0, x1, y1).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.05, 0.35, size=3).astype(np.float32)
    image = np.repeat(base[:, None, None], size, 1).repeat(size, 2)
    image = image + rng.uniform(0.03, 0.08) * (2 * _texture(rng, xx, yy) - 1)[None]  # faint background texture
    for _ in range(int(rng.integers(0, 4))):  # distractor lines: not a shape of any class
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / max(1e-6, (x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        near = np.hypot(xx - x0 - t * (x1 - x0), yy - y0 - t * (y1 - y0)) <= 0.6
        image[:, near] = _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.4, 0.9))[:, None]
    scale = size / 64
    mask = np.zeros((size, size), dtype=bool)
    boxes = []
    for _ in range(int(rng.integers(1, objects + 1))):
        for _try in range(20):  # a place that does not touch the shapes drawn so far
            r = rng.uniform(6.0, 12.0) * scale
            cx, cy = rng.uniform(r, size - 1 - r, 2)
            theta = rng.uniform(-0.25, 0.25)  # square and diamond stay apart
            u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
            v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
            obj = shape_mask(kind, u, v, r)
            grown = np.hypot(xx - cx, yy - cy) <= r + 2 * scale
            if obj.any() and not (grown & mask).any():
                break
        else:
            continue
        c1 = _hsv(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.75, 1.0))
        c2 = c1 * rng.uniform(0.45, 0.7)
        fill = _texture(rng, u, v)
        image[:, obj] = c2[:, None] + (c1 - c2)[:, None] * fill[obj][None]
        mask |= obj
        ys, xs = np.nonzero(obj)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return np.clip(image, 0, 1), mask, np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


class Shapes(torch.utils.data.Dataset):
    """Procedural shapes, several per image; class = the shapes' kind; one box per shape and their mask.

    Sample ``i`` is generated from ``(seed, split, i)`` alone (deterministic, order-independent); images
    are quantised to 8 bits like real ones and kept in memory once drawn (about 16 kB each at 64 px).
    Each image's class is drawn uniformly from ``(seed, split, i)`` too.
    """

    name = "shapes"
    classes = CLASSES

    def __init__(self, split: str = "train", n: int | None = None, seed: int = 0, size: int = 64, objects: int = 3):
        if not 1 <= int(objects) <= 6:
            raise VitlensError(f"shapes objects must be in 1..6, got {objects}")
        self.split, self.seed, self.size, self.objects = split, int(seed), int(size), int(objects)
        self.n = int(n) if n is not None else (12000 if split == "train" else 2000)
        self._stream = {"train": 0, "test": 1}.get(split, 2)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.n

    def labelled_indices(self) -> range:
        """Every image carries its boxes and mask."""
        return range(self.n)

    def label(self, i: int) -> int:
        return int(np.random.default_rng([self.seed, self._stream, i, 1]).integers(len(CLASSES)))

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i not in self._cache:
            rng = np.random.default_rng([self.seed, self._stream, i])
            image, mask, boxes = render_shapes(rng, CLASSES[self.label(i)], self.size, self.objects)
            self._cache[i] = (np.round(image * 255).astype(np.uint8), mask, boxes)
        image, mask, boxes = self._cache[i]
        return {
            "image": torch.from_numpy(image).float().div_(255),
            "label": self.label(i),
            "mask": torch.from_numpy(mask),
            "boxes": torch.from_numpy(boxes),
            "index": i,
        }
