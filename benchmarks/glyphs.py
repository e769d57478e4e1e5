"""Glyphs: a localisation data set in the folder layout that no vitlens setting was tuned on.

Each 64×64 image holds one letter (the class: A E F G K M Q R S W) rendered in one of matplotlib's bundled
text fonts (DejaVu and STIX, so every machine draws the same images) at 16–30 px, at a random place, in a colour
far from the background's; the background is a random tint with pixel noise and one to three thin distractor
lines in random colours, which share the letters' strokes. The box is the glyph's extent, the mask its pixels.

    python benchmarks/glyphs.py ROOT --train 3000 --test 300 --labelled 0.02

writes ``ROOT/{train,test}/<letter>/<index>.png``, ``localization.txt`` and ``masks/`` for a seeded share of
the training images (``--labelled``) and every test image, as a user's partly annotated data would be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LETTERS = "AEFGKMQRSW"
SIZE = 64


def fonts() -> list[Path]:
    """matplotlib's bundled text fonts (the same files on every machine with the same matplotlib)."""
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    text = ("DejaVuSans", "DejaVuSerif", "STIXGeneral")
    return sorted(p for p in ttf.glob("*.ttf") if p.name.startswith(text) and "Display" not in p.name)


def cluttered_background(rng: np.random.Generator, size: int = SIZE) -> tuple[Image.Image, np.ndarray]:
    """A random tint with pixel noise and one to three thin lines in random colours; (image, tint)."""
    tint = rng.uniform(0.2, 0.8, 3)
    pixels = np.clip(tint + rng.normal(0, 0.12, (size, size, 3)), 0, 1)
    image = Image.fromarray((pixels * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        ends = [tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))]
        draw.line(ends, fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 4)))
    return image, tint


def contrasting_colour(rng: np.random.Generator, tint: np.ndarray) -> tuple[int, int, int]:
    """A random colour far from ``tint`` (L1 distance at least 0.6), as 0–255 RGB."""
    colour = rng.uniform(0, 1, 3)
    while np.abs(colour - tint).sum() < 0.6:
        colour = rng.uniform(0, 1, 3)
    return tuple((colour * 255).astype(int).tolist())


def glyph_image(rng: np.random.Generator, letter: str, font_files: list[Path]) -> tuple[Image.Image, np.ndarray]:
    """One image of ``letter`` and its glyph mask (``[SIZE, SIZE]`` bool)."""
    image, tint = cluttered_background(rng)
    font = ImageFont.truetype(str(font_files[rng.integers(len(font_files))]), int(rng.integers(16, 31)))
    glyph = Image.new("L", (SIZE, SIZE), 0)
    x0, y0, x1, y1 = ImageDraw.Draw(glyph).textbbox((0, 0), letter, font=font)
    x = int(rng.integers(0, max(1, SIZE - (x1 - x0))))
    y = int(rng.integers(0, max(1, SIZE - (y1 - y0))))
    ImageDraw.Draw(glyph).text((x - x0, y - y0), letter, font=font, fill=255)
    image.paste(contrasting_colour(rng, tint), (0, 0), glyph)
    return image, np.asarray(glyph) > 127


def write_split(root: Path, split: str, n: int, labelled: float, seed: int = 0) -> Path:
    """Write ``n`` glyph images of ``split`` with boxes and masks for a seeded share ``labelled`` of them."""
    font_files = fonts()
    return write_images(root, split, n, labelled, LETTERS,
                        lambda rng, i: glyph_image(rng, LETTERS[i % len(LETTERS)], font_files), seed)  # fmt: skip


def write_images(root: Path, split: str, n: int, labelled: float, classes, render, seed: int = 0) -> Path:
    """The folder layout of ``n`` images ``render(rng, i) -> (image, mask)`` of class ``classes[i % C]``, with
    boxes and masks for a seeded share ``labelled`` of them."""
    out = root / split
    rng = np.random.default_rng([seed, len(split), n])
    boxed = set(rng.choice(n, size=max(1, round(labelled * n)), replace=False).tolist())
    lines = []
    for i in range(n):
        name = classes[i % len(classes)]
        image, mask = render(np.random.default_rng([seed, len(split), i]), i)
        rel = f"{name}/{i:05d}.png"
        (out / name).mkdir(parents=True, exist_ok=True)
        image.save(out / rel)
        if i in boxed and mask.any():
            ys, xs = np.nonzero(mask)
            lines.append(f"{rel},{xs.min()},{ys.min()},{xs.max()},{ys.max()}")
            (out / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / "masks" / rel)
    (out / "localization.txt").write_text("".join(line + "\n" for line in lines))
    return out


def write_data_set(description: str, write_split) -> None:
    """The command line of a data-set script: ``ROOT --train N --test N --labelled SHARE`` → ``write_split``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=3000, help="training images")
    p.add_argument("--test", type=int, default=300, help="test images (all labelled)")
    p.add_argument("--labelled", type=float, default=0.02, help="share of training images with boxes and masks")
    a = p.parse_args()
    write_split(a.root, "train", a.train, a.labelled)
    write_split(a.root, "test", a.test, 1.0)


if __name__ == "__main__":
    write_data_set(__doc__.splitlines()[0], write_split)
