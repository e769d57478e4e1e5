"""``vitlens.show``: explanations in a notebook, as a matplotlib grid (needs matplotlib: ``vitlens[viz]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import VitlensError
from ..explainers.explanation import Explanation
from .overlay import explanation_overlays


def _matplotlib():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise VitlensError("vitlens.show needs matplotlib: pip install 'vitlens[viz]'") from None
    return plt


def show(
    images: torch.Tensor | None,
    explanations: Explanation | Sequence[Explanation] | Mapping[str, Explanation],
    *,
    size: float = 2.6,
    original: bool = True,
    max_images: int = 16,
):
    """Draw explanations as a grid: one row per image, one column per method (or per target).

    Signed maps (IG, Input×Gradient, occlusion) use a diverging colour map centred at 0; probabilities
    (PM, DiffMask) keep their absolute scale; constant maps are labelled, not drawn as answers. Each
    overlay is drawn at the image's own resolution with its aspect kept.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1] at any resolution (e.g. the original photos), or ``None`` to use
            the images each explanation keeps.
        explanations: one :class:`Explanation`, a list of them (one column each; several targets per image
            give one column per target) or a mapping ``{column title: Explanation}``.
        size: inches per grid cell.
        original: add a first column with the image alone.
        max_images: draw at most this many rows.

    Returns:
        figure_and_axes (tuple): ``(fig, axes)``, the matplotlib figure and its 2-D array of axes.

    Examples:
        >>> gae = vitlens.explain(model, images, method="gae")
        >>> ig = vitlens.explain(model, images, method="ig")
        >>> fig, axes = vitlens.show(images, [gae, ig])
    """
    plt = _matplotlib()
    if isinstance(explanations, Explanation):
        explanations = [explanations]
    titled = list(explanations.items()) if isinstance(explanations, Mapping) else [(None, e) for e in explanations]
    if not titled:
        raise VitlensError("show() needs at least one explanation")
    n = len(titled[0][1])
    if any(len(e) != n for _, e in titled):
        raise VitlensError("show(): the explanations cover different numbers of images")
    if images is not None and len(images) != n:
        raise VitlensError(f"show(): got {len(images)} images for explanations of {n}")
    rows = min(n, max_images)
    columns: list[tuple[str, list]] = []  # (title, one picture per row)
    for title, e in titled:
        pictures = explanation_overlays(e[:rows], None if images is None else images[:rows], title=False)
        k = e.maps.shape[1] if e.multi_target else 1
        for j in range(k):
            label = title or e.method
            if k > 1:
                label += f" #{j + 1}"
            columns.append((label, [(pictures[r * k + j], _caption(e, r, j)) for r in range(rows)]))
    base = images if images is not None else titled[0][1].images
    cols = len(columns) + (1 if original and base is not None else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for r in range(rows):
        c0 = 0
        if original and base is not None:
            axes[r, 0].imshow(base[r].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            if r == 0:
                axes[r, 0].set_title("image")
            c0 = 1
        for c, (label, cells) in enumerate(columns, c0):
            picture, caption = cells[r]
            axes[r, c].imshow(picture)
            axes[r, c].set_title(f"{label}\n{caption}" if r == 0 else caption, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig, axes


def _caption(e: Explanation, row: int, k: int) -> str:
    name = e.class_names[row][k] if e.multi_target else e.class_names[row]
    constant = bool(e.degenerate[row, k] if e.multi_target else e.degenerate[row])
    return f"{name} (constant map)" if constant else str(name)
