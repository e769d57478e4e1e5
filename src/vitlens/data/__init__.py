"""Data sets addressed by a spec string ``NAME[:SPLIT][:key=value,...]``.

Examples: ``fashion-canvas:test``, ``counting:train:colour=blue,grid=4``, ``folder:/data/birds:train``,
``fashion-canvas:test:n=500,seed=1``. Every sample is a dict with ``image`` ([3, H, W] in [0, 1]),
``label`` and, where known, ``boxes`` ([K, 4] inclusive pixel corners x0, y0, x1, y1) and ``mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import VitlensError
from .counting import Counting
from .fashion import FashionCanvas, FashionGrid
from .folder import Folder
from .images import load_image, resize
from .shapes import Shapes

__all__ = ["DataSpec", "collate", "load_image", "open_dataset", "parse_data_spec", "resize"]

SPLITS = ("train", "val", "test")
DATASETS: dict[str, tuple[Callable[..., torch.utils.data.Dataset], dict[str, type]]] = {
    "fashion-canvas": (FashionCanvas, {"n": int, "seed": int, "size": int}),
    "fashion-grid": (FashionGrid, {"n": int, "seed": int, "size": int, "grid": int}),
    "counting": (Counting, {"n": int, "seed": int, "colour": str, "grid": int, "cell": int}),
    "shapes": (Shapes, {"n": int, "seed": int, "size": int, "objects": int}),
    "folder": (Folder, {}),
}
# Allowed ranges of integer options, (low, high) inclusive; None = unbounded. A canvas holds a 20-36 px
# item; a fashion grid needs grid² different classes (10 exist).
BOUNDS: dict[str, tuple[int, int | None]] = {"n": (1, None), "seed": (0, None), "cell": (1, 1024)}
DATASET_BOUNDS: dict[str, dict[str, tuple[int, int | None]]] = {
    "fashion-canvas": {"size": (36, 1024)},
    "fashion-grid": {"size": (36, 1024), "grid": (1, 3)},
    "counting": {"grid": (1, 16)},
    "shapes": {"size": (32, 1024), "objects": (1, 6)},
}


@dataclass(frozen=True)
class DataSpec:
    name: str
    split: str
    options: dict = field(default_factory=dict)
    root: str | None = None

    def __str__(self) -> str:
        parts = [self.name] + ([self.root] if self.root else []) + [self.split]
        if self.options:
            parts.append(",".join(f"{k}={v}" for k, v in self.options.items()))
        return ":".join(parts)


def _check_bounds(name: str, key: str, value: object) -> None:
    if not isinstance(value, int):
        return
    lo, hi = DATASET_BOUNDS.get(name, {}).get(key, BOUNDS.get(key, (0, None)))
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise VitlensError(f"{key}={value} out of range for {name} (allowed: {allowed})")


def parse_data_spec(spec: str, default_split: str = "test") -> DataSpec:
    """Parse ``NAME[:ROOT][:SPLIT][:key=value,...]`` (ROOT only for ``folder``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise VitlensError("empty data spec; expected NAME[:SPLIT][:key=value,...]")
    name, *parts = spec.split(":")
    if name not in DATASETS:
        raise VitlensError(f"unknown data set {name!r} in {spec!r} (known: {', '.join(DATASETS)})")
    root = None
    if name == "folder":
        if not parts or not parts[0]:
            raise VitlensError(f"{spec!r}: folder data needs a root, e.g. folder:/data/birds:train")
        root, *parts = parts
    split, options = default_split, {}
    allowed = DATASETS[name][1]
    for i, part in enumerate(parts):
        if "=" not in part and i == 0 and part:
            split = part
            continue
        for item in filter(None, part.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise VitlensError(f"bad data option {item!r} in {spec!r}: expected key=value")
            if key not in allowed:
                known = ", ".join(allowed) or "none"
                raise VitlensError(f"unknown option {key!r} for {name} (known: {known})")
            if key in options:
                raise VitlensError(f"option {key!r} given twice in {spec!r}")
            try:
                options[key] = allowed[key](value)
            except ValueError as e:
                raise VitlensError(
                    f"bad value {value!r} for {key} in {spec!r}: expected {allowed[key].__name__}"
                ) from e
            _check_bounds(name, key, options[key])
    if name != "folder" and split not in SPLITS:
        raise VitlensError(f"unknown split {split!r} in {spec!r} (known: {', '.join(SPLITS)})")
    return DataSpec(name, split, options, root)


def open_dataset(spec: str | DataSpec, size: tuple[int, int] | None = None) -> torch.utils.data.Dataset:
    """Build the data set named by ``spec``; folder images are resized to ``size`` (the model's input)."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    build = DATASETS[spec.name][0]
    if spec.name == "folder":
        return Folder(spec.root, spec.split, size=size)
    split = "test" if spec.split == "val" else spec.split
    return build(split=split, **spec.options)


def collate(samples: list[dict]) -> dict:
    """Batch samples; ones that failed to load are left out and listed under ``errors``."""
    errors = [{"index": s["index"], "path": s.get("path"), "error": s["error"]} for s in samples if "error" in s]
    good = [s for s in samples if "error" not in s]
    batch: dict = {"errors": errors, "index": torch.tensor([s["index"] for s in good], dtype=torch.long)}
    if not good:
        return batch
    batch["image"] = torch.stack([s["image"] for s in good])
    batch["label"] = torch.tensor([s["label"] for s in good], dtype=torch.long)
    batch["boxes"] = [s.get("boxes", torch.zeros(0, 4)) for s in good]
    h, w = batch["image"].shape[-2:]
    batch["has_mask"] = torch.tensor(["mask" in s for s in good])
    batch["mask"] = torch.stack([s.get("mask", torch.zeros(h, w, dtype=torch.bool)) for s in good])
    if any("ignore" in s for s in good):  # pixels no pixel metric scores (OpenImages' ignore regions)
        batch["ignore"] = torch.stack([s.get("ignore", torch.zeros(h, w, dtype=torch.bool)) for s in good])
    for key in ("labels", "cells"):
        if key in good[0]:
            batch[key] = torch.stack([s[key] for s in good])
    if "path" in good[0]:
        batch["path"] = [s["path"] for s in good]
    return batch
