"""Localisation metrics: pointing games, WSOL box and mask metrics, segmentation.

- Pointing game: Zhang et al., *Top-down Neural Attention by Excitation Backprop*, IJCV 2018.
- Energy pointing game: Wang et al., *Score-CAM*, CVPR-W 2020 (as used by B-cos, Böhle et al. 2024).
- MaxBoxAcc, MaxBoxAccV2, PxAP: Choe et al., *Evaluating Weakly Supervised Object Localization
  Methods Right*, CVPR 2020, following their reference code (clovaai/wsolevaluation) to the pixel.
- Segmentation (pixel accuracy, mIoU, mAP): Chefer, Gur, Wolf, CVPR 2021 (ImageNet-segmentation test).

Maps are brought to the image with the one shared upsampler (:func:`vitlens.backbones.upsample`,
bilinear), except under the ``wsol`` protocol of the WSOL metrics, which upsamples bicubically as
wsolevaluation does (``cv2.resize(..., INTER_CUBIC)``; torch's bicubic kernel is the same, a = −0.75,
and agrees with cv2 to float precision). Values are fractions in [0, 1] (wsolevaluation prints
percentages).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from ..backbones import upsample
from ..errors import VitlensError
from .base import Batch, Metric, check_choice, register, weighted_mean

IOU_THRESHOLDS = (0.3, 0.5, 0.7)  # MaxBoxAccV2 (Choe et al. 2020)
REGIONS = ("auto", "mask", "box")
WSOL_PROTOCOLS = ("vitlens", "wsol")  # the WSOL metrics' protocols (see MaxBoxAcc's card)
_CHUNK = 1 << 23  # binary pixels (image × threshold × H × W) processed at once (bounds memory)


# --- shared steps -----------------------------------------------------------------------------------


def pixel_maps(batch: Batch, maps: Tensor, mode: str = "bilinear") -> Tensor:
    """The maps at image resolution ``[B, H, W]`` (float32, CPU), cached for the batch: ``bilinear`` (the
    shared upsampler) or ``bicubic`` (wsolevaluation's ``cv2.INTER_CUBIC``)."""
    key = "pixels" if mode == "bilinear" else ("pixels", mode)
    if key not in batch.cache:
        if mode == "bilinear":
            batch.cache[key] = upsample(maps.detach().float(), batch.size).cpu()
        else:  # a constant map stays exactly constant (bicubic float noise would survive the normalisation)
            x = maps.detach().float()[:, None]
            up = F.interpolate(x, size=batch.size, mode=mode, align_corners=False)[:, 0]
            flat = (x.amax((1, 2, 3)) == x.amin((1, 2, 3)))[:, None, None]
            batch.cache[key] = torch.where(flat, x[:, :, :1, :1].flatten(1)[..., None], up).cpu()
    return batch.cache[key]


def normalize_maps(pixels: Tensor) -> Tensor:
    """Per-image min-max normalisation to [0, 1] in float64; constant or non-finite maps become zeros
    (wsolevaluation's ``normalize_scoremap``)."""
    x = pixels.double()
    lo = x.amin((1, 2), keepdim=True)
    span = x.amax((1, 2), keepdim=True) - lo
    ok = (span > 0) & torch.isfinite(x).all(2, keepdim=True).all(1, keepdim=True)
    return torch.where(ok, (x - lo) / torch.where(ok, span, 1.0), torch.zeros_like(x))


def normalized_maps(batch: Batch, maps: Tensor, mode: str = "bilinear") -> Tensor:
    key = "normalized" if mode == "bilinear" else ("normalized", mode)
    if key not in batch.cache:
        batch.cache[key] = normalize_maps(pixel_maps(batch, maps, mode))
    return batch.cache[key]


def interpolation(protocol: str) -> str:
    """The upsampling of a WSOL protocol: ``wsol`` bicubic, ``vitlens`` bilinear."""
    return "bicubic" if protocol == "wsol" else "bilinear"


def box_region(batch: Batch) -> Tensor:
    """The union of each image's boxes as a pixel mask ``[B, H, W]`` (boxes inclusive)."""
    boxes, valid = batch.padded_boxes()
    h, w = batch.size
    ys = torch.arange(h, dtype=torch.float64)[None, None, :, None]
    xs = torch.arange(w, dtype=torch.float64)[None, None, None, :]
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    inside = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1) & valid[..., None, None]
    return inside.any(1)


def regions(batch: Batch, region: str) -> tuple[Tensor, Tensor]:
    """Ground-truth region per image and which images have one: the object mask, the union of the boxes,
    or (``auto``) the mask where there is one and the boxes otherwise."""
    has_mask, has_boxes = batch.has_object_mask, batch.has_boxes
    masks = batch.masks.cpu()
    if region == "mask":
        return masks, has_mask
    boxes = box_region(batch)
    if region == "box":
        return boxes, has_boxes
    return torch.where(has_mask[:, None, None], masks, boxes), has_mask | has_boxes


def thresholds_for(step: float) -> np.ndarray:
    """wsolevaluation's ``cam_threshold_list``: ``np.arange(0, 1, step)``."""
    if not 0 < step < 1:
        raise VitlensError(f"threshold_step must be in (0, 1), got {step}")
    return np.arange(0, 1, step)


# --- boxes from maps (wsolevaluation's compute_bboxes_from_scoremaps) ----------------------------------


def quantize(scores: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] → the 8-bit image wsolevaluation thresholds: ``(scoremap * 255).astype(uint8)``."""
    return (scores * 255).astype(np.uint8)


def _runs(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of ``True`` in ``binary`` ``[N, H, W]``: (row key ``plane·H + y``, first x, last x),
    ordered by row key then x."""
    n, h, w = binary.shape
    pad = np.zeros((n * h, w + 2), bool)
    pad[:, 1:-1] = binary.reshape(n * h, w)
    flat = pad.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1])  # alternately: just before a run, last pixel of a run
    row, col = np.divmod(change, w + 2)
    return row[0::2], col[0::2], col[1::2] - 1


def _run_components(binary: np.ndarray, eight: bool):
    """Horizontal runs of every plane of ``binary`` ``[N, H, W]`` and the connected component of each run
    (8- or 4-connected inside a plane, never across planes) → (row key, first x, last x, component, count).

    Runs of one row are linked to the overlapping runs of the next row (found by binary search, since
    runs are sorted), and the run graph's components come from scipy's ``connected_components``: a
    few numpy passes over the stack instead of one labelling per plane. Components are numbered in the
    raster order of their first pixel.
    """
    n, h, w = binary.shape
    key, start, end = _runs(binary)
    r = len(key)
    if not r:
        return key, start, end, np.zeros(0, np.int64), 0
    slack = 1 if eight else 0
    stride = w + 2
    below = (key + 1) * stride
    lo = np.searchsorted(key * stride + end, below + start - slack, "left")
    hi = np.searchsorted(key * stride + start, below + end + slack, "right")
    count = np.where(key % h == h - 1, 0, np.maximum(hi - lo, 0))
    total = int(count.sum())
    src = np.repeat(np.arange(r), count)
    dst = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(total)
    graph = coo_matrix((np.ones(total, np.int8), (src, dst)), shape=(r, r))
    k, comp = connected_components(graph, directed=False)
    return key, start, end, comp.astype(np.int64), k


def _component_boxes(h: int, w: int, key, start, end, comp, k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plane ``[K]``, tight inclusive boxes ``[K, 4]``, pixel counts ``[K]``) of run components."""
    y = key % h
    boxes = np.stack([np.full(k, w), np.full(k, h), np.full(k, -1), np.full(k, -1)], 1)
    np.minimum.at(boxes[:, 0], comp, start)
    np.minimum.at(boxes[:, 1], comp, y)
    np.maximum.at(boxes[:, 2], comp, end)
    np.maximum.at(boxes[:, 3], comp, y)
    plane = np.zeros(k, np.int64)
    plane[comp] = key // h
    sizes = np.bincount(comp, weights=end - start + 1, minlength=k).astype(np.int64)
    return plane, boxes, sizes


def _components(binary: np.ndarray, eight: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of every plane of ``binary`` ``[N, H, W]`` → (plane ``[K]``, tight inclusive
    boxes ``[K, 4]``, pixel counts ``[K]``)."""
    n, h, w = binary.shape
    key, start, end, comp, k = _run_components(binary, eight)
    if not k:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    return _component_boxes(h, w, key, start, end, comp, k)


def _paint(shape: tuple[int, int, int], key, start, end, values) -> np.ndarray:
    """An image ``[N, H, W]`` holding ``values`` on the runs (row key, first x, last x), 0 elsewhere."""
    n, h, w = shape
    out = np.zeros((n * h, w + 1), np.int64)
    np.add.at(out, (key, start), values)
    np.add.at(out, (key, end + 1), -values)
    return out.cumsum(1)[:, :w].reshape(n, h, w)


def contour_areas(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outer contours of every plane of ``binary`` ``[N, H, W]`` as cv2 sees them: (plane ``[K]``, boxes
    ``[K, 4]`` as :func:`contour_boxes`, ``cv2.contourArea`` of the outer contour ``[K]``, raster rank ``[K]``).

    Only outermost components are listed (a component inside another's hole has a smaller contour area,
    so it is never the largest). The area of the polygon through the centres of a component's border
    pixels (Suzuki–Abe border following, 8-connected foreground) equals, on the component with its holes
    filled, the number of 2×2 pixel windows entirely inside plus half the number with exactly three pixels
    inside: thin parts (lines, diagonal chains) enclose no area, enclosed holes count in full. The raster
    rank orders components by their first pixel in row-major order.
    """
    n, h, w = binary.shape
    if not binary.any():
        z = np.zeros(0, np.int64)
        return z, np.zeros((0, 4), np.int64), np.zeros(0), z
    # holes: 4-connected background components that do not touch the image border
    bkey, bstart, bend, bcomp, bk = _run_components(~binary, eight=False)
    _, bboxes, _ = _component_boxes(h, w, bkey, bstart, bend, bcomp, bk)
    inner = (bboxes[:, 0] > 0) & (bboxes[:, 1] > 0) & (bboxes[:, 2] < w - 1) & (bboxes[:, 3] < h - 1)
    hole = inner[bcomp]
    filled = binary | (
        _paint(binary.shape, bkey[hole], bstart[hole], bend[hole], np.ones(int(hole.sum()), np.int64)) > 0
    )
    key, start, end, comp, k = _run_components(filled, eight=True)
    plane, boxes, _ = _component_boxes(h, w, key, start, end, comp, k)
    labels = _paint(filled.shape, key, start, end, comp + 1)  # 0 = background
    f = filled.astype(np.int8)
    inside = f[:, :-1, :-1] + f[:, 1:, :-1] + f[:, :-1, 1:] + f[:, 1:, 1:]
    # the pixels of one 2×2 window are 8-adjacent, so they all belong to one component
    window = np.maximum(
        np.maximum(labels[:, :-1, :-1], labels[:, 1:, :-1]), np.maximum(labels[:, :-1, 1:], labels[:, 1:, 1:])
    )
    weight = (inside == 4) + 0.5 * (inside == 3)
    areas = np.bincount(window.ravel(), weights=weight.ravel(), minlength=k + 1)[1:]
    rank = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(rank, comp, np.arange(len(comp)))
    boxes[:, 2] = np.minimum(boxes[:, 2] + 1, w - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3] + 1, h - 1)
    return plane, boxes, areas, rank


def contour_boxes(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The boxes wsolevaluation gets from ``cv2.findContours(RETR_TREE)`` + ``cv2.boundingRect`` on every plane
    of ``binary`` ``[N, H, W]``: (plane ``[K]``, boxes ``[K, 4]``, pixel counts ``[K]``, 0 for holes).

    Contours are the outer borders of the 8-connected components and the borders of their holes
    (4-connected background components not touching the image border; a hole's border box is the hole's
    box grown by one pixel). A box is ``(x, y, x + w, y + h)`` clipped to the image, as wsolevaluation
    takes cv2's width and height: one pixel past the contour on the right and bottom.
    """
    h, w = binary.shape[1:]
    plane, boxes, sizes = _components(binary, eight=True)
    bg_plane, bg, _ = _components(~binary, eight=False)
    inner = (bg[:, 0] > 0) & (bg[:, 1] > 0) & (bg[:, 2] < w - 1) & (bg[:, 3] < h - 1)
    plane = np.concatenate([plane, bg_plane[inner]])
    boxes = np.concatenate([boxes, bg[inner] + np.array([-1, -1, 1, 1])])
    sizes = np.concatenate([sizes, np.zeros(int(inner.sum()), np.int64)])
    boxes[:, 2] = np.minimum(boxes[:, 2] + 1, w - 1)
    boxes[:, 3] = np.minimum(boxes[:, 3] + 1, h - 1)
    return plane, boxes, sizes


def boxes_from_map(scoremap: Tensor | np.ndarray, threshold: float, holes: bool = False) -> Tensor:
    """Boxes around every connected component of a pixel map at one threshold, largest component first.

    The map ``[H, W]`` must be in [0, 1] (min-max normalised). As in wsolevaluation
    (Choe et al. 2020): the map is quantised to 8 bits, a pixel is kept when its 8-bit value is strictly
    above ``int(threshold · max)``, components are 8-connected, and a box is ``(x0, y0, x1 + 1, y1 + 1)``
    clipped to the image (cv2.boundingRect's width added to the first pixel). ``holes=True`` appends the
    boxes of the holes' borders, which wsolevaluation's contours include (MaxBoxAccV2 scores them too).
    Returns int64 ``[K, 4]``, ``K = 0`` when nothing is kept; the first box is the one MaxBoxAcc scores.
    """
    s = np.asarray(scoremap.detach().cpu().double() if torch.is_tensor(scoremap) else scoremap, dtype=np.float64)
    if s.ndim != 2:
        raise VitlensError(f"boxes_from_map needs one [H, W] map, got shape {tuple(s.shape)}")
    if not np.isfinite(s).all() or s.min() < 0 or s.max() > 1:
        raise VitlensError("boxes_from_map needs a map in [0, 1] (min-max normalise it first)")
    q = quantize(s)
    _, boxes, sizes = contour_boxes((q > int(threshold * q.max()))[None])
    if not holes:
        boxes, sizes = boxes[sizes > 0], sizes[sizes > 0]
    return torch.from_numpy(boxes[np.argsort(-sizes, kind="stable")])


def map_box(heat: torch.Tensor, size: tuple[int, int], threshold: float) -> list[int]:
    """The box ``[x0, y0, x1, y1]`` (pixels of an image of ``size``) that a map implies: upsampled, min-max
    normalised, thresholded at ``threshold`` × its maximum, around the largest component — the box MaxBoxAcc
    scores, in wsolevaluation's convention ``(x, y, x + w, y + h)`` clipped to the image; the whole image for a
    constant map."""
    h, w = size
    pixels = upsample(heat[None].float(), (h, w))[0]
    lo, hi = pixels.min(), pixels.max()
    if hi <= lo:
        return [0, 0, w - 1, h - 1]
    found = boxes_from_map((pixels - lo) / (hi - lo), threshold)
    if not len(found):
        return [0, 0, w - 1, h - 1]
    return [int(v) for v in found[0].tolist()]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive integer boxes (the +1-pixel convention), broadcasting; degenerate pairs give 0."""
    ix = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    iy = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = ix * iy
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    den = area_a + area_b - inter
    return np.where(den > 0, inter / np.where(den > 0, den, 1), 0.0)


def threshold_sweep(
    scores: np.ndarray, gt: np.ndarray, valid: np.ndarray, thresholds: np.ndarray, largest_by: str = "pixels"
):
    """Best IoU per image and threshold ``[B, T]``: over all contours' boxes (MaxBoxAccV2) and for the
    largest component's box (MaxBoxAcc). ``gt`` ``[B, G, 4]`` with ``valid`` ``[B, G]``.

    Every (image, threshold) pair is one plane of a stack handled at once by :func:`contour_boxes`; a
    plane without any contour scores the box (0, 0, 0, 0) as in wsolevaluation. The largest component is
    chosen by ``largest_by``: ``pixels`` — the one with most pixels (first in raster order on ties);
    ``contour`` — wsolevaluation's ``max(contours, key=cv2.contourArea)``: the largest area enclosed by the
    outer contour (:func:`contour_areas`; holes count, thin lines and diagonal chains have area 0), the
    last in raster order on ties, as cv2 lists contours. The two choices differ whenever a component with
    more pixels encloses less area (rings, thin or ragged shapes), not only between near-equal components.
    """
    if largest_by not in ("pixels", "contour"):
        raise VitlensError(f"largest_by must be pixels or contour, got {largest_by!r}")
    q = quantize(scores)
    b, h, w = q.shape
    t = len(thresholds)
    cut = (thresholds[None, :] * q.max(axis=(1, 2))[:, None]).astype(np.int64)
    best = np.full(b * t, -np.inf)
    largest = np.full(b * t, -np.inf)
    per = max(1, _CHUNK // (t * h * w) // (4 if largest_by == "contour" else 1))
    for s in range(0, b, per):
        binary = (q[s : s + per, None] > cut[s : s + per, :, None, None]).reshape(-1, h, w)
        plane, boxes, sizes = contour_boxes(binary)
        if not len(plane):
            continue
        img = s + plane // t
        ious = np.where(valid[img], box_iou(boxes[:, None, :], gt[img]), -1.0).max(1)
        np.maximum.at(best, plane + s * t, ious)
        if largest_by == "contour":
            plane, boxes, area, rank = contour_areas(binary)
            img = s + plane // t
            ious = np.where(valid[img], box_iou(boxes[:, None, :], gt[img]), -1.0).max(1)
            order = np.lexsort((-rank, -area, plane))
        else:
            order = np.lexsort((-sizes, plane))
        plane = plane + s * t
        first = np.r_[True, plane[order][1:] != plane[order][:-1]]
        largest[plane[order][first]] = ious[order][first]
    empty = np.where(valid, box_iou(np.zeros(4), gt), -1.0).max(1)  # [B]
    none = ~np.isfinite(best)
    best[none] = np.repeat(empty, t)[none]
    largest[none] = np.repeat(empty, t)[none]
    return best.reshape(b, t), largest.reshape(b, t)


def sweep(batch: Batch, maps: Tensor, step: float, protocol: str = "vitlens") -> dict:
    """The threshold sweep of the images with boxes, cached for the batch (shared by the box metrics)."""
    key = ("sweep", step, protocol)
    if key not in batch.cache:
        used = batch.has_boxes
        thresholds = thresholds_for(step)
        if used.any():
            scores = normalized_maps(batch, maps, interpolation(protocol))[used].numpy()
            gt, valid = batch.padded_boxes()
            largest_by = "contour" if protocol == "wsol" else "pixels"
            best, largest = threshold_sweep(scores, gt[used].numpy(), valid[used].numpy(), thresholds, largest_by)
        else:
            best = largest = np.zeros((0, len(thresholds)))
        batch.cache[key] = {"used": used, "thresholds": thresholds, "best": best, "largest": largest}
    return batch.cache[key]


# --- metrics ------------------------------------------------------------------------------------------


@register
class PointingGame(Metric):
    """Hit when the map's maximum lies within ``tolerance`` pixels of the object; the share of hits.

    Steps: upsample the map bilinearly to the image; take its maximum (the first in row-major order on
    ties); a hit when some pixel of the region lies within ``tolerance`` (Euclidean, pixels) of it. Zhang et
    al. use 15 px on images of a few hundred pixels; ``tolerance=None`` scales that to the image:
    15 · min(H, W) / 224 (4.3 px at 64 px); ``tolerance=0`` asks for the maximum inside the region, as
    Quantus' ``PointingGame`` (which counts a hit if any tied maximum is inside). Region ``auto``: the
    object mask where the image has one, else the union of its boxes (``mask`` / ``box`` force one).
    Images with a region count; the explained class is the target.
    Reference: Zhang et al. 2018.
    """

    name = "pointing-game"
    paper = "Zhang et al., Top-down Neural Attention by Excitation Backprop, IJCV 2018"
    needs = ("mask or boxes",)

    @classmethod
    def options(cls) -> dict:
        return {"tolerance": None, "region": "auto"}

    def update(self, batch: Batch, maps: Tensor) -> None:
        check_choice(self.name, "region", self.settings["region"], REGIONS)
        region, used = regions(batch, self.settings["region"])
        if not used.any():
            return
        pix = pixel_maps(batch, maps)[used]
        region = region[used]
        h, w = batch.size
        tol = self.settings["tolerance"]
        tol = 15.0 * min(h, w) / 224 if tol is None else float(tol)
        peak = pix.flatten(1).argmax(1)
        py, px = (peak // w).double(), (peak % w).double()
        ys = torch.arange(h, dtype=torch.float64)[None, :, None]
        xs = torch.arange(w, dtype=torch.float64)[None, None, :]
        near = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 <= tol**2
        hit = (near & region).flatten(1).any(1).double()
        self.add("hits", hit.sum())
        self.add("n", len(hit))
        self.record(batch.index[used], hit=hit)

    def result(self) -> dict[str, float]:
        return {self.name: _ratio(self.sums.get("hits"), self.sums["n"])}

    def statistic(self, weights):
        return {self.name: weighted_mean(weights, self.records.get("hit", np.zeros(0)))}


@register
class EnergyPointingGame(Metric):
    """Share of the positive map mass inside the ground-truth region, mean over images.

    Steps: upsample the map bilinearly to the image, clamp at 0, sum inside the region (the union of the
    boxes by default; ``region=mask`` / ``auto`` as the pointing game) over the total; 0 when the map has no
    positive mass. Images with a region count. Reference: Wang et al. 2020 (Score-CAM's energy-based
    pointing game) as used by B-cos (Böhle et al. 2024).
    """

    name = "energy-pointing-game"
    paper = "Wang et al., Score-CAM, CVPR-W 2020 (energy-based pointing game)"
    needs = ("boxes",)

    @classmethod
    def options(cls) -> dict:
        return {"region": "box"}

    def update(self, batch: Batch, maps: Tensor) -> None:
        check_choice(self.name, "region", self.settings["region"], REGIONS)
        region, used = regions(batch, self.settings["region"])
        if not used.any():
            return
        pos = pixel_maps(batch, maps)[used].double().clamp_min(0)
        total = pos.flatten(1).sum(1)
        inside = (pos * region[used]).flatten(1).sum(1)
        share = torch.where(total > 0, inside / torch.where(total > 0, total, 1.0), torch.zeros_like(total))
        self.add("share", share.sum())
        self.add("n", len(share))
        self.record(batch.index[used], share=share)

    def result(self) -> dict[str, float]:
        return {self.name: _ratio(self.sums.get("share"), self.sums["n"])}

    def statistic(self, weights):
        return {self.name: weighted_mean(weights, self.records.get("share", np.zeros(0)))}


class _BoxMetric(Metric):
    """Shared by the threshold-swept box metrics: correct counts per threshold, best single threshold."""

    needs = ("boxes",)
    rows: tuple[float, ...] = (0.5,)
    protocols = WSOL_PROTOCOLS

    @classmethod
    def options(cls) -> dict:
        return {"threshold_step": 0.01, "protocol": "vitlens"}

    def __init__(self, **options):
        super().__init__(**options)
        check_choice(self.name, "protocol", self.settings["protocol"], self.protocols)
        self.thresholds = thresholds_for(float(self.settings["threshold_step"]))
        self.sums["correct"] = torch.zeros(len(self.rows), len(self.thresholds), dtype=torch.float64)

    def ious(self, batch: Batch, maps: Tensor) -> tuple[Tensor, np.ndarray]:
        raise NotImplementedError

    def hits(self, batch: Batch, ious: np.ndarray) -> np.ndarray:
        """``[rows, n, T]`` booleans."""
        return np.stack([ious >= r for r in self.rows])

    def update(self, batch: Batch, maps: Tensor) -> None:
        used, ious = self.ious(batch, maps)
        if not used.any():
            return
        hits = self.hits(batch, ious)
        self.add("correct", torch.from_numpy(hits.sum(1)))
        self.add("n", int(used.sum()))
        self.record(batch.index[used], iou=ious.astype(np.float32), hits=hits.transpose(1, 0, 2))

    def accuracy_replicates(self, weights: np.ndarray) -> np.ndarray:
        """Box accuracy per replicate, IoU level and threshold ``[R, rows, T]``."""
        hits = self.records.get("hits", np.zeros((0, len(self.rows), len(self.thresholds)), bool))
        return weighted_mean(weights, hits)

    def statistic(self, weights):
        return {self.name: self.accuracy_replicates(weights)[:, 0].max(-1)}

    def accuracies(self) -> np.ndarray:
        n = self.sums["n"].item()
        return (self.sums["correct"] / n).numpy() if n else np.full((len(self.rows), len(self.thresholds)), np.nan)

    def curves(self) -> dict:
        acc = self.accuracies()
        if np.isnan(acc).all():
            return {}
        best = acc.argmax(1)
        return {
            "threshold": self.thresholds.tolist(),
            "iou_thresholds": list(self.rows),
            "accuracy": acc.tolist(),
            "best_threshold": self.thresholds[best].tolist(),
        }

    def per_image(self) -> dict[str, list]:
        if not len(self.index):
            return {}
        best = int(self.accuracies()[self.rows.index(0.5) if 0.5 in self.rows else 0].argmax())
        return {"index": self.index.tolist(), "iou": self.records["iou"][:, best].tolist()}


WSOL_CARD = """
    Steps (Choe et al. 2020; reference code clovaai/wsolevaluation, ``evaluation.py`` and ``inference.py``):

    1. Upsample the map to the image: ``protocol=vitlens`` (default) bilinear, ``protocol=wsol`` bicubic
       (``cv2.resize(cam, size, interpolation=cv2.INTER_CUBIC)``).
    2. Min-max normalise per image; a constant or non-finite map becomes all zeros (``normalize_scoremap``).
    3. Quantise to 8 bits, ``(map · 255).astype(uint8)``; at each threshold τ of ``np.arange(0, 1,
       threshold_step)`` keep the pixels strictly above ``int(τ · max)`` (``cv2.threshold``, binary).
    4. Contours of the kept pixels (``cv2.findContours``, ``RETR_TREE``: the outer borders of the
       8-connected components and the borders of their holes); a box is ``cv2.boundingRect`` read as
       ``(x, y, x + w, y + h)`` clipped to ``W − 1, H − 1``; no contour → the box (0, 0, 0, 0).
    5. IoU with the ground-truth boxes (inclusive pixel corners, +1 areas; ``calculate_multiple_iou``),
       the best over ground-truth boxes (and, for MaxBoxAccV2, over estimated boxes).
    6. Accuracy per threshold over the images with boxes; the metric is the best single threshold.

    The largest component (MaxBoxAcc, top-1 loc): ``protocol=vitlens`` the one with most pixels;
    ``protocol=wsol`` the largest ``cv2.contourArea`` of the outer contour, as wsolevaluation (holes count,
    a thin line has area 0; ties go to the last component in raster order, as cv2 lists them). All images
    with at least one box count; the target class does not enter (ground-truth-known localisation).
    """


@register
class MaxBoxAcc(_BoxMetric):
    """Box accuracy (IoU ≥ 0.5) of the largest component's box at the best single threshold over the data
    set (the ground-truth-known localisation accuracy of Choe et al.).
    """

    __doc__ += WSOL_CARD

    name = "maxboxacc"
    paper = "Choe et al., Evaluating WSOL Methods Right, CVPR 2020 (MaxBoxAcc)"

    def ious(self, batch, maps):
        s = sweep(batch, maps, float(self.settings["threshold_step"]), self.settings["protocol"])
        return s["used"], s["largest"]

    def result(self) -> dict[str, float]:
        return {self.name: _best(self.accuracies()[0])}


@register
class MaxBoxAccV2(_BoxMetric):
    """Boxes around all contours (components and holes), best match over estimated × ground-truth boxes,
    mean over IoU 0.3 / 0.5 / 0.7 of the box accuracy at each IoU's own best threshold
    (``maxboxacc-v2/iou30`` … are the three).
    """

    __doc__ += WSOL_CARD

    name = "maxboxacc-v2"
    paper = "Choe et al., Evaluating WSOL Methods Right, CVPR 2020 (MaxBoxAccV2)"
    rows = IOU_THRESHOLDS

    def ious(self, batch, maps):
        s = sweep(batch, maps, float(self.settings["threshold_step"]), self.settings["protocol"])
        return s["used"], s["best"]

    def result(self) -> dict[str, float]:
        per = [_best(a) for a in self.accuracies()]
        out = {self.name: None if None in per else float(np.mean(per))}
        out.update({f"{self.name}/iou{round(r * 100)}": v for r, v in zip(self.rows, per, strict=True)})
        return out

    def statistic(self, weights):
        best = self.accuracy_replicates(weights).max(-1)  # [R, rows]
        out = {self.name: best.mean(1)}
        out.update({f"{self.name}/iou{round(r * 100)}": best[:, i] for i, r in enumerate(self.rows)})
        return out


@register
class Top1Loc(_BoxMetric):
    """Top-1 localisation: the image is classified correctly *and* the largest component's box has
    IoU ≥ 0.5 with a ground-truth box; best single threshold over the data set, as MaxBoxAcc.
    """

    __doc__ += WSOL_CARD

    name = "top1-loc"
    paper = "Russakovsky et al., ILSVRC, IJCV 2015 (top-1 localisation); thresholds as Choe et al. 2020"
    needs = ("boxes", "model")

    def ious(self, batch, maps):
        s = sweep(batch, maps, float(self.settings["threshold_step"]), self.settings["protocol"])
        return s["used"], s["largest"]

    def hits(self, batch, ious):
        correct = batch.correct[batch.has_boxes].numpy()
        return super().hits(batch, ious) & correct[None, :, None]

    def result(self) -> dict[str, float]:
        return {self.name: _best(self.accuracies()[0])}


@register
class PxAP(Metric):
    """Area under the pixel precision-recall curve over all pixels of the split (Choe et al. 2020,
    wsolevaluation's ``MaskEvaluator``).

    Steps: upsample (``protocol=vitlens`` bilinear, ``wsol`` bicubic) and min-max normalise each map as
    the box metrics do; histogram the scores of object and of background pixels over the bins
    ``[0, s), [s, 2s), …, [1 − s, 1), [1, 2), [2, 3]`` (``s = threshold_step``); from the highest bin
    down, ``TP``/``FP`` are the cumulative counts, precision ``TP / (TP + FP)``, recall ``TP / #object``;
    PxAP ``= Σ_l Prec_l · (Rec_l − Rec_{l−1})`` over the levels with a prediction. Images whose mask
    marks at least one pixel count. Pixels in the batch's ``ignore`` region (OpenImages' value-255
    pixels: the ignore boxes minus the object) enter neither histogram; ignore pixels inside the object
    stay object pixels, as in wsolevaluation's ``get_mask``.
    """

    name = "pxap"
    paper = "Choe et al., Evaluating WSOL Methods Right, CVPR 2020 (PxAP)"
    needs = ("mask",)
    protocols = WSOL_PROTOCOLS

    @classmethod
    def options(cls) -> dict:
        return {"threshold_step": 0.01, "protocol": "vitlens"}

    def __init__(self, **options):
        super().__init__(**options)
        check_choice(self.name, "protocol", self.settings["protocol"], self.protocols)
        self.thresholds = thresholds_for(float(self.settings["threshold_step"]))
        # bins [0, bw), …, [1 − bw, 1), [1, 2), [2, 3] as in wsolevaluation's MaskEvaluator
        self.edges = torch.from_numpy(np.append(self.thresholds, [1.0, 2.0, 3.0]))
        self.sums["object"] = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self.sums["background"] = torch.zeros(len(self.edges) - 1, dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        used = batch.has_object_mask
        if not used.any():
            return
        scores = normalized_maps(batch, maps, interpolation(self.settings["protocol"]))[used]
        bins = torch.bucketize(scores, self.edges, right=True) - 1
        mask = batch.masks.cpu()[used]
        background = ~mask
        if batch.ignore is not None:
            background = background & ~batch.ignore.cpu()[used]
        k = len(self.edges) - 1
        offset = torch.arange(len(bins))[:, None, None] * k  # per-image histograms, for the bootstrap
        obj = torch.bincount((bins + offset)[mask], minlength=k * len(bins)).reshape(-1, k)
        bg = torch.bincount((bins + offset)[background], minlength=k * len(bins)).reshape(-1, k)
        self.add("object", obj.sum(0))
        self.add("background", bg.sum(0))
        self.add("n", int(used.sum()))
        self.record(batch.index[used], histograms=torch.stack([obj, bg], 1).numpy().astype(np.float64))

    def _curve(self, obj=None, bg=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Precision, recall and the levels with a prediction, along the last axis of the histograms."""
        if obj is None:
            obj, bg = self.sums["object"].numpy(), self.sums["background"].numpy()
        tp = obj[..., ::-1].cumsum(-1)
        fp = bg[..., ::-1].cumsum(-1)
        nonzero = (tp + fp) != 0
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
            recall = tp / obj.sum(-1, keepdims=True)
        return precision, recall, nonzero

    def per_image(self) -> dict[str, list]:
        """The images scored (their score histograms stay in memory for the bootstrap, not in results files)."""
        return {"index": self.index.tolist()} if len(self.index) else {}

    def statistic(self, weights):
        k = len(self.edges) - 1
        hist = self.records.get("histograms", np.zeros((0, 2, k)))
        sums = weights @ hist.reshape(len(hist), -1)  # [R, 2k]
        obj, bg = sums[:, :k], sums[:, k:]
        precision, recall, nonzero = self._curve(obj, bg)
        ap = np.where(nonzero[:, 1:], np.nan_to_num(precision[:, 1:] * np.diff(recall, axis=-1)), 0.0).sum(-1)
        return {self.name: np.where(obj.sum(-1) > 0, ap, np.nan)}

    def result(self) -> dict[str, float]:
        if not self.sums["object"].sum() or not self.used:
            return {self.name: None}
        precision, recall, nonzero = self._curve()
        return {self.name: float((precision[1:] * np.diff(recall))[nonzero[1:]].sum())}

    def curves(self) -> dict:
        if not self.sums["object"].sum():
            return {}
        precision, recall, nonzero = self._curve()
        return {"precision": precision[nonzero].tolist(), "recall": recall[nonzero].tolist()}


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Per-row average precision ``[B]`` of ``scores`` ``[B, N]`` for binary ``targets`` (scikit-learn's
    ``average_precision_score``: Σ_n (R_n − R_{n−1}) P_n over the distinct scores), fully batched."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    s = scores.gather(1, order)
    t = targets.gather(1, order).double()
    tp = t.cumsum(1)
    n = s.shape[1]
    pos = torch.arange(n).expand_as(s)
    ends = torch.cat([s[:, 1:] != s[:, :-1], torch.ones_like(s[:, :1], dtype=torch.bool)], 1)
    end = torch.where(ends, pos, n).flip(1).cummin(1).values.flip(1)  # last index of each tie group
    precision = tp.gather(1, end) / (end + 1)
    total = t.sum(1)
    return torch.where(total > 0, (t * precision).sum(1) / total.clamp_min(1), torch.zeros_like(total))


@register
class MIoU(Metric):
    """Segmentation test of Chefer et al. (``imagenet_seg_eval.py``), on the images with a mask.

    Steps: upsample the map bilinearly, min-max normalise per image (constant → zeros); foreground = pixels
    above the image's mean score. ``miou`` = mean over {background, foreground} of the data-set IoU
    (intersections and unions summed over all images, ``ε`` added as their code does);
    ``miou/pixel-accuracy`` = correct pixels over all pixels; ``miou/map`` = mean over images of the
    average precision of the two-class scores (1 − map, map) against (background, foreground)
    (scikit-learn's ``average_precision_score``; a constant map scores 0 in both channels).
    """

    name = "miou"
    paper = "Chefer, Gur, Wolf, Transformer Interpretability Beyond Attention Visualization, CVPR 2021"
    needs = ("mask",)

    def __init__(self, **options):
        super().__init__(**options)
        for key in ("inter", "union"):
            self.sums[key] = torch.zeros(2, dtype=torch.float64)
        for key in ("correct", "pixels", "ap"):
            self.sums[key] = torch.zeros((), dtype=torch.float64)

    def update(self, batch: Batch, maps: Tensor) -> None:
        used = batch.has_object_mask
        if not used.any():
            return
        r = normalized_maps(batch, maps)[used].flatten(1)
        gt = batch.masks.cpu()[used].flatten(1)
        fg = r > r.mean(1, keepdim=True)
        inter = torch.stack([(~fg & ~gt).sum(), (fg & gt).sum()])
        union = torch.stack([(~fg | ~gt).sum(), (fg | gt).sum()])
        self.add("inter", inter)
        self.add("union", union)
        self.add("correct", (fg == gt).sum())
        self.add("pixels", gt.numel())
        # Chefer et al. score both classes; a constant map (NaN there) scores 0 in both channels.
        constant = (r.amax(1) == 0)[:, None]
        scores = torch.cat([torch.where(constant, 0.0, 1 - r), r], 1)
        ap = average_precision(scores, torch.cat([~gt, gt], 1))
        self.add("ap", ap.sum())
        self.add("n", int(used.sum()))
        counts = torch.cat([(~fg & ~gt).sum(1, keepdim=True), (fg & gt).sum(1, keepdim=True),
                            (~fg | ~gt).sum(1, keepdim=True), (fg | gt).sum(1, keepdim=True),
                            (fg == gt).sum(1, keepdim=True), torch.full_like(fg[:, :1], gt.shape[1], dtype=torch.long)],
                           1)  # fmt: skip
        self.record(batch.index[used], ap=ap, counts=counts.double())

    def statistic(self, weights):
        counts = weights @ self.records.get("counts", np.zeros((0, 6)))  # [R, 6]
        pixels = counts[:, 5]
        eps = np.spacing(1, dtype=np.float64)
        iou = counts[:, :2] / (eps + counts[:, 2:4])
        empty = weights.sum(1) == 0
        return {
            self.name: np.where(empty, np.nan, iou.mean(1)),
            f"{self.name}/pixel-accuracy": np.where(empty, np.nan, counts[:, 4] / (eps + pixels)),
            f"{self.name}/map": weighted_mean(weights, self.records.get("ap", np.zeros(0))),
        }

    def result(self) -> dict[str, float]:
        if not self.used:
            return {self.name: None, f"{self.name}/pixel-accuracy": None, f"{self.name}/map": None}
        eps = np.spacing(1, dtype=np.float64)
        iou = self.sums["inter"] / (eps + self.sums["union"])
        return {
            self.name: float(iou.mean()),
            f"{self.name}/pixel-accuracy": float(self.sums["correct"] / (eps + self.sums["pixels"])),
            f"{self.name}/map": float(self.sums["ap"] / self.sums["n"]),
        }


def _ratio(total: Tensor | None, n: Tensor) -> float | None:
    return float(total / n) if n.item() and total is not None else None


def _best(acc: np.ndarray) -> float | None:
    return None if np.isnan(acc).all() else float(acc.max())
