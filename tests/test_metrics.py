"""Metrics: hand-computed tiny cases, the wsolevaluation algorithm re-expressed with cv2, and behaviour on
the committed counting classifier (a perfect map beats a random one; deleting the relevant patches hurts)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from conftest import committed, tiny_timm
from vitlens.backbones import adapt, upsample
from vitlens.data import collate, open_dataset
from vitlens.errors import VitlensError
from vitlens.explainers import Explanation, get_explainer
from vitlens.metrics import METRICS, Batch, boxes_from_map, get_metric
from vitlens.metrics.localisation import average_precision, normalize_maps, threshold_sweep, thresholds_for
from vitlens.metrics.perturbation import fill_images
from vitlens.metrics.sanity import spearman
from vitlens.models import load_model

# --- helpers ----------------------------------------------------------------------------------------------


def score(name: str, batch: Batch, maps: torch.Tensor, **options) -> dict:
    batch.cache, batch.shared = {}, {}  # the caches hold this batch's maps: new maps, new caches
    m = get_metric(name, **options)
    m.update(batch, maps)
    m.finish()
    return m.result()


class PatchModel(nn.Module):
    """Two classes; P(class 0) = Σ_patches weight · mean of the patch's red channel (2×2 patches of 2 px)."""

    def __init__(self, weights):
        super().__init__()
        self.w = torch.tensor(weights, dtype=torch.float64)

    def forward(self, x):
        means = torch.nn.functional.avg_pool2d(x[:, :1].double(), 2)[:, 0].flatten(1)  # [B, 4]
        p = (means * self.w).sum(1).clamp(0, 1)
        return torch.log(torch.stack([p, 1 - p], 1).clamp_min(1e-12))


WEIGHTS = [[0.1, 0.2], [0.3, 0.4]]  # row-major order is the *least* relevant first


def perturbation_batch(n: int = 1) -> tuple[Batch, torch.Tensor]:
    images = torch.ones(n, 3, 4, 4)
    labels = torch.zeros(n, dtype=torch.long)
    model = PatchModel([v for row in WEIGHTS for v in row])
    return Batch(images, labels, labels, torch.arange(n), model=model), torch.tensor(WEIGHTS)[None].repeat(n, 1, 1)


def auc(points):
    p = np.asarray(points, dtype=float)
    return (p.sum() - p[0] / 2 - p[-1] / 2) / (len(p) - 1)


# --- perturbation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, curve",
    [
        ("perfect", [1, 0.6, 0.3, 0.1, 0]),  # removes 0.4, 0.3, 0.2, 0.1
        ("inverted", [1, 0.9, 0.7, 0.4, 0]),
        ("uniform", [1, 0.9, 0.7, 0.4, 0]),  # ties keep row-major order
    ],
)
def test_deletion_and_positive_perturbation_by_hand(kind, curve):
    batch, perfect = perturbation_batch()
    maps = {"perfect": perfect, "inverted": -perfect, "uniform": torch.ones_like(perfect)}[kind]
    opts = {"fill": "zero", "steps": 4}
    assert score("deletion", batch, maps, **opts)["deletion"] == pytest.approx(auc(curve))
    pos = score("positive-perturbation", batch, maps, **opts)
    assert pos["positive-perturbation/probability"] == pytest.approx(auc(curve))
    assert pos["positive-perturbation"] == pytest.approx(auc([c > 0.5 for c in curve]))  # class 0 wins while p > .5


def test_insertion_and_negative_perturbation_by_hand():
    batch, perfect = perturbation_batch()
    opts = {"fill": "zero", "steps": 4}
    assert score("insertion", batch, perfect, **opts)["insertion"] == pytest.approx(auc([0, 0.4, 0.7, 0.9, 1]))
    assert score("insertion", batch, -perfect, **opts)["insertion"] == pytest.approx(auc([0, 0.1, 0.3, 0.6, 1]))
    neg = score("negative-perturbation", batch, perfect, **opts)  # least relevant first: 0.1, 0.2, 0.3, 0.4
    assert neg["negative-perturbation/probability"] == pytest.approx(auc([1, 0.9, 0.7, 0.4, 0]))
    assert neg["negative-perturbation"] == pytest.approx(auc([1, 1, 1, 0, 0]))


def test_perturbation_steps_granularity_and_fill():
    batch, perfect = perturbation_batch()
    # 2 steps over 4 patches: remove 0, 2, 4 patches
    assert score("deletion", batch, perfect, fill="zero", steps=2)["deletion"] == pytest.approx(auc([1, 0.3, 0]))
    # pixel granularity on a pixel map that is constant per patch ranks whole patches first
    pixel_map = perfect.repeat_interleave(2, 1).repeat_interleave(2, 2)
    got = score("deletion", batch, pixel_map, fill="zero", granularity="pixel", steps=4)["deletion"]
    assert got == pytest.approx(auc([1, 0.6, 0.3, 0.1, 0]))
    # the mean of an all-ones image is one: nothing changes
    assert score("deletion", batch, perfect, fill="mean", steps=4)["deletion"] == pytest.approx(1.0)
    with pytest.raises(VitlensError, match="fill='grey' is not one of mean, blur, zero, noise"):
        get_metric("deletion", fill="grey")
    with pytest.raises(VitlensError, match="unknown option"):
        get_metric("deletion", nope=1)


def test_fills():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 12, 12)
    mean = fill_images(images, "mean", torch.arange(2))
    assert torch.allclose(mean[:, :, 3, 5], images.mean((2, 3)))
    assert (fill_images(images, "zero", torch.arange(2)) == 0).all()
    flat = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(fill_images(flat, "blur", torch.arange(1)), flat)
    a = fill_images(images, "noise", torch.tensor([5, 9]))
    b = fill_images(images[1:], "noise", torch.tensor([9]))
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])  # seeded by the data-set index


def test_perturbation_metrics_share_batched_forwards():
    batch, perfect = perturbation_batch(3)
    calls = []
    model = batch.model
    batch.model = lambda x: calls.append(len(x)) or model(x)
    names = ("deletion", "positive-perturbation", "insertion", "negative-perturbation")
    metrics = [get_metric(n, fill="zero", steps=4) for n in names]
    for m in metrics:
        m.update(batch, perfect)
        m.finish()
    assert calls == [3] * 10  # one forward per step per batch, two curves of K + 1 = 5 steps for four metrics
    insertion, negative = metrics[2].records["probability"], metrics[3].records["probability"]
    assert np.allclose(insertion, negative)  # negative perturbation is insertion read backwards


def test_perturbation_batched_equals_single():
    batch, perfect = perturbation_batch(3)
    batch.images[1, 0, :2, :2] = 0.5
    maps = perfect.clone()
    maps[2] = -maps[2]
    together = get_metric("deletion", fill="zero", steps=4)
    together.update(batch, maps)
    together.finish()
    alone = get_metric("deletion", fill="zero", steps=4)
    for i in range(3):
        alone.update(Batch(batch.images[i : i + 1], batch.labels[i : i + 1], batch.labels[i : i + 1],
                           torch.tensor([i]), model=batch.model), maps[i : i + 1])  # fmt: skip
    alone.finish()
    assert np.allclose(together.records["probability"], alone.records["probability"])
    assert together.result()["deletion"] == pytest.approx(alone.result()["deletion"])


# --- pointing games ---------------------------------------------------------------------------------------


def mask_batch(h=8, box=(5, 5, 6, 6), boxes=None):
    mask = torch.zeros(1, h, h, dtype=torch.bool)
    x0, y0, x1, y1 = box
    mask[0, y0 : y1 + 1, x0 : x1 + 1] = True
    bx = torch.tensor([box] if boxes is None else boxes, dtype=torch.float32)
    return Batch(torch.zeros(1, 3, h, h), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                 torch.arange(1), boxes=[bx], masks=mask), mask.float()  # fmt: skip


def test_pointing_game_by_hand():
    batch, mask = mask_batch()
    assert score("pointing-game", batch, mask, tolerance=0)["pointing-game"] == 1.0
    assert score("pointing-game", batch, 1 - mask, tolerance=0)["pointing-game"] == 0.0
    uniform = torch.ones_like(mask)  # maximum taken at (0, 0); the nearest mask pixel (5, 5) is √50 ≈ 7.07 away
    assert score("pointing-game", batch, uniform, tolerance=7)["pointing-game"] == 0.0
    assert score("pointing-game", batch, uniform, tolerance=7.1)["pointing-game"] == 1.0
    # default tolerance: 15 px at 224 px, scaled (8 px image: 0.54 px)
    assert score("pointing-game", batch, uniform)["pointing-game"] == 0.0


def test_energy_pointing_game_by_hand():
    batch, mask = mask_batch()
    assert score("energy-pointing-game", batch, mask)["energy-pointing-game"] == pytest.approx(1.0)
    assert score("energy-pointing-game", batch, 1 - mask)["energy-pointing-game"] == pytest.approx(0.0)
    assert score("energy-pointing-game", batch, torch.ones_like(mask))["energy-pointing-game"] == pytest.approx(4 / 64)
    assert score("energy-pointing-game", batch, -mask)["energy-pointing-game"] == 0.0  # no positive mass
    two, _ = mask_batch(boxes=[(0, 0, 1, 1), (6, 6, 7, 7)])
    assert score("energy-pointing-game", two, torch.ones_like(mask))["energy-pointing-game"] == pytest.approx(8 / 64)


def test_metrics_skip_samples_without_ground_truth():
    batch, mask = mask_batch()
    bare = Batch(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                 torch.tensor([7, 8]))  # fmt: skip
    for name in ("pointing-game", "energy-pointing-game", "maxboxacc", "maxboxacc-v2", "pxap", "miou"):
        m = get_metric(name)
        m.update(bare, torch.rand(2, 8, 8))
        m.update(batch, mask)
        m.finish()
        assert m.used == 1, name
        assert m.result()[name] is not None


# --- WSOL ---------------------------------------------------------------------------------------------------


def test_wsol_box_metrics_by_hand():
    h = 16
    gt = (4, 4, 11, 11)
    perfect = torch.zeros(1, h, h)
    perfect[0, 4:12, 4:12] = 1
    batch = Batch(torch.zeros(1, 3, h, h), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.arange(1), boxes=[torch.tensor([gt], dtype=torch.float32)])  # fmt: skip
    # the box of the 8×8 component is one pixel wider (cv2 width added): IoU 64 / 81 ≥ 0.7 at every τ
    assert score("maxboxacc", batch, perfect)["maxboxacc"] == 1.0
    assert score("maxboxacc-v2", batch, perfect)["maxboxacc-v2"] == 1.0
    # inverted: the ring around the box (IoU 64/256) and its hole, whose border box (3, 3, 13, 13) has IoU 64/121
    assert score("maxboxacc", batch, 1 - perfect)["maxboxacc"] == 0.0
    v2 = score("maxboxacc-v2", batch, 1 - perfect)
    assert v2 == pytest.approx({"maxboxacc-v2": 2 / 3, "maxboxacc-v2/iou30": 1, "maxboxacc-v2/iou50": 1,
                                "maxboxacc-v2/iou70": 0})  # fmt: skip
    # a uniform map normalises to zeros: no pixel is kept, the (0, 0, 0, 0) box scores IoU 0
    assert score("maxboxacc-v2", batch, torch.ones(1, h, h))["maxboxacc-v2"] == 0.0


def test_wsol_two_boxes_by_hand():
    h = 16
    # image 0: the ground truth (1, 1, 4, 4) at 0.5 beside a brighter, larger blob that is no object
    decoy = torch.zeros(2, h, h)
    decoy[0, 1:5, 1:5] = 0.5
    decoy[0, 8:16, 8:16] = 1.0
    decoy[1, 8:16, 8:16] = 1.0  # image 1: the blob is its object
    boxes = [torch.tensor([[1, 1, 4, 4]], dtype=torch.float32), torch.tensor([[8, 8, 15, 15], [0, 0, 1, 1.0]])]
    batch = Batch(torch.zeros(2, 3, h, h), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                  torch.arange(2), boxes=boxes, logits=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # fmt: skip
    # MaxBoxAcc scores the largest component (the blob): image 0 never, image 1 always → 0.5
    assert score("maxboxacc", batch, decoy)["maxboxacc"] == 0.5
    # V2 finds the small component below τ = 0.5 (IoU 16/25 = 0.64): correct at 0.3 and 0.5 only
    v2 = score("maxboxacc-v2", batch, decoy)
    assert v2["maxboxacc-v2/iou30"] == 1 and v2["maxboxacc-v2/iou50"] == 1 and v2["maxboxacc-v2/iou70"] == 0.5
    assert v2["maxboxacc-v2"] == pytest.approx(2.5 / 3)
    # top-1 localisation also needs the right class: image 1 is misclassified
    assert score("top1-loc", batch, decoy)["top1-loc"] == 0.0
    batch.logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert score("top1-loc", batch, decoy)["top1-loc"] == 0.5


def test_pxap_and_miou_by_hand():
    batch, mask = mask_batch()  # 4 object pixels of 64
    assert score("pxap", batch, mask)["pxap"] == pytest.approx(1.0)
    assert score("pxap", batch, torch.ones_like(mask))["pxap"] == pytest.approx(4 / 64)
    assert score("pxap", batch, 1 - mask)["pxap"] == pytest.approx(4 / 64)
    assert score("miou", batch, mask) == pytest.approx({"miou": 1, "miou/pixel-accuracy": 1, "miou/map": 1})
    uniform = score("miou", batch, torch.ones_like(mask))  # all background; both channels score 0 → AP 0.5
    assert uniform == pytest.approx({"miou": 60 / 64 / 2, "miou/pixel-accuracy": 60 / 64, "miou/map": 0.5})


def test_average_precision_matches_sklearn():
    pytest.importorskip("sklearn")
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.integers(0, 6, (5, 40)) / 5.0)  # many ties
    targets = torch.from_numpy(rng.random((5, 40)) < 0.3)
    want = [average_precision_score(t, s) for s, t in zip(scores.numpy(), targets.numpy(), strict=True)]
    assert np.allclose(average_precision(scores, targets).numpy(), want)


# The algorithm of clovaai/wsolevaluation (evaluation.py: compute_bboxes_from_scoremaps, calculate_multiple_iou,
# BoxEvaluator, MaskEvaluator; inference.py: normalize_scoremap), re-expressed step by step with cv2.


def ref_normalize(cam):
    cam = cam.copy()
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def ref_boxes(scoremap, thresholds, multi_contour):
    cv2 = pytest.importorskip("cv2")
    h, w = scoremap.shape
    gray = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    per_threshold = []
    for t in thresholds:
        _, binary = cv2.threshold(gray, int(t * np.max(gray)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            per_threshold.append(np.array([[0, 0, 0, 0]]))
            continue
        if not multi_contour:
            contours = [max(contours, key=cv2.contourArea)]
        found = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            found.append([x, y, min(x + bw, w - 1), min(y + bh, h - 1)])
        per_threshold.append(np.array(found))
    return per_threshold


def ref_iou(a, b):
    a, b = a[:, None, :].astype(float), b[None, :, :].astype(float)
    inter = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1) * np.maximum(
        0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    )
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    den = area_a + area_b - inter
    bad = den <= 0
    iou = inter / np.where(bad, 1, den)
    iou[bad] = 0
    return iou


def ref_box_accuracy(scoremaps, gt_boxes, thresholds, iou_levels, multi_contour):
    correct = {level: np.zeros(len(thresholds)) for level in iou_levels}
    for scoremap, gt in zip(scoremaps, gt_boxes, strict=True):
        boxes = ref_boxes(scoremap, thresholds, multi_contour)
        best = np.array([ref_iou(b, gt).max() for b in boxes])
        for level in iou_levels:
            correct[level][best >= level / 100] += 1
    return np.stack([correct[level] / len(scoremaps) for level in iou_levels])


def ref_pxap(scoremaps, masks, thresholds):
    edges = np.append(thresholds, [1.0, 2.0, 3.0])
    obj = sum(np.histogram(s[m], bins=edges)[0] for s, m in zip(scoremaps, masks, strict=True)).astype(float)
    bg = sum(np.histogram(s[~m], bins=edges)[0] for s, m in zip(scoremaps, masks, strict=True)).astype(float)
    tp, fp = obj[::-1].cumsum(), bg[::-1].cumsum()
    fn = obj.sum() - tp
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
    return (precision[1:] * np.diff(recall))[nonzero[1:]].sum()


def random_wsol_case(seed, n=24, size=40, grid=5):
    rng = np.random.default_rng(seed)
    maps = torch.from_numpy(rng.random((n, grid, grid)).astype(np.float32))
    boxes = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        x0, y0 = rng.integers(0, size - 6, (2, k))
        x1, y1 = rng.integers(x0 + 2, size), rng.integers(y0 + 2, size)
        boxes.append(torch.from_numpy(np.stack([x0, y0, x1, y1], 1).astype(np.float32)))
    masks = torch.from_numpy(rng.random((n, size, size)) < 0.3)
    masks[:, 10:20, 10:20] = True
    images = torch.zeros(n, 3, size, size)
    labels = torch.zeros(n, dtype=torch.long)
    return Batch(images, labels, labels, torch.arange(n), boxes=boxes, masks=masks), maps


@pytest.mark.parametrize("seed, grid", [(0, 5), (1, 3)])
def test_wsol_metrics_match_the_wsolevaluation_algorithm(seed, grid):
    batch, maps = random_wsol_case(seed, grid=grid)
    thresholds = thresholds_for(0.01)
    pixels = upsample(maps, batch.size).double().numpy()
    scoremaps = [ref_normalize(p) for p in pixels]
    assert np.array_equal(np.stack(scoremaps), normalize_maps(upsample(maps, batch.size)).numpy())
    gts = [b.numpy() for b in batch.boxes]

    v2 = get_metric("maxboxacc-v2")
    for s in range(0, len(maps), 10):  # several batches
        part = Batch(batch.images[s : s + 10], batch.labels[s : s + 10], batch.labels[s : s + 10],
                     batch.index[s : s + 10], boxes=batch.boxes[s : s + 10], masks=batch.masks[s : s + 10])  # fmt: skip
        v2.update(part, maps[s : s + 10])
    v2.finish()
    want = ref_box_accuracy(scoremaps, gts, thresholds, (30, 50, 70), multi_contour=True)
    assert np.array_equal(v2.accuracies(), want)  # every threshold, every IoU level, exactly
    assert v2.result()["maxboxacc-v2"] == pytest.approx(want.max(1).mean())

    pxap = get_metric("pxap")
    pxap.update(batch, maps)
    pxap.finish()
    assert pxap.result()["pxap"] == pytest.approx(ref_pxap(scoremaps, batch.masks.numpy(), thresholds), abs=1e-12)

    # The default protocol takes the component with most pixels, wsolevaluation the largest cv2.contourArea
    # (protocol=wsol, tested exactly in test_protocols.py): on these smooth maps they rarely disagree.
    v1 = get_metric("maxboxacc")
    v1.update(batch, maps)
    v1.finish()
    want1 = ref_box_accuracy(scoremaps, gts, thresholds, (50,), multi_contour=False)
    assert abs(v1.result()["maxboxacc"] - want1.max()) <= 1 / len(maps)
    assert np.abs(v1.accuracies() - want1).mean() < 0.02


def test_boxes_from_map_are_wsolevaluation_contour_boxes():
    batch, maps = random_wsol_case(2, n=6)
    for scoremap in normalize_maps(upsample(maps, batch.size)).numpy():
        for t in (0.0, 0.3, 0.55, 0.8):
            want = sorted(map(tuple, ref_boxes(scoremap, [t], multi_contour=True)[0].tolist()))
            got = boxes_from_map(scoremap, t, holes=True)
            if want == [(0, 0, 0, 0)]:  # wsolevaluation's stand-in for "nothing kept"
                assert len(got) == 0
            else:
                assert sorted(map(tuple, got.tolist())) == want
            components = boxes_from_map(torch.from_numpy(scoremap), t)
            assert len(components) <= len(got) and components.dtype == torch.int64
    with pytest.raises(VitlensError, match=r"in \[0, 1\]"):
        boxes_from_map(np.full((4, 4), 2.0), 0.5)


def test_threshold_sweep_is_batch_invariant():
    batch, maps = random_wsol_case(3, n=8)
    scores = normalize_maps(upsample(maps, batch.size)).numpy()
    gt, valid = batch.padded_boxes()
    th = thresholds_for(0.05)
    best, largest = threshold_sweep(scores, gt.numpy(), valid.numpy(), th)
    for i in (0, 5):
        b1, l1 = threshold_sweep(scores[i : i + 1], gt.numpy()[i : i + 1], valid.numpy()[i : i + 1], th)
        assert np.array_equal(b1[0], best[i]) and np.array_equal(l1[0], largest[i])


# --- grid pointing game and sanity --------------------------------------------------------------------------


class GridData:
    """The bits of fashion-grid the metric reads: the source canvases and the grid size."""

    grid = 2

    def __init__(self, canvases):
        self.canvas = [{"image": c} for c in canvases]


def test_grid_pointing_game_by_hand():
    h = 8
    cells = torch.tensor([[[0, 0, 3, 3], [4, 0, 7, 3], [0, 4, 3, 7], [4, 4, 7, 7]]], dtype=torch.float32)
    labels = torch.tensor([[2, 0, 3, 1]])
    canvases = torch.zeros(4, 3, h, h)
    canvases[:, 0] = torch.tensor([2.0, 0, 3, 1])[:, None, None] / 10  # the "model" reads the class off red
    canvases[3, 1] = 1.0  # … and is unsure about the last canvas

    def model(x):
        logits = torch.full((len(x), 4), -5.0)
        logits[torch.arange(len(x)), (x[:, 0, 0, 0] * 10).round().long()] = 5.0
        logits[x[:, 1, 0, 0] > 0.5] = 0.0  # uniform: softmax 0.25 < 0.5
        return logits

    def cell_explainer(images, targets):  # all mass in the target's cell (2×2 patch grid of 4 px patches)
        pos = {2: (0, 0), 0: (0, 1), 3: (1, 0), 1: (1, 1)}
        maps = torch.zeros(len(images), 2, 2)
        for i, t in enumerate(targets.tolist()):
            maps[i][pos[t]] = 1.0
        return Explanation(maps, "cells")

    def uniform_explainer(images, targets):
        return Explanation(torch.ones(len(images), 2, 2), "uniform")

    def run(explainer):
        batch = Batch(torch.zeros(1, 3, h, h), labels[:, 0], labels[:, 0], torch.arange(1), model=model,
                      explainer=explainer, extra={"cells": cells, "labels": labels, "sources": torch.arange(4)[None],
                                                  "dataset": GridData(canvases)})  # fmt: skip
        m = get_metric("grid-pointing-game")
        m.update(batch, torch.zeros(1, 2, 2))
        m.finish()
        return m

    m = run(cell_explainer)
    assert m.used == 3 and m.records["cell"].tolist() == [0, 1, 2]  # the unsure cell is left out
    # bilinear upsampling of a one-hot 2×2 map spreads mass: compute the in-cell share directly
    one_hot = upsample(torch.tensor([[[1.0, 0], [0, 0]]]), (h, h))[0]
    assert m.result()["grid-pointing-game"] == pytest.approx((one_hot[:4, :4].sum() / one_hot.sum()).item())
    assert run(uniform_explainer).result()["grid-pointing-game"] == pytest.approx(0.25)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 4, (6, 12)).astype(float))
    b = torch.from_numpy(rng.random((6, 12)))
    want = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    assert np.allclose(spearman(a, b).numpy(), want)
    flat = torch.ones(1, 5)
    assert torch.isnan(spearman(flat, flat)).all() and torch.isnan(spearman(flat, b[:1, :5])).all()  # undefined


def test_sanity_cascade_leaves_the_model_unchanged(images):
    backbone = adapt(tiny_timm())
    state = copy.deepcopy(backbone.state_dict())
    grads = [p.requires_grad for p in backbone.parameters()]
    explainer = get_explainer("attention", backbone)
    maps = explainer(images).maps
    batch = Batch(images, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.arange(3),
                  model=backbone, explainer=explainer)  # fmt: skip
    m = get_metric("sanity")
    m.setup(backbone, None)
    m.update(batch, maps)
    m.finish()
    assert m.levels == ["head", "final-norm", "block1", "block0", "position", "patch-embed"]
    curve = m.curves()["spearman"]
    assert len(curve) == 6 and all(-1 <= c <= 1 for c in curve)
    assert curve[0] == pytest.approx(1.0)  # the class-token attention of the last block ignores the head
    assert m.curves()["seen"][:2] == [False, False]  # … and the final norm: both flagged, left out of the mean
    assert curve[-1] < 0.99  # … but not the blocks
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in backbone.parameters()] == grads
    again = get_metric("sanity")
    again.update(batch, maps)
    again.finish()
    assert np.array_equal(again.records["spearman"], m.records["spearman"])  # seeded


# --- behaviour on real data and the committed counting classifier -------------------------------------------


LOCALISATION = ("pointing-game", "energy-pointing-game", "maxboxacc", "maxboxacc-v2", "top1-loc", "pxap", "miou")


def test_perfect_map_beats_random_map():
    """On fashion canvases (one object each): the ground-truth mask on the 8×8 patch grid against random maps.
    (On the counting data adjacent target cells merge into one component, so its per-cell boxes are no
    fair test of the box metrics.)"""
    try:
        data = open_dataset("fashion-canvas:test:n=48")
        raw = collate([data[i] for i in range(len(data))])
    except VitlensError as e:
        pytest.skip(str(e))
    logits = torch.nn.functional.one_hot(raw["label"], 10).float()  # a perfect classifier: top-1 loc = box part
    batch = Batch(raw["image"], raw["label"], raw["label"], raw["index"], boxes=raw["boxes"], masks=raw["mask"],
                  has_mask=raw["has_mask"], logits=logits)  # fmt: skip
    truth = torch.nn.functional.avg_pool2d(raw["mask"][:, None].float(), 8)[:, 0]
    random = torch.rand(len(truth), 8, 8, generator=torch.Generator().manual_seed(0))
    for name in LOCALISATION:
        perfect = score(name, batch, truth)[name]
        chance = score(name, batch, random)[name]
        assert perfect > chance + 0.2, (name, perfect, chance)
    assert METRICS["pointing-game"].needs and METRICS["maxboxacc"].needs == ("boxes",)


def test_deleting_the_counted_cells_hurts_more():
    """Black fill, as Chefer et al. and Vision DiffMask: the default per-image mean colour of an image with
    many red cells is itself red enough to be counted, which hides the effect of deleting them."""
    backbone = load_model(committed("counting-vit"))
    data = open_dataset("counting:test:n=48")
    raw = collate([data[i] for i in range(len(data))])
    truth = torch.nn.functional.avg_pool2d(raw["mask"][:, None].float(), 16)[:, 0]  # one value per cell (patch)
    random = torch.rand(len(truth), 3, 3, generator=torch.Generator().manual_seed(0))
    some = truth.flatten(1).sum(1) > 0
    batch = Batch(raw["image"][some], raw["label"][some], raw["label"][some], raw["index"][some], model=backbone)
    for name in ("deletion", "positive-perturbation"):
        relevant = score(name, batch, truth[some], fill="zero")[name]
        by_chance = score(name, batch, random[some], fill="zero")[name]
        assert relevant < by_chance - 0.05, (name, relevant, by_chance)
