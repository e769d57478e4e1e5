"""``vitlens demo``: the embedded default — explain fashion canvases with the committed checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .data import open_dataset
from .errors import VitlensError
from .files import explain_files
from .io import atomic_write

DEMO_METHODS = ("pm", "attention", "rollout", "gradcam", "gae")


def checkpoints_dir() -> Path:
    """``$VITLENS_CHECKPOINTS`` or the ``checkpoints/`` folder of the source checkout."""
    env = os.environ.get("VITLENS_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "checkpoints"


def default_checkpoint(name: str) -> Path:
    path = checkpoints_dir() / name
    if not (path / "config.json").is_file():
        raise VitlensError(
            f"committed checkpoint {name!r} not found in {path.parent} "
            "(run from a vitlens source checkout or set VITLENS_CHECKPOINTS)"
        )
    return path


def run_demo(out: str | os.PathLike = "demo-out", n: int = 8, methods=DEMO_METHODS) -> dict:
    """Write ``n`` fashion-canvas test images and their explanations under ``out``; returns a summary.

    The model is the PM-tuned fashion classifier, so the PM map is the one the paper's training gives.
    """
    out = Path(out)
    model = default_checkpoint("fashion-vit-pm")
    data = open_dataset("fashion-canvas:test")
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        s = data[i]
        arr = (s["image"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        p = image_dir / f"canvas-{i:03d}.png"
        atomic_write(p, lambda tmp, arr=arr: Image.fromarray(arr).save(tmp, format="PNG"))
        paths.append(p)
    records = {m: list(explain_files(paths, model, m, out=out / m)) for m in methods}
    sheet = _contact_sheet([[Image.open(r["overlay"]) for r in records[m]] for m in methods])
    atomic_write(out / "overview.png", lambda tmp: sheet.save(tmp, format="PNG"))
    return {"out": str(out), "overview": str(out / "overview.png"), "images": n, "methods": list(methods)}


def _contact_sheet(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), (24, 24, 28))
    for y, row in enumerate(rows):
        for x, pic in enumerate(row):
            sheet.paste(pic, (x * w, y * h))
    return sheet
