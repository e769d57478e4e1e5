"""``vitlens.show``: explanations in a notebook, as a matplotlib grid (needs matplotlib: ``vitlens[viz]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import VitlensError
from ..explainers.explanation import Explanation
from .overlay import GT_COLOUR, PRED_COLOUR, explanation_overlays


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
    boxes: Sequence | None = None,
    map_boxes: bool | float = False,
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
        boxes: ground-truth boxes, one list per image of ``(x0, y0, x1, y1)`` in pixels of ``images``
            (inclusive corners, the convention of a folder's ``localization.txt``), drawn in green on every
            cell of the image's row.
        map_boxes: also draw, in cyan on each overlay, the box its map implies: the largest component above
            ``τ`` × the map's maximum, as ``vitlens explain --boxes TAU`` writes it (``True``: τ = 0.5; a
            number: that τ). A legend names both kinds of box.

    Returns:
        figure_and_axes (tuple): ``(fig, axes)``, the matplotlib figure and its 2-D array of axes.

    Examples:
        >>> gae = vitlens.explain(model, images, method="gae")
        >>> ig = vitlens.explain(model, images, method="ig")
        >>> fig, axes = vitlens.show(images, [gae, ig])
        >>> fig, axes = vitlens.show(photos, gae, boxes=[[(12, 30, 200, 180)], []], map_boxes=0.5)
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
    truth = _check_boxes(boxes, n)
    tau = 0.5 if map_boxes is True else (None if map_boxes is False else float(map_boxes))
    columns: list[tuple[str, list, torch.Tensor]] = []  # (title, one picture per row, the maps)
    for title, e in titled:
        pictures = explanation_overlays(e[:rows], None if images is None else images[:rows], title=False)
        k = e.maps.shape[1] if e.multi_target else 1
        for j in range(k):
            label = title or e.method
            if k > 1:
                label += f" #{j + 1}"
            cells = [(pictures[r * k + j], _caption(e, r, j)) for r in range(rows)]
            columns.append((label, cells, e.maps[:rows, j] if e.multi_target else e.maps[:rows]))
    base = images if images is not None else titled[0][1].images
    cols = len(columns) + (1 if original and base is not None else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    legend = truth is not None or tau is not None
    if legend and base is None:
        raise VitlensError("show(): boxes are drawn over the images; pass them (this explanation keeps none)")
    for r in range(rows):
        c0 = 0
        if original and base is not None:
            axes[r, 0].imshow(base[r].detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
            if r == 0:
                axes[r, 0].set_title("image")
            if truth is not None:
                _draw_boxes(axes[r, 0], truth[r], 1.0, GT_COLOUR)
            c0 = 1
        for c, (label, cells, maps) in enumerate(columns, c0):
            picture, caption = cells[r]
            axes[r, c].imshow(picture)
            axes[r, c].set_title(f"{label}\n{caption}" if r == 0 else caption, fontsize=9)
            if not legend:
                continue
            h, w = base.shape[-2:]
            factor = picture.width / w
            if truth is not None:
                _draw_boxes(axes[r, c], truth[r], factor, GT_COLOUR)
            if tau is not None:
                from ..metrics.localisation import map_box

                _draw_boxes(axes[r, c], [map_box(maps[r].cpu(), (h, w), tau)], factor, PRED_COLOUR)
    for ax in axes.flat:
        ax.axis("off")
    if legend:
        from matplotlib.patches import Patch

        kinds = [("ground truth", GT_COLOUR)] if truth is not None else []
        kinds += [(f"from the map (τ = {tau:g})", PRED_COLOUR)] if tau is not None else []
        handles = [Patch(fill=False, edgecolor=_rgb(colour), linewidth=2, label=name) for name, colour in kinds]
        fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    else:
        fig.tight_layout()
    return fig, axes


def _check_boxes(boxes, n: int) -> list[torch.Tensor] | None:
    """``boxes`` as one float ``[K, 4]`` tensor per image, or one line saying what is wrong."""
    if boxes is None:
        return None
    if isinstance(boxes, str) or not hasattr(boxes, "__len__") or len(boxes) != n:
        got = f"{len(boxes)} entries" if hasattr(boxes, "__len__") else type(boxes).__name__
        raise VitlensError(f"show(): boxes must hold one list of (x0, y0, x1, y1) per image ({n} images), got {got}")
    out = []
    for i, b in enumerate(boxes):
        try:
            t = torch.as_tensor(b, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is not None and t.numel() == 0:
            t = t.reshape(0, 4)
        if t is None or t.ndim != 2 or t.shape[1] != 4:
            raise VitlensError(f"show(): boxes[{i}] must be a list of (x0, y0, x1, y1), got {str(b)[:80]}")
        out.append(t)
    return out


def _draw_boxes(ax, boxes, factor: float, colour) -> None:
    """Inclusive pixel boxes of the image on a picture ``factor`` times its size (pixel centres at integers)."""
    from matplotlib.patches import Rectangle

    for x0, y0, x1, y1 in (map(float, b) for b in boxes):
        corner = (x0 * factor - 0.5, y0 * factor - 0.5)
        size = ((x1 - x0 + 1) * factor, (y1 - y0 + 1) * factor)
        ax.add_patch(Rectangle(corner, *size, fill=False, edgecolor=_rgb(colour), linewidth=1.5))


def _rgb(colour) -> tuple[float, float, float]:
    return tuple(v / 255 for v in colour)


def _caption(e: Explanation, row: int, k: int) -> str:
    name = e.class_names[row][k] if e.multi_target else e.class_names[row]
    constant = bool(e.degenerate[row, k] if e.multi_target else e.degenerate[row])
    return f"{name} (constant map)" if constant else str(name)
