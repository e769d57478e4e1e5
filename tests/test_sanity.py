"""The cascading randomisation sanity check: the cascade reaches the input on every backbone family, its
curve equals an independent computation (parameters randomised by name, scipy's Spearman), constant maps are
undefined and never rewarded, unseen levels are flagged and left out, and the verdict follows its rule."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from conftest import TIMM_VARIANTS, make_timm, tiny_timm
from vitlens.backbones import adapt
from vitlens.errors import VitlensError
from vitlens.explainers import Explanation, get_explainer
from vitlens.metrics import Batch, get_metric
from vitlens.metrics.sanity import cascade, spearman, unassigned


@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_cascade_randomises_every_parameter_down_to_the_input(variant):
    backbone = adapt(make_timm(variant))
    levels = cascade(backbone)
    names = [n for n, _ in levels]
    depth = len(backbone.blocks)
    blocks = [f"block{i}" for i in reversed(range(depth))]
    top = ["head"] if variant == "avg-pool-no-cls" else ["head", "final-norm"]  # its norm is the head's fc_norm
    assert names == top + blocks + ["position", "patch-embed"]
    assert unassigned(backbone, levels) == 0
    ids = [id(p) for _, ps in levels for p in ps]
    assert len(ids) == len(set(ids)) == len(list(backbone.parameters()))
    params = dict(backbone.model.named_parameters())
    position = {id(params[k]) for k in params if k in ("pos_embed", "cls_token", "dist_token", "reg_token")}
    assert {id(p) for p in dict(levels)["position"]} == position
    patch = {id(v) for k, v in params.items() if k.startswith("patch_embed")}
    assert {id(p) for p in dict(levels)["patch-embed"]} == patch


# --- an independent computation -------------------------------------------------------------------------------

GROUPS = {  # timm ViT parameter names per level, top down
    "head": lambda k: k.startswith("head."),
    "final-norm": lambda k: k.startswith("norm."),
    "block1": lambda k: k.startswith("blocks.1."),
    "block0": lambda k: k.startswith("blocks.0."),
    "position": lambda k: k in ("pos_embed", "cls_token"),
    "patch-embed": lambda k: k.startswith("patch_embed."),
}


def reference_curve(method: str, images, targets, seed: int = 0):
    """Randomise the timm model's parameters group by group (by name), recompute the maps with a fresh
    explainer, correlate with scipy (NaN where a map is constant)."""
    model = tiny_timm()
    original = get_explainer(method, adapt(copy.deepcopy(model)))(images, targets).maps.flatten(1).numpy()
    rows = []
    for i, (_, take) in enumerate(GROUPS.items()):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if take(name):
                    x = p.double()
                    std = x.std().item() if p.numel() > 1 else 0.0
                    p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * (std or 0.02) + x.mean()).to(p))
        maps = get_explainer(method, adapt(copy.deepcopy(model)))(images, targets).maps.flatten(1).numpy()
        row = []
        for a, b in zip(original, maps, strict=True):
            row.append(np.nan if a.min() == a.max() or b.min() == b.max() else spearmanr(a, b).statistic)
        rows.append(row)
    return np.array(rows).T  # [B, L]


def run_sanity(explainer, images, targets, **options):
    batch = Batch(images, targets, targets, torch.arange(len(images)), model=explainer.backbone, explainer=explainer)
    m = get_metric("sanity", **options)
    m.setup(explainer.backbone, None)
    m.update(batch, explainer(images, targets).maps)
    m.finish()
    return m


@pytest.mark.parametrize("method", ["attention", "gradcam"])
def test_sanity_curve_equals_an_independent_computation(method, images):
    targets = torch.tensor([0, 3, 1])
    explainer = get_explainer(method, adapt(tiny_timm()))
    m = run_sanity(explainer, images, targets)
    want = reference_curve(method, images, targets)
    assert m.levels == list(GROUPS)
    got = m.records["spearman"]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(np.nan_to_num(got), np.nan_to_num(want), atol=1e-9)
    curve = np.array([np.nan if v is None else v for v in m.curves()["spearman"]])
    assert np.allclose(curve, np.nanmean(want, 0), equal_nan=True)
    seen = np.array(m.curves()["seen"])
    if method == "attention":  # class-agnostic, reads the blocks' attention only
        assert seen.tolist() == [False, False, True, True, True, True]
    else:
        assert seen.all()
    judged = curve[seen & ~np.isnan(curve)]
    result = m.result()
    assert result["sanity"] == pytest.approx(np.abs(judged).mean())
    assert result["sanity/signed"] == pytest.approx(judged.mean())
    assert result["sanity/full"] == pytest.approx(curve[-1])
    assert result["sanity/undefined"] == pytest.approx(np.isnan(want).mean())
    assert result["sanity/pass"] == float(abs(curve[-1]) < 0.5 and np.abs(judged).mean() < 0.5)


class StubExplainer:
    """Maps from the images alone (``mode="image"``), or the image's red channel while the head is intact
    and all zeros once it is randomised (``mode="collapse"``)."""

    def __init__(self, backbone, mode):
        self.backbone, self.mode = backbone, mode
        self.head = backbone.model.head.weight.detach().clone()

    def __call__(self, images, targets=None):
        return Explanation(self.maps(images), "stub")

    def maps(self, images):
        maps = F.avg_pool2d(images[:, :1], 8)[:, 0] + torch.arange(16.0).reshape(4, 4) / 100
        if self.mode == "collapse" and not torch.equal(self.backbone.model.head.weight, self.head):
            return torch.zeros_like(maps)
        return maps


def test_constant_maps_are_undefined_and_never_rewarded(images):
    targets = torch.zeros(3, dtype=torch.long)
    m = run_sanity(StubExplainer(adapt(tiny_timm()), "collapse"), images, targets)
    assert np.isnan(m.records["spearman"]).all()  # every randomised map is constant
    result = m.result()
    assert result["sanity/undefined"] == 1.0
    assert result["sanity"] is None and result["sanity/full"] is None  # not 0, the best value
    assert result["sanity/pass"] is None  # undecided
    assert m.per_image()["spearman"][0] == [None] * len(m.levels)  # JSON-safe


def test_a_map_that_ignores_the_model_fails(images):
    targets = torch.zeros(3, dtype=torch.long)
    m = run_sanity(StubExplainer(adapt(tiny_timm()), "image"), images, targets)
    assert not any(m.curves()["seen"]) and m.result()["sanity/pass"] == 0.0
    assert np.allclose(m.records["spearman"], 1.0)


def test_spearman_is_nan_for_constant_rows():
    b = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    flat = torch.ones(2, 6)
    assert torch.isnan(spearman(flat, b)).all() and torch.isnan(spearman(b, flat)).all()
    assert spearman(b, b).tolist() == pytest.approx([1.0, 1.0])


def test_verdict_threshold_is_an_option(images):
    explainer = get_explainer("gradcam", adapt(tiny_timm()))
    targets = torch.tensor([0, 3, 1])
    m = run_sanity(explainer, images, targets, threshold=1.0)
    assert m.result()["sanity/pass"] == 1.0 or m.result()["sanity/pass"] is None
    with pytest.raises(VitlensError, match="threshold must be in"):
        get_metric("sanity", threshold=0)


def test_a_map_broken_only_by_the_last_level_fails(images):
    """Maps that survive every level but the patch embedding (as DiffMask's): decorrelated at the end, yet the
    cascade's mean |ρ| stays high — the verdict is fail."""

    class LastLevelOnly(StubExplainer):
        def __init__(self, backbone):
            super().__init__(backbone, "image")
            self.patch = backbone.model.patch_embed.proj.weight.detach().clone()

        def maps(self, images):
            maps = super().maps(images)
            head_intact = torch.equal(self.backbone.model.head.weight, self.head)
            if not torch.equal(self.backbone.model.patch_embed.proj.weight, self.patch):
                return maps.flip(-1).flip(-2) + torch.rand(maps.shape, generator=torch.Generator().manual_seed(0))
            return maps if head_intact else maps + 1e-3 * maps.pow(2)  # the head changes values, not the order

    m = run_sanity(LastLevelOnly(adapt(tiny_timm())), images, torch.zeros(3, dtype=torch.long))
    result = m.result()
    assert abs(result["sanity/full"]) < 0.5 and result["sanity"] >= 0.5
    assert result["sanity/pass"] == 0.0


def test_retraining_variant_trains_the_gates_anew_on_the_randomised_model():
    from conftest import committed
    from vitlens.data import open_dataset, parse_data_spec
    from vitlens.explainers.diffmask import DiffMaskGates
    from vitlens.metrics.sanity import retrained_explainer

    explainer = get_explainer("diffmask", committed("fashion-vit-diffmask"))
    original = {k: v.clone() for k, v in explainer.backbone.state_dict().items()}
    gates_before = {k: v.clone() for k, v in explainer.gates.state_dict().items()}
    size = explainer.backbone.preprocessing.input_size
    dataset = open_dataset(parse_data_spec("fashion-canvas:test"), size=size)
    retrained = retrained_explainer(explainer, dataset, steps=3, seed=0)
    # the original explainer is untouched; the retrained one runs on a model with every parameter randomised
    assert all(torch.equal(v, explainer.backbone.state_dict()[k]) for k, v in original.items())
    assert all(torch.equal(v, explainer.gates.state_dict()[k]) for k, v in gates_before.items())
    params = dict(retrained.backbone.named_parameters())
    assert all(not torch.equal(original[k], p) for k, p in params.items() if p.numel() > 1)
    # its gates were trained: they differ from the fresh gates the training started from
    torch.manual_seed(0)
    fresh = DiffMaskGates(*[retrained.gates.placeholder.shape[1], len(retrained.gates.probes)])
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in retrained.gates.state_dict().items())
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    assert retrained(images).maps.shape == explainer(images).maps.shape


@pytest.mark.slow
def test_retraining_variant_reports_retrained_correlation_for_trained_methods_only():
    from conftest import committed
    from vitlens.metrics import evaluate

    summary = evaluate(committed("fashion-vit-diffmask"), "diffmask,rollout", "sanity", "fashion-canvas:test",
                       limit=8, batch_size=4, progress=False, options={"sanity": {"retrain_steps": 4}})  # fmt: skip
    value = summary["results"]["diffmask"]["sanity/retrained"]
    assert value is not None and -1 <= value <= 1
    assert summary["results"]["rollout"]["sanity/retrained"] is None
    with pytest.raises(VitlensError, match="retrain_steps must be a non-negative integer"):
        get_metric("sanity", retrain_steps=-1)
