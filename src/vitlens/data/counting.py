"""The Vision DiffMask faithfulness task (Nalmpantis et al. 2023): count the cells of one colour."""

from __future__ import annotations

import colorsys

import numpy as np
import torch

from ..errors import VitlensError

COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}


class Counting(torch.utils.data.Dataset):
    """``grid``×``grid`` solid cells of ``cell`` px; the label is the number of ``colour`` cells.

    The other cells get random colours whose hue is at least 60° away from the target's and that are
    bright enough to be seen, so no cell is ambiguous. Labels are uniform over ``0 .. grid²``; the mask
    marks the target cells (one box each). Deterministic by ``(seed, split, i)``.
    """

    name = "counting"

    def __init__(
        self, split: str = "train", n: int | None = None, seed: int = 0, colour: str = "red", grid: int = 3,
        cell: int = 16,
    ):  # fmt: skip
        if colour not in COLOURS:
            raise VitlensError(f"unknown counting colour {colour!r} (known: {', '.join(COLOURS)})")
        if not 1 <= int(grid) <= 16:
            raise VitlensError(f"counting grid must be in 1..16, got {grid}")
        self.split, self.seed, self.colour = split, int(seed), colour
        self.grid, self.cell = int(grid), int(cell)
        self.n = int(n) if n is not None else (20000 if split == "train" else 2000)
        self.classes = tuple(str(k) for k in range(self.grid**2 + 1))
        self.target = np.array(COLOURS[colour], dtype=np.float32)
        self.target_hue = colorsys.rgb_to_hsv(*self.target)[0]
        self.size = self.grid * self.cell
        if self.size > 2048:  # one float image of 2048² is 50 MB already
            raise VitlensError(
                f"counting images of grid {self.grid} × cell {self.cell} = {self.size} px (at most 2048)"
            )

    def labelled_indices(self) -> range:
        """Every image carries its mask and boxes."""
        return range(self.n)

    def __len__(self) -> int:
        return self.n

    def _other_colour(self, rng: np.random.Generator) -> np.ndarray:
        offset = rng.uniform(60 / 360, 300 / 360)
        hue = (self.target_hue + offset) % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0)), dtype=np.float32)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, {"train": 0, "test": 1}.get(self.split, 2), i])
        k = self.grid**2
        count = int(rng.integers(0, k + 1))
        chosen = set(rng.choice(k, size=count, replace=False).tolist())
        image = torch.zeros(3, self.size, self.size)
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        boxes = []
        for j in range(k):
            r, q = divmod(j, self.grid)
            y0, x0 = r * self.cell, q * self.cell
            if j in chosen:
                colour = np.clip(self.target + rng.uniform(-0.1, 0.1, 3), 0, 1)
                mask[y0 : y0 + self.cell, x0 : x0 + self.cell] = True
                boxes.append([x0, y0, x0 + self.cell - 1, y0 + self.cell - 1])
            else:
                colour = self._other_colour(rng)
            image[:, y0 : y0 + self.cell, x0 : x0 + self.cell] = torch.from_numpy(colour.astype(np.float32))[
                :, None, None
            ]
        return {
            "image": image,
            "label": count,
            "mask": mask,
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "index": i,
        }
