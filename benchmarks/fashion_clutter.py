"""Fashion clutter: small Fashion-MNIST items on noisy tinted backgrounds, a folder data set no setting saw.

Each 64×64 image holds one Fashion-MNIST item (the class) shrunk to 12–24 px, at a random place, in one
colour far from the background's, its grey levels as opacity; the background is a random tint with pixel
noise and one to three thin lines in random colours (as benchmarks/glyphs.py draws it). Objects are
smaller than in fashion-canvas (16–40 px on a smooth dark canvas) and sit on high-frequency clutter. The
box is the item's extent, the mask its pixels above 20% opacity. Training images come from Fashion-MNIST's
training split, test images from its test split.

    python benchmarks/fashion_clutter.py ROOT --train 3000 --test 300 --labelled 0.02

writes ``ROOT/{train,test}/<class>/<index>.png``, ``localization.txt`` and ``masks/`` for a seeded share of
the training images (``--labelled``) and every test image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from glyphs import SIZE, cluttered_background, contrasting_colour, write_data_set, write_images
from PIL import Image

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle-boot")


def item_image(rng: np.random.Generator, item: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    """One image of the 28×28 uint8 ``item`` and its mask (``[SIZE, SIZE]`` bool)."""
    image, tint = cluttered_background(rng)
    side = int(rng.integers(12, 25))
    alpha = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    x, y = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
    opacity = Image.new("L", (SIZE, SIZE), 0)
    opacity.paste(alpha, (x, y))
    image.paste(contrasting_colour(rng, tint), (0, 0), opacity)
    return image, np.asarray(opacity) > 0.2 * 255


def write_split(root: Path, split: str, n: int, labelled: float, seed: int = 0) -> Path:
    """Write ``n`` images of ``split`` with boxes and masks for a seeded share ``labelled`` of them."""
    from vitlens.data.fashion import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    by_class = [np.flatnonzero(labels == c) for c in range(len(CLASSES))]

    def render(rng: np.random.Generator, i: int):
        pool = by_class[i % len(CLASSES)]
        return item_image(rng, images[pool[rng.integers(len(pool))]])

    return write_images(root, split, n, labelled, CLASSES, render, seed)


if __name__ == "__main__":
    write_data_set(__doc__.splitlines()[0], write_split)
