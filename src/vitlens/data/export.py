"""Write any data set in the folder layout that ``folder:`` reads (the user path, end to end).

``ROOT/SPLIT/<class>/<index>.png``, ``ROOT/SPLIT/localization.txt`` (``relative/path,x0,y0,x1,y1``, one
line per box) and ``ROOT/SPLIT/masks/<class>/<index>.png``. Class folders sort in the data set's class
order (names are prefixed with their index where they would not), so a model trained on the data set
reads the exported folder with the same labels.

    python -m vitlens.data.export shapes:train /data/shapes --limit 2000 --labelled 0.02
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import VitlensError


def class_folders(classes: list[str]) -> list[str]:
    """Folder names for ``classes`` that are safe on disk, distinct, and sort in the classes' order."""
    names = [re.sub(r"[^A-Za-z0-9._+-]+", "-", str(c)).strip(".-") or "class" for c in classes]
    if names != sorted(names) or len(set(names)) != len(names) or "masks" in names:
        width = len(str(len(names) - 1))
        names = [f"{k:0{width}d}-{n}" for k, n in enumerate(names)]
    return names


def export_folder(
    spec: str, root: str | Path, *, limit: int | None = None, labelled: float = 1.0, masks: bool = True, seed: int = 0
) -> Path:
    """Write the data set ``spec`` under ``root`` in the folder layout.

    Args:
        spec: a data spec, e.g. ``shapes:train:n=2000`` (its split names the folder).
        root: the folder data set's root (``ROOT``); ``ROOT/SPLIT`` must not exist yet.
        limit: write the first ``limit`` images only.
        labelled: share of the images whose boxes (and masks) are written, a seeded draw; the others are
            written as plain class images, as in a partly annotated data set.
        masks: also write the masks.
        seed: the seed of the ``labelled`` draw.

    Returns:
        ``ROOT/SPLIT``.
    """
    from . import open_dataset, parse_data_spec

    parsed = parse_data_spec(spec)
    if parsed.name == "folder":
        raise VitlensError("export_folder: the data set is already in the folder layout")
    if not 0 <= labelled <= 1:
        raise VitlensError(f"labelled must be in [0, 1], got {labelled}")
    dataset = open_dataset(parsed)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out = Path(root) / parsed.split
    if out.exists():
        raise VitlensError(f"{out} already exists; export into a new folder")
    folders = class_folders(list(dataset.classes))
    for name in folders:  # every class, even one without images here: the labels stay the data set's
        (out / name).mkdir(parents=True)
    k = round(labelled * n)
    chosen = set(np.random.default_rng([seed, 13]).choice(n, size=k, replace=False).tolist())
    lines = []
    for i in range(n):
        sample = dataset[i]
        rel = f"{folders[sample['label']]}/{i:06d}.png"
        pixels = np.round(sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / rel)
        if i not in chosen:
            continue
        for box in sample.get("boxes", np.zeros((0, 4))).tolist():
            lines.append(f"{rel},{','.join(str(int(v)) for v in box)}")
        if masks and "mask" in sample:
            (out / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample["mask"].numpy().astype(np.uint8) * 255).save(out / "masks" / rel)
    if lines:
        (out / "localization.txt").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitlens.data.export", description=__doc__.splitlines()[0])
    p.add_argument("spec", help="data spec, e.g. shapes:train:n=2000")
    p.add_argument("root", help="folder data set root to write")
    p.add_argument("--limit", type=int, help="the first N images only")
    p.add_argument("--labelled", type=float, default=1.0, help="share of images whose boxes/masks are written")
    p.add_argument("--no-masks", action="store_true", help="boxes only")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        out = export_folder(a.spec, a.root, limit=a.limit, labelled=a.labelled, masks=not a.no_masks, seed=a.seed)
    except VitlensError as e:
        print(f"vitlens: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
