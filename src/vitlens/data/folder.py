"""User data: ``ROOT/SPLIT/<class name>/<image>`` with optional boxes and masks."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import VitlensError
from .images import is_image_file, load_image, read_image


def read_localization(path: Path, images: set[str] | None = None) -> dict[str, list[list[float]]]:
    """``relative/path.png,x0,y0,x1,y1`` per line (wsolevaluation's format) → boxes per image.

    Each box must be finite, non-negative and ordered (x0 <= x1, y0 <= y1), and name one of ``images``
    (when given); a line that is not is refused in one line naming the file and line. Each box is kept
    with its line number (a fifth value) so a box outside its image can be reported the same way.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VitlensError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise VitlensError(f"{path}: cannot read ({e.strerror or e})") from None
    boxes: dict[str, list[list[float]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 5:
                raise ValueError
            box = [float(v) for v in parts[1:]]
        except ValueError as e:
            raise VitlensError(f"{path}:{n}: expected 'relative/path,x0,y0,x1,y1', got {line[:200]!r}") from e
        if not all(math.isfinite(v) and v >= 0 for v in box) or box[0] > box[2] or box[1] > box[3]:
            raise VitlensError(f"{path}:{n}: box {parts[1:]} is not finite, non-negative, with x0 <= x1 and y0 <= y1")
        if images is not None and parts[0] not in images:
            raise VitlensError(f"{path}:{n}: {parts[0][:200]!r} names no image of this split")
        boxes.setdefault(parts[0], []).append([*box, n])
    return boxes


class Folder(torch.utils.data.Dataset):
    """Images by class folder; boxes from ``localization.txt``, masks from ``masks/`` when present, and
    ignore regions (pixels no pixel metric scores, as OpenImages' ignore boxes) from ``ignore/``.

    Images are resized to ``size`` (the model's input) when given; boxes and masks follow. A file
    that cannot be read yields a sample with an ``error`` entry instead of stopping the run.
    """

    name = "folder"

    def __init__(self, root: str, split: str = "test", size: tuple[int, int] | None = None):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise VitlensError(f"folder data: {self.root} is not a directory (expected ROOT/SPLIT/<class>/<image>)")
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir() and d.name not in ("masks", "ignore"))
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
        self.boxes = read_localization(loc, {rel for rel, _ in self.files}) if loc.is_file() else {}
        self.localization = loc
        self.masks_dir = self.root / "masks"
        self.ignore_dir = self.root / "ignore"
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        return self.files[i][1]

    def labelled_indices(self) -> list[int]:
        """The images with boxes in ``localization.txt`` or a mask file in ``masks/``."""
        return [i for i, (rel, _) in enumerate(self.files) if rel in self.boxes or (self.masks_dir / rel).is_file()]

    def __getitem__(self, i: int) -> dict:
        rel, label = self.files[i]
        sample: dict = {"label": label, "index": i, "path": str(self.root / rel)}
        try:  # resized while decoding (memory stays bounded for large photographs)
            image, (h, w) = read_image(self.root / rel, self.size)
            mask_file = self.masks_dir / rel
            mask = load_image(mask_file, image.shape[-2:]).mean(0) > 0.5 if mask_file.is_file() else None
            ignore_file = self.ignore_dir / rel
            ignore = load_image(ignore_file, image.shape[-2:]).mean(0) > 0.5 if ignore_file.is_file() else None
        except VitlensError as e:
            return {**sample, "error": str(e)}
        size = image.shape[-2:]
        sx, sy = size[1] / w, size[0] / h
        if rel in self.boxes:
            for *box, line in self.boxes[rel]:
                if box[2] > w or box[3] > h:  # inclusive corners: at most the last pixel (w - 1, h - 1)
                    return {**sample, "error": f"{self.localization}:{line}: box {box} lies outside {rel} ({w}×{h})"}
            b = torch.tensor([box[:4] for box in self.boxes[rel]], dtype=torch.float32)
            sample["boxes"] = torch.stack([b[:, 0] * sx, b[:, 1] * sy, b[:, 2] * sx, b[:, 3] * sy], 1).floor()
        if mask is not None:
            sample["mask"] = mask
        if ignore is not None:
            sample["ignore"] = ignore
        return {**sample, "image": image}
