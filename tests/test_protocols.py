"""Each named protocol against an independent re-implementation of its paper's reference code, on synthetic
inputs built to hit the cases where the protocols differ: rings (holes), thin components, ties, several
components and several boxes.

References: clovaai/wsolevaluation (``evaluation.py``: ``compute_bboxes_from_scoremaps``,
``calculate_multiple_iou``, ``BoxEvaluator``, ``MaskEvaluator``, ``get_mask``; ``inference.py``:
``cv2.resize(..., INTER_CUBIC)`` and ``normalize_scoremap``); B-cos/B-cos-v2
(``interpretability/analyses/localisation.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.integrate import trapezoid  # np.trapezoid is NumPy >= 2

from vitlens.errors import VitlensError
from vitlens.explainers import Explanation
from vitlens.metrics import Batch, get_metric
from vitlens.metrics.localisation import contour_areas, thresholds_for

# --- wsolevaluation, re-expressed ---------------------------------------------------------------------------


def wsol_resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    return cv2.resize(cam.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)


def wsol_normalize(cam: np.ndarray) -> np.ndarray:
    cam = cam.astype(np.float64).copy()
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    return cam / cam.max()


def wsol_boxes(scoremap: np.ndarray, threshold: float, multi: bool) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    h, w = scoremap.shape
    gray = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, binary = cv2.threshold(gray, int(threshold * np.max(gray)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.array([[0, 0, 0, 0]])
    if not multi:
        contours = [max(contours, key=cv2.contourArea)]
    out = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        out.append([x, y, min(x + bw, w - 1), min(y + bh, h - 1)])
    return np.array(out)


def wsol_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a[:, None].astype(np.int64), b[None].astype(np.int64)
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    den = (
        (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
        + (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
        - inter
    )
    return np.where(den <= 0, 0.0, inter / np.where(den <= 0, 1, den))


def wsol_box_accuracy(scoremaps, gts, thresholds, iou_level: float, multi: bool) -> np.ndarray:
    correct = np.zeros(len(thresholds))
    for s, gt in zip(scoremaps, gts, strict=True):
        for i, t in enumerate(thresholds):
            correct[i] += wsol_iou(wsol_boxes(s, t, multi), gt).max() >= iou_level
    return correct / len(scoremaps)


def wsol_pxap(scoremaps, gt_masks, thresholds) -> float:
    """``gt_masks`` hold 1 (object), 0 (background), 255 (ignored), as ``get_mask`` returns them."""
    edges = np.append(thresholds, [1.0, 2.0, 3.0])
    true_hist = sum(np.histogram(s[m == 1], bins=edges)[0] for s, m in zip(scoremaps, gt_masks, strict=True))
    false_hist = sum(np.histogram(s[m == 0], bins=edges)[0] for s, m in zip(scoremaps, gt_masks, strict=True))
    tp = true_hist[::-1].cumsum().astype(float)
    fn = true_hist.sum() - tp
    fp = false_hist[::-1].cumsum().astype(float)
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
    return float((precision[1:] * np.diff(recall))[nonzero[1:]].sum())


# --- synthetic cases ---------------------------------------------------------------------------------------


def ring(size, cy, cx, r_out, r_in, value=1.0):
    y, x = np.mgrid[:size, :size]
    d = np.hypot(y - cy, x - cx)
    return np.where((d <= r_out) & (d >= r_in), value, 0.0)


def edge_case_maps(size: int = 48) -> list[np.ndarray]:
    """Pixel maps: a ring against a solid blob of fewer pixels; a long thin line against a small square;
    two equal squares (a tie); nested components; a diagonal chain; one-pixel specks; a constant map."""
    rng = np.random.default_rng(0)
    out = []
    m = ring(size, 14, 14, 11, 8)  # many pixels, encloses a big area
    m[30:40, 30:40] = 0.9  # fewer pixels, less area than the ring's outer contour
    out.append(m)
    m = np.zeros((size, size))
    m[5, 2:46] = 1.0  # a thin line: most pixels, contour area 0
    m[20:26, 20:26] = 0.95
    out.append(m)
    m = np.zeros((size, size))
    m[5:12, 5:12] = 1.0
    m[30:37, 28:35] = 1.0  # two equal squares: a tie broken by raster order
    out.append(m)
    m = ring(size, 24, 24, 20, 17)
    m[20:29, 20:29] = 0.8  # a component nested in the ring's hole
    m[2:5, 40:47] = 0.7
    out.append(m)
    m = np.zeros((size, size))
    idx = np.arange(4, 44)
    m[idx, idx] = 1.0  # a diagonal chain (area 0)
    m[30:34, 5:9] = 0.9
    out.append(m)
    m = (rng.random((size, size)) < 0.03).astype(float)  # specks: all area 0, ties everywhere
    m[10:13, 30:33] = 0.5
    out.append(m)
    out.append(np.full((size, size), 0.3))  # constant: normalised to zeros
    for _ in range(5):  # smooth random fields with several blobs
        f = ndimage.gaussian_filter(rng.random((size, size)), 3)
        out.append(f + 0.3 * ring(size, *rng.integers(12, 36, 2), 9, 6))
    return out


def edge_case_boxes(n: int, size: int = 48, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    boxes = [np.array([[3, 3, 25, 25], [30, 30, 39, 39]]), np.array([[2, 4, 45, 6], [20, 20, 25, 25]])]
    boxes += [np.array([[5, 5, 12, 12]]), np.array([[4, 4, 44, 44]])]
    while len(boxes) < n:
        k = int(rng.integers(1, 4))
        x0, y0 = rng.integers(0, size - 8, (2, k))
        boxes.append(np.stack([x0, y0, rng.integers(x0 + 3, size), rng.integers(y0 + 3, size)], 1))
    return boxes[:n]


def run_metric(name, maps, boxes=None, masks=None, ignore=None, **options):
    n, size = len(maps), maps.shape[-1]
    images = torch.zeros(n, 3, size, size)
    labels = torch.zeros(n, dtype=torch.long)
    kw = {}
    if boxes is not None:
        kw["boxes"] = [torch.from_numpy(b).float() for b in boxes]
    if masks is not None:
        kw["masks"] = torch.from_numpy(masks)
    batch = Batch(images, labels, labels, torch.arange(n), ignore=ignore, **kw)
    m = get_metric(name, **options)
    m.update(batch, torch.as_tensor(maps, dtype=torch.float32))
    m.finish()
    return m


# --- tests --------------------------------------------------------------------------------------------------


def test_contour_area_equals_cv2_on_random_shapes():
    """The largest cv2.contourArea over all RETR_TREE contours and its bounding box, plane by plane."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    planes = []
    for _ in range(400):
        h, w = rng.integers(3, 24, 2)
        p = rng.random((h, w)) < rng.uniform(0.1, 0.8)
        if rng.random() < 0.3:  # rings and nested blocks
            p |= ring(max(h, w), h // 2, w // 2, min(h, w) / 2 - 1, min(h, w) / 2 - 3)[:h, :w] > 0
        planes.append(p)
    for p in planes:
        contours = cv2.findContours(p.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        plane, boxes, areas, rank = contour_areas(p[None])
        if not contours:
            assert len(plane) == 0
            continue
        c = max(contours, key=cv2.contourArea)
        assert areas.max() == cv2.contourArea(c)
        x, y, bw, bh = cv2.boundingRect(c)
        h, w = p.shape
        pick = np.lexsort((-rank, -areas))[0]
        assert boxes[pick].tolist() == [x, y, min(x + bw, w - 1), min(y + bh, h - 1)]


def test_contour_area_of_thin_shapes_and_holes():
    line = np.zeros((1, 5, 9), bool)
    line[0, 2, 1:8] = True  # 7 pixels, no area
    _, _, areas, _ = contour_areas(line)
    assert areas.tolist() == [0.0]
    square_ring = np.zeros((1, 7, 7), bool)
    square_ring[0, 1:6, 1:6] = True
    square_ring[0, 2:5, 2:5] = False  # 16 pixels, encloses a 4×4 square between the border centres
    assert contour_areas(square_ring)[2].tolist() == [16.0]


@pytest.mark.parametrize("grid", [None, 12])
def test_wsol_protocol_box_metrics_equal_wsolevaluation(grid):
    """MaxBoxAcc and MaxBoxAccV2 under ``protocol=wsol`` equal wsolevaluation's at every threshold: on the
    pixel maps themselves (``grid=None``) and on patch maps upsampled bicubically (``grid=12``)."""
    maps = np.stack(edge_case_maps()).astype(np.float32)
    size = maps.shape[-1]
    if grid is not None:  # bicubic float noise on a constant map is amplified by cv2's pipeline: see below
        maps = np.delete(maps, 6, axis=0)
    if grid is not None:  # patch-level maps: pool the pixel maps to a grid, let both sides upsample
        maps = F.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None], grid)[:, 0].numpy()
    boxes = edge_case_boxes(len(maps))
    scoremaps = [wsol_normalize(wsol_resize(m, (size, size))) for m in maps]
    th = thresholds_for(0.01)
    images = torch.zeros(len(maps), 3, size, size)
    labels = torch.zeros(len(maps), dtype=torch.long)
    batch = Batch(images, labels, labels, torch.arange(len(maps)), boxes=[torch.from_numpy(b).float() for b in boxes])
    v1, v2 = get_metric("maxboxacc", protocol="wsol"), get_metric("maxboxacc-v2", protocol="wsol")
    for m in (v1, v2):
        m.update(batch, torch.from_numpy(maps))
        m.finish()
    want1 = wsol_box_accuracy(scoremaps, boxes, th, 0.5, multi=False)
    assert np.array_equal(v1.accuracies()[0], want1)
    want2 = np.stack([wsol_box_accuracy(scoremaps, boxes, th, r, multi=True) for r in (0.3, 0.5, 0.7)])
    assert np.array_equal(v2.accuracies(), want2)
    assert v1.result()["maxboxacc"] == pytest.approx(want1.max())
    assert v2.result()["maxboxacc-v2"] == pytest.approx(want2.max(1).mean())


def test_default_protocol_differs_from_wsol_where_it_should():
    """On the ring and the thin line, the component with most pixels is not the one with the largest
    contour area: the default (pixel count) scores another box than wsolevaluation."""
    maps = np.stack(edge_case_maps()[:2]).astype(np.float32)
    boxes = [np.array([[30, 30, 39, 39]]), np.array([[20, 20, 25, 25]])]  # the smaller-area blobs' boxes
    default = run_metric("maxboxacc", maps, boxes, threshold_step=0.5)
    wsol = run_metric("maxboxacc", maps, boxes, threshold_step=0.5, protocol="wsol")
    # at τ = 0.5 both components are kept; by pixels the ring / the line wins, by contour area the ring
    # (area ≫ the blob's) and the square (the line has none)
    assert default.accuracies()[0, 1] == 0.0
    assert wsol.accuracies()[0, 1] == 0.5


def test_constant_map_stays_constant_under_bicubic_upsampling():
    """wsolevaluation resizes a constant map to one with float noise (±1e-8), which its normalisation
    stretches to [0, 1]: the box is then noise. vitlens keeps a constant map constant (scored as all zeros)."""
    flat = np.full((1, 12, 12), 0.3, np.float32)
    noisy = wsol_resize(flat[0], (48, 48))
    assert noisy.min() != noisy.max()  # the reference's artefact this guards against
    batch = Batch(torch.zeros(1, 3, 48, 48), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.arange(1))  # fmt: skip
    from vitlens.metrics.localisation import normalized_maps

    assert normalized_maps(batch, torch.from_numpy(flat), "bicubic").abs().max().item() == 0.0


def test_bicubic_upsampling_equals_cv2():
    rng = np.random.default_rng(3)
    for g, s in [((7, 7), (224, 224)), ((5, 3), (40, 33))]:
        m = rng.random(g).astype(np.float32)
        batch = Batch(torch.zeros(1, 3, *s), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.arange(1))  # fmt: skip
        from vitlens.metrics.localisation import pixel_maps

        ours = pixel_maps(batch, torch.from_numpy(m)[None], "bicubic")[0].numpy()
        assert np.abs(ours - wsol_resize(m, s)).max() < 1e-6


def test_pxap_with_ignore_region_equals_wsolevaluation():
    maps = np.stack(edge_case_maps()).astype(np.float32)
    n, size = len(maps), maps.shape[-1]
    rng = np.random.default_rng(5)
    obj = np.zeros((n, size, size), bool)
    ignore_box = np.zeros((n, size, size), bool)
    for i in range(n):
        x0, y0 = rng.integers(0, size // 2, 2)
        obj[i, y0 : y0 + 15, x0 : x0 + 12] = True
        x0, y0 = rng.integers(0, size // 2, 2)
        ignore_box[i, y0 : y0 + 20, x0 : x0 + 20] = True  # overlaps the object on some images
    ignore = ignore_box & ~obj
    gt = obj.astype(np.uint8) + 255 * ignore.astype(np.uint8)
    th = thresholds_for(0.01)
    for protocol in ("vitlens", "wsol"):
        if protocol == "wsol":
            scoremaps = [wsol_normalize(wsol_resize(m, (size, size))) for m in maps]
        else:
            scoremaps = [wsol_normalize(m) for m in maps]  # same size: bilinear is the identity
        got = run_metric("pxap", maps, masks=obj, ignore=torch.from_numpy(ignore_box), protocol=protocol)
        assert got.result()["pxap"] == pytest.approx(wsol_pxap(scoremaps, gt, th), abs=1e-12)
    without = run_metric("pxap", maps, masks=obj)
    assert without.result()["pxap"] != pytest.approx(got.result()["pxap"])


def test_protocol_option_is_checked():
    with pytest.raises(VitlensError, match="protocol='cv2' is not one of vitlens, wsol"):
        get_metric("maxboxacc", protocol="cv2")
    with pytest.raises(VitlensError, match="protocol"):
        get_metric("pxap", protocol="bcos")


# --- B-cos-v2's grid pointing game, re-expressed --------------------------------------------------------------


def bcos_localisation(attributions: torch.Tensor, smooth: int, single: int) -> torch.Tensor:
    """``LocalisationAnalyser.analysis`` for one multi-image: ``attributions`` ``[n_imgs, 1, nS, nS]`` (one
    map per target, target i's image placed column-major) → the share of target i in its own cell."""
    if smooth:
        attributions = F.avg_pool2d(attributions, smooth, stride=1, padding=(smooth - 1) // 2)
    attributions = attributions.clamp(min=0)
    contribs = F.avg_pool2d(attributions, single, stride=single).permute(0, 1, 3, 2).reshape(len(attributions), -1)
    total = contribs.sum(1, keepdim=True)
    contribs = torch.where(total * contribs > 0, contribs / total, torch.zeros_like(contribs))
    return torch.stack([c[i] for i, c in enumerate(contribs)])


def bcos_confident(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``compute_sorted_confs`` + ``get_conf_mask_v``: correct, and sigmoid of the top logit above 0.5."""
    top, classes = logits.max(1)
    return (classes == labels) & (top.sigmoid() > threshold)


class GridData:
    grid = 2

    def __init__(self, canvases):
        self.canvas = [{"image": c} for c in canvases]


S = 8  # canvas side; the grid image is 16 × 16 with 4 × 4-pixel patches
CANVAS_LOGITS = torch.tensor(
    [
        [-5.0, -5.0, -0.5, -5.0],  # class 2: softmax 0.97 but sigmoid 0.38 — bcos drops it, vitlens keeps it
        [0.2, 0.1, 0.15, 0.18],  # class 0: softmax 0.26 but sigmoid 0.55 — bcos keeps it, vitlens drops it
        [-3.0, -3.0, -3.0, 4.0],  # class 3: both keep it
        [2.0, 1.0, 0.0, 0.0],  # class 1, misclassified: both drop it
    ]
)
CLASSES = torch.tensor([2, 0, 3, 1])


def canvas_model(x):
    return CANVAS_LOGITS[(x[:, 0, 0, 0] * 10).round().long()]  # the canvas id / 10 is in its red channel


class PixelExplainer:
    """A stand-in for the B-cos explainer: seeded pixel contributions with negative values, their patch sums
    as the map."""

    def __init__(self, seed):
        self.seed = seed

    def contributions(self, images, targets):
        out = []
        for image, t in zip(images, targets.tolist(), strict=True):
            g = torch.Generator().manual_seed(self.seed * 100 + int(t) + int(image.sum().item()))
            out.append(torch.randn(2 * S, 2 * S, generator=g, dtype=torch.float64) + 0.3)
        return torch.stack(out)

    def __call__(self, images, targets):
        contributions = self.contributions(images, targets)
        maps = F.avg_pool2d(contributions[:, None], 4)[:, 0] * 16
        return Explanation(maps, "bcos", extras={"contributions": contributions})


class PatchExplainer(PixelExplainer):
    """Maps only: the bcos protocol upsamples them by nearest neighbour."""

    def __call__(self, images, targets):
        out = []
        for t in targets.tolist():
            g = torch.Generator().manual_seed(self.seed * 100 + int(t))
            out.append(torch.randn(4, 4, generator=g) + 0.2)
        return Explanation(torch.stack(out), "patches")


def grid_batch(explainer, n_grids=3):
    canvases = torch.zeros(4, 3, S, S)
    canvases[:, 0] = torch.arange(4.0)[:, None, None] / 10
    images = torch.rand(n_grids, 3, 2 * S, 2 * S, generator=torch.Generator().manual_seed(1))
    # cell i holds canvas i, column-major as in B-cos' make_multi_image
    cells = torch.tensor([[(i // 2) * S, (i % 2) * S, (i // 2) * S + S - 1, (i % 2) * S + S - 1] for i in range(4)])
    extra = {
        "cells": cells[None].repeat(n_grids, 1, 1).float(),
        "labels": CLASSES[None].repeat(n_grids, 1),
        "sources": torch.arange(4)[None].repeat(n_grids, 1),
        "dataset": GridData(canvases),
    }
    labels = CLASSES[:1].repeat(n_grids)
    return Batch(images, labels, labels, torch.arange(n_grids), model=canvas_model, explainer=explainer, extra=extra)


@pytest.mark.parametrize("smooth", [0, 3, 5])
@pytest.mark.parametrize("kind", ["pixels", "patches"])
def test_bcos_protocol_equals_bcos_localisation(smooth, kind):
    explainer = PixelExplainer(7) if kind == "pixels" else PatchExplainer(7)
    batch = grid_batch(explainer)
    m = get_metric("grid-pointing-game", protocol="bcos", smooth=smooth)
    m.update(batch, torch.zeros(len(batch.images), 4, 4))
    m.finish()
    keep = bcos_confident(CANVAS_LOGITS, CLASSES)
    assert keep.tolist() == [False, True, True, False]
    want = []
    for image in batch.images:
        if kind == "pixels":
            attributions = explainer.contributions(image[None].repeat(4, 1, 1, 1), CLASSES)
        else:
            maps = explainer(image[None].repeat(4, 1, 1, 1), CLASSES).maps
            attributions = F.interpolate(maps[:, None], scale_factor=4)
            attributions = attributions[:, 0]
        want.append(bcos_localisation(attributions[:, None].double(), smooth, S)[keep])
    want = torch.stack(want)
    assert m.records["cell"].tolist() == [1, 2] * len(batch.images)
    assert np.allclose(m.records["score"], want.flatten().numpy(), atol=1e-12)
    assert m.result()["grid-pointing-game"] == pytest.approx(want.mean().item())


def test_grid_protocols_select_different_cells_and_options_are_checked():
    m = get_metric("grid-pointing-game")
    batch = grid_batch(PatchExplainer(3))
    m.update(batch, torch.zeros(3, 4, 4))
    m.finish()
    assert m.records["cell"].tolist() == [0, 2] * 3  # softmax > 0.5 and correct
    with pytest.raises(VitlensError, match="odd kernel"):
        get_metric("grid-pointing-game", protocol="bcos", smooth=4)
    with pytest.raises(VitlensError, match="smooth belongs to protocol=bcos"):
        get_metric("grid-pointing-game", smooth=3)


# --- the protocol switch of `vitlens evaluate` -----------------------------------------------------------------


def test_evaluate_protocol_sets_the_metrics_that_follow_it(capsys):
    from conftest import committed
    from conftest import run_cli as run
    from vitlens.metrics import evaluate
    from vitlens.metrics.evaluate import apply_protocol

    opts = apply_protocol("wsol", ["maxboxacc", "pxap", "deletion"], {"pxap": {"protocol": "vitlens"}})
    assert opts == {"maxboxacc": {"protocol": "wsol"}, "pxap": {"protocol": "vitlens"}}  # explicit options win
    with pytest.raises(VitlensError, match="no chosen metric follows protocol 'bcos'"):
        apply_protocol("bcos", ["maxboxacc", "pxap"], {})
    model = committed("counting-vit")
    args = dict(limit=8, batch_size=8, progress=False)
    wsol = evaluate(model, "attention", "maxboxacc,maxboxacc-v2,pxap", "counting:test", protocol="wsol", **args)
    again = evaluate(model, "attention", "maxboxacc,maxboxacc-v2,pxap", "counting:test", **args, options={
        k: {"protocol": "wsol"} for k in ("maxboxacc", "maxboxacc-v2", "pxap")})  # fmt: skip
    assert wsol["results"] == again["results"]
    code, out, err = run(["evaluate", "--model", str(model), "--methods", "attention", "--metrics", "deletion",
                          "--data", "counting:test", "--limit", "2", "--protocol", "wsol"], capsys)  # fmt: skip
    assert code == 2 and "no chosen metric follows protocol 'wsol'" in err


# --- RISE's CausalMetric and Chefer et al.'s perturbation test, re-expressed --------------------------------------


def rise_gkern(klen=11, nsig=5):
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = ndimage.gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    kern[0, 0] = k
    kern[1, 1] = k
    kern[2, 2] = k
    return torch.from_numpy(kern.astype("float32"))


def rise_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


def rise_single_run(model, img, explanation, mode, step, substrate_fn):
    """``CausalMetric.single_run`` for one normalised image ``[1, 3, H, W]`` and its saliency ``[H, W]``."""
    hw = img.shape[-2] * img.shape[-1]
    pred = model(img)
    c = int(pred.argmax(1))
    n_steps = (hw + step - 1) // step
    if mode == "del":
        start, finish = img.clone(), substrate_fn(img)
    else:
        start, finish = substrate_fn(img), img.clone()
    scores = np.empty(n_steps + 1)
    salient_order = np.flip(np.argsort(explanation.reshape(-1, hw), axis=1), axis=-1)
    for i in range(n_steps + 1):
        scores[i] = float(model(start)[0, c])
        if i < n_steps:
            coords = salient_order[:, step * i : step * (i + 1)]
            s, f = start.numpy().reshape(1, 3, hw), finish.numpy().reshape(1, 3, hw)
            s[0, :, coords] = f[0, :, coords]
            start = torch.from_numpy(s.reshape(start.shape))
    return rise_auc(scores)


def chefer_accuracy(model, data, vis, target, neg):
    """``pertubation_eval_from_hdf5.py``: top-1 correctness ``[B, 10]`` at 0 %, 10 %, …, 90 % of the pixels
    set to 0 (the most relevant first; ``neg``: the map negated)."""
    base = data.shape[-2] * data.shape[-1]
    correct = [(model(data).argmax(1) == target).numpy()]
    vis = (-vis if neg else vis).reshape(len(data), -1)
    for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        _data = data.clone()
        _, idx = torch.topk(vis, int(base * f), dim=-1)
        idx = idx.unsqueeze(1).repeat(1, data.shape[1], 1)
        _data = _data.reshape(len(data), data.shape[1], -1).scatter_(-1, idx, 0).reshape(data.shape)
        correct.append((model(_data).argmax(1) == target).numpy())
    return np.stack(correct, 1).astype(float)


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import tiny_timm
    from vitlens.backbones import adapt

    return adapt(tiny_timm())


def perturbation_case(backbone, n=4, seed=0, grid=4):
    """Random images and maps; ``grid=32`` gives pixel-level maps (no ties: bilinear upsampling of a patch map
    repeats the border values, and RISE's quicksort orders ties arbitrarily)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    maps = torch.rand(n, grid, grid, generator=g)
    with torch.no_grad():
        logits = backbone(images)
    labels = logits.argmax(1).clone()
    labels[::2] = (labels[::2] + 1) % 5  # half the images "misclassified"
    return Batch(images, labels, labels, torch.arange(n), model=backbone, logits=logits), maps


def test_rise_protocol_equals_causal_metric(tiny_model):
    batch, maps = perturbation_case(tiny_model, grid=32)
    mean = torch.tensor(tiny_model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.preprocessing.std).view(1, 3, 1, 1)

    def softmax_model(t):  # RISE: nn.Sequential(model, Softmax) on normalised images
        with torch.no_grad():
            return tiny_model.model(t).softmax(1)

    kern = rise_gkern()
    blur = lambda x: F.conv2d(x, kern, padding=11 // 2)
    pixels = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0].numpy()
    for name, mode, substrate in (("deletion", "del", torch.zeros_like), ("insertion", "ins", blur)):
        m = get_metric(name, protocol="rise")
        batch.cache = {}
        m.update(batch, maps)
        m.finish()
        want = [
            rise_single_run(softmax_model, ((img[None] - mean) / std), pixels[i], mode, 32, substrate)
            for i, img in enumerate(batch.images)
        ]
        assert np.allclose(m.records["probability"], want, atol=1e-5), name
        assert len(m.curves()["fraction"]) == 33  # one row of 32 pixels per step: 32 steps


@pytest.mark.parametrize("name, neg", [("positive-perturbation", False), ("negative-perturbation", True)])
def test_chefer_protocol_equals_their_perturbation_test(tiny_model, name, neg):
    batch, maps = perturbation_case(tiny_model, n=6, seed=1, grid=32)  # no ties: torch.topk orders them freely
    pixels = F.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    with torch.no_grad():
        correct = chefer_accuracy(tiny_model, batch.images, pixels, batch.labels, neg)
    m = get_metric(name, protocol="chefer")
    m.update(batch, maps)
    m.finish()
    x = np.arange(10) / 10
    assert m.result()[name] == pytest.approx(trapezoid(correct.mean(0), x))  # their np.trapz
    assert np.allclose(m.curves()["accuracy"], correct.mean(0))
    assert m.curves()["fraction"] == pytest.approx(list(x))


def test_perturbation_protocols_fix_their_settings():
    with pytest.raises(VitlensError, match="protocol=rise sets fill itself"):
        get_metric("deletion", protocol="rise", fill="zero")
    with pytest.raises(VitlensError, match="protocol='chefer' is not one of vitlens, rise"):
        get_metric("deletion", protocol="chefer")
    with pytest.raises(VitlensError, match="protocol='rise' is not one of vitlens, chefer"):
        get_metric("positive-perturbation", protocol="rise")


# --- ROAD against pytorch-grad-cam's ROADCombined (tleemann/road_evaluation's imputation) -------------------------


def test_linear_imputation_equals_road_evaluation():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from vitlens.metrics.perturbation import linear_impute

    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((3, 20, 17))).float()
    for p in (0.1, 0.5, 0.9):
        removed = torch.from_numpy(rng.random((20, 17)) < p)
        removed[0, :5] = True  # removed pixels on the border and in runs
        want = NoisyLinearImputer(noise=0.0)(image, (~removed).float())
        got = linear_impute(image, removed)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(got[:, ~removed], image[:, ~removed])


def test_road_equals_grad_cam_road_combined(tiny_model):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    batch, maps = perturbation_case(tiny_model, n=3, seed=2, grid=32)
    mean = torch.tensor(tiny_model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.preprocessing.std).view(1, 3, 1, 1)
    normalised = (batch.images - mean) / std
    cams = maps.numpy().astype(np.float32)
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in batch.targets]
    imputer = NoisyLinearImputer(noise=0.0)

    def after(removal, p):
        metric = PerturbationConfidenceMetric(removal(p, imputer))
        return metric(normalised, cams, targets, tiny_model.model, return_diff=False)

    with torch.no_grad():
        morf = np.mean([after(RemoveMostRelevantFirst, p) for p in range(10, 100, 10)], 0)
        lerf = np.mean([after(RemoveLeastRelevantFirst, p) for p in range(10, 100, 10)], 0)
    m = get_metric("road", noise=0.0)
    m.update(batch, maps)
    m.finish()
    assert np.allclose(m.records["morf"], morf, atol=1e-5)
    assert np.allclose(m.records["lerf"], lerf, atol=1e-5)
    assert np.allclose(m.records["road"], (lerf - morf) / 2, atol=1e-5)  # ROADCombined
    assert m.result()["road"] == pytest.approx(float(np.mean((lerf - morf) / 2)), abs=1e-5)
    noisy = get_metric("road")
    noisy.update(batch, maps)
    noisy.finish()
    again = get_metric("road")
    again.update(batch, maps)
    again.finish()
    assert np.array_equal(noisy.records["road"], again.records["road"])  # the noise is seeded
    assert not np.allclose(noisy.records["road"], m.records["road"], atol=1e-9)


def test_road_runs_when_named_not_with_all():
    from vitlens.data import open_dataset
    from vitlens.metrics.evaluate import metric_names

    data = open_dataset("counting:test")
    assert "road" not in metric_names("all", data) and "deletion" in metric_names("all", data)
    assert metric_names("road,deletion", data) == ["road", "deletion"]


def diffmask_auc_curves(model, images, attributions, positive, mean, std, patch=8, num_tokens=7, k=1):
    """Vision DiffMask's ``auc_kld`` and ``auc_accuracy`` (``quantitative_comparison.ipynb``) for one
    normalised image ``[1, 3, H, W]`` and its pixel attributions ``[1, H, W]``: the −log p and p curves of
    the class predicted on the clean image, ``patch² · num_tokens`` pixels per step."""
    b, h, w = attributions.shape
    attributions = attributions.reshape(b, -1)
    with torch.no_grad():
        labels = model(images).softmax(-1).argmax(-1)
    kld, prob = [], []
    for i in range(0, int(k * attributions.shape[1]) + 1, patch * patch * num_tokens):
        keep_k = attributions.shape[1] - i
        idx = attributions.topk(keep_k, dim=1, largest=not positive).indices.sort()[0]
        torch.manual_seed(123)
        f = torch.rand((b, images.shape[1], h, w)) * 2 - 1
        rows, cols = idx[0] // w, idx[0] % w
        f[0, :, rows, cols] = images[0, :, rows, cols]
        with torch.no_grad():
            probs = model(f).softmax(-1)
        target = F.one_hot(labels, num_classes=probs.shape[-1]).float()
        kld.append(F.kl_div(probs.log(), target, reduction="none").sum(-1).mean().item())
        prob.append(probs[range(b), labels].mean().item())
    return np.array(kld), np.array(prob)


@pytest.mark.parametrize("name, positive", [("positive-perturbation", True), ("negative-perturbation", False)])
def test_diffmask_protocol_equals_their_auc_kld(tiny_model, name, positive):
    batch, maps = perturbation_case(tiny_model, n=3, seed=2, grid=32)  # pixel maps without ties
    mean = torch.tensor(tiny_model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.preprocessing.std).view(1, 3, 1, 1)
    m = get_metric(name, protocol="diffmask")
    m.update(batch, maps)
    m.finish()
    want_kl, want_p = [], []
    for image, pixel_map in zip(batch.images, maps, strict=True):
        kld, prob = diffmask_auc_curves(
            tiny_model.model, (image[None] - mean) / std, pixel_map[None], positive, mean, std
        )
        assert len(kld) == len(m.curves()["fraction"]) == 3  # 0, 448 and 896 of 1,024 pixels removed
        want_kl.append(trapezoid(kld))  # their table: np.trapz(curve), unit spacing
        want_p.append(trapezoid(prob))
    assert np.allclose(m.records["kl"], want_kl, rtol=1e-5)
    assert np.allclose(m.records["probability"], want_p, atol=1e-6)
    result = m.result()
    assert result[name] == pytest.approx(np.mean(want_p)) and result[f"{name}/kl"] == pytest.approx(np.mean(want_kl))
    assert m.direction(f"{name}/kl") == (1 if positive else -1) and m.direction(name) == (-1 if positive else 1)
