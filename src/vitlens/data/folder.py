"""User data: ``ROOT/SPLIT/<class name>/<image>`` with optional boxes and masks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VitlensError
from .images import is_image_file, load_image, read_image


def read_localization(path: Path) -> dict[str, list[list[float]]]:
    """``relative/path.png,x0,y0,x1,y1`` per line (wsolevaluation's format) → boxes per image."""
    boxes: dict[str, list[list[float]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 5:
                raise ValueError
            boxes.setdefault(parts[0], []).append([float(v) for v in parts[1:]])
        except ValueError as e:
            raise VitlensError(f"{path}:{n}: expected 'relative/path,x0,y0,x1,y1', got {line!r}") from e
    return boxes


class Folder(torch.utils.data.Dataset):
    """Images by class folder; boxes from ``localization.txt``, masks from ``masks/`` when present.

    Images are resized to ``size`` (the model's input) when given; boxes and masks follow. A file
    that cannot be read yields a sample with an ``error`` entry instead of stopping the run.
    """

    name = "folder"

    def __init__(self, root: str, split: str = "test", size: tuple[int, int] | None = None):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise VitlensError(f"folder data: {self.root} is not a directory (expected ROOT/SPLIT/<class>/<image>)")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and d.name != "masks")
        if not class_dirs:
            raise VitlensError(f"folder data: no class folders in {self.root}")
        self.classes = tuple(d.name for d in class_dirs)
        self.files: list[tuple[str, int]] = []
        for label, d in enumerate(class_dirs):
            for f in sorted(d.rglob("*")):
                if f.is_file() and is_image_file(f):
                    self.files.append((f.relative_to(self.root).as_posix(), label))
        if not self.files:
            raise VitlensError(f"folder data: no images under {self.root}")
        loc = self.root / "localization.txt"
        self.boxes = read_localization(loc) if loc.is_file() else {}
        self.masks_dir = self.root / "masks"
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        rel, label = self.files[i]
        sample: dict = {"label": label, "index": i, "path": str(self.root / rel)}
        try:  # resized while decoding (memory stays bounded for large photographs)
            image, (h, w) = read_image(self.root / rel, self.size)
            mask_file = self.masks_dir / rel
            mask = load_image(mask_file, image.shape[-2:]).mean(0) > 0.5 if mask_file.is_file() else None
        except VitlensError as e:
            return {**sample, "error": str(e)}
        size = image.shape[-2:]
        sx, sy = size[1] / w, size[0] / h
        if rel in self.boxes:
            b = torch.tensor(self.boxes[rel], dtype=torch.float32)
            sample["boxes"] = torch.stack([b[:, 0] * sx, b[:, 1] * sy, b[:, 2] * sx, b[:, 3] * sy], 1).floor()
        if mask is not None:
            sample["mask"] = mask
        return {**sample, "image": image}
