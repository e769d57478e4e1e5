"""The fast paths of the performance issue equal straightforward computations; ``vitlens bench``'s contract.

No timing assertions: only that each fast path computes what the plain version computes, that the batched
inner loops really batch (forward calls counted), that DiffMask training never reaches the classifier's
parameters, and that the bench record has the documented shape.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import make_timm
from test_backbones_hf_tv import make as make_hf_tv
from test_explainers_chefer import sharpen
from vitlens import explain
from vitlens.backbones import adapt
from vitlens.bench import bench, with_untrained_gates
from vitlens.cli import main
from vitlens.explainers.chefer import (
    _activations,
    _add_rule,
    _head_relevance,
    _zplus,
    rollout_with_identity,
)
from vitlens.explainers.perturbation import grid_to_pixels, keep_patches
from vitlens.explainers.pm import patch_probabilities
from vitlens.explainers.targets import Target
from vitlens.models import load_model
from vitlens.training import TrainConfig
from vitlens.training.diffmask import DiffMaskTask

# --- transformer attribution (chefer): one forward for gradients and LRP, three products per linear ---


def naive_zplus(x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    """α1β0 through a linear layer, written out: R_in = x⁺ ⊙ (s W⁺) + x⁻ ⊙ (s W⁻), s = R / (x⁺W⁺ᵀ + x⁻W⁻ᵀ)."""
    wp, wn, xp, xn = w.clamp(min=0), w.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    z = F.linear(xp, wp) + F.linear(xn, wn)
    s = torch.where(z != 0, r / (z + 1e-9), torch.zeros_like(r))
    return xp * (s @ wp) + xn * (s @ wn)


def naive_matmul_rule(a: Tensor, b: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    ab = a @ b
    s = torch.where(ab != 0, r / (ab + 1e-9), torch.zeros_like(r))
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def naive_lrp_block(p, c, r_out: Tensor, to_input: bool):
    r_mid, r_mlp = _add_rule([c.mid, c.mlp], r_out)
    r_mid = r_mid + naive_zplus(c.h2, p.fc1[0], naive_zplus(c.g, p.fc2[0], r_mlp))
    r_x, r_y = _add_rule([c.x, c.y], r_mid)
    b, t, _ = r_y.shape
    r_o = naive_zplus(c.o, p.proj[0], r_y).reshape(b, t, p.heads, -1).transpose(1, 2)
    r_a, r_v = naive_matmul_rule(c.a, c.v, r_o)
    if not to_input:
        return r_a, None
    r_q, r_kt = naive_matmul_rule(c.q, c.k.transpose(-2, -1), r_a)
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4).reshape(b, t, -1)
    return r_a, r_x + naive_zplus(c.h1, p.qkv[0], r_qkv)


def chefer_by_recomputation(bb, images: Tensor) -> Tensor:
    """The plain way: gradients from the model's forward with explicit attention, then every block recomputed
    from its input in the trace and the LRP rules written out with four products per linear layer."""
    with torch.enable_grad():
        trace = bb.run(images, attention=True, grad_from=0)
        score = Target().fixed(trace.logits).score(trace.logits).sum()
        grads = torch.autograd.grad(score, trace.attentions)
    with torch.no_grad():
        start = torch.nn.functional.one_hot(trace.logits.argmax(1), bb.num_classes).float()
        r, _ = _head_relevance(bb.head_parts(), trace.tokens, start, trace.num_prefix_tokens)
        mats = []
        for i in reversed(range(len(bb.blocks))):
            parts = bb.block_parts(bb.blocks[i])
            r_a, r = naive_lrp_block(parts, _activations(parts, trace.hidden[i]), r, i > 0)
            mats.append((grads[i] * r_a).clamp(min=0).mean(1))
        mats = mats[::-1]
        t = mats[0].shape[-1]
        row = rollout_with_identity(mats, bb.readout(t).expand(len(images), t))
        return trace.to_grid(row[:, trace.num_prefix_tokens :])


def test_zplus_with_three_products_equals_the_rule_written_out():
    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(2, 5, 7, generator=g), torch.randn(3, 7, generator=g), torch.rand(2, 5, 3, generator=g)
    x[0, 0] = 0  # an input row of zeros: every output has z = 0 and gets no relevance
    w[1, :3] = 0
    expected = naive_zplus(x, w, r)
    torch.testing.assert_close(_zplus(x, w, r), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_zplus(x, w, r, F.linear(x, w)), expected, atol=1e-6, rtol=1e-5)


LRP_MODELS = {
    "vit": lambda: make_timm("vit"),
    "deit-distilled": lambda: make_timm("deit-distilled"),
    "avg-pool-no-cls": lambda: make_timm("avg-pool-no-cls"),
    "layer-scale-qk-norm": lambda: timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        num_classes=5,
        init_values=0.5,
        qk_norm=True,
    ),  # fmt: skip
    "hf-vit": lambda: make_hf_tv("vit")[0],
    "torchvision": lambda: make_hf_tv("torchvision")[0],
}


@pytest.mark.parametrize("kind", list(LRP_MODELS))
def test_chefer_single_pass_equals_recomputation(kind, images):
    bb = adapt(sharpen(LRP_MODELS[kind]()))
    expected = chefer_by_recomputation(bb, images)
    ours = explain(bb, images, "chefer").maps
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-4)

    def centred(maps: Tensor) -> Tensor:  # average-pooled models give maps close to uniform: compare the rest
        return maps - maps.mean((1, 2), keepdim=True)

    assert (centred(expected).flatten(1).abs().amax(1) > 1e-6).all()
    torch.testing.assert_close(centred(ours), centred(expected), atol=1e-7, rtol=1e-3)


def test_chefer_checks_its_recomputation_against_the_model(images, monkeypatch):
    """The single pass is checked against the model's own forward once per model (the first call), also
    through new explainers (every ``vitlens.explain`` call builds one); a model that fails is refused."""
    from vitlens.explainers import chefer, get_explainer

    bb = adapt(make_timm("vit"))
    calls = []
    real = chefer._check_against_model
    monkeypatch.setattr(chefer, "_check_against_model", lambda *a: calls.append(1) or real(*a))
    e = get_explainer("chefer", bb)
    e(images)
    e(images[:2])
    get_explainer("chefer", adapt(bb.model))(images)  # a new explainer and backbone on the same model
    assert calls == [1]
    broken = get_explainer("chefer", adapt(make_timm("vit")))  # a model not checked yet
    monkeypatch.setattr(chefer, "_activations", lambda p, x, grid=None: real_activations_off_by_one(p, x))
    with pytest.raises(Exception, match="does not reproduce"):
        broken(images)


def real_activations_off_by_one(p, x):
    c = _activations(p, x)
    c.out = c.out + 1.0  # a block the parts do not describe
    return c


# --- PM: the target's slice only --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vit", "deit-distilled", "avg-pool-no-cls"])
def test_pm_map_is_the_targets_slice_of_the_volume(variant, images):
    bb = adapt(make_timm(variant))
    with torch.no_grad():
        volume = patch_probabilities(bb, bb.run(images))
    for target in (None, [4, 0, 2]):
        t = volume.new_tensor(target or [], dtype=torch.long) if target else bb(images).argmax(1)
        torch.testing.assert_close(explain(bb, images, "pm", target=target).maps, volume[torch.arange(3), t])


# --- batched inner loops: forward calls counted -------------------------------------------------------


@pytest.mark.parametrize(
    "method, options, batches",
    [
        ("ig", {"steps": 8, "internal_batch_size": 24}, [24, 3]),  # 8 steps × 3 images in one pass, then the logits
        ("ig", {"steps": 8, "internal_batch_size": 16}, [16, 8, 3]),
        ("smoothgrad", {"n_samples": 6, "internal_batch_size": 64}, [18, 3]),
        ("rise", {"n_masks": 40, "internal_batch_size": 60}, [60, 60, 3]),
        ("occlusion", {"window": 2, "internal_batch_size": 27}, [3, 27]),  # unoccluded, then 9 windows × 3
    ],
)
def test_sampling_methods_batch_their_inner_loop(method, options, batches, images):
    bb = adapt(make_timm("vit"))
    calls = []
    handle = bb.blocks[0].register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        explain(bb, images, method, target=[0, 1, 2], **options)
    finally:
        handle.remove()
    assert calls == batches


# --- DiffMask training never reaches the classifier's parameters -------------------------------------


def _accumulated(loss: Tensor) -> set[int]:
    """ids of the leaf tensors the loss's graph accumulates gradients into."""
    seen, found, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def test_a_diffmask_training_step_leaves_the_classifier_untouched():
    bb = adapt(make_timm("vit"))
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    task = DiffMaskTask(bb)
    optimizer = task.optimizer(TrainConfig(lr=1e-2))
    batch = {"image": torch.rand(4, 3, 32, 32), "label": torch.zeros(4, dtype=torch.long)}
    loss, _ = task.loss(task.modules(), batch, 0)
    leaves = _accumulated(loss)
    assert not leaves & {id(p) for p in bb.parameters()}  # no gradient node for any classifier parameter
    assert {id(p) for p in task.gates.parameters()} <= leaves
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    task.after_step(0)
    assert all(p.grad is None for p in bb.parameters())
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.gates.parameters())


# --- vitlens bench ----------------------------------------------------------------------------------

BENCH_METHODS = ["pm", "attention", "rollout", "gradcam", "gae", "chefer", "diffmask", "ig", "occlusion"]


def test_bench_record_has_the_documented_shape():
    bb = adapt(make_timm("vit"))
    flags = [p.requires_grad for p in bb.parameters()]
    record = bench(bb, BENCH_METHODS, batch_size=2, repeat=2, options={"ig": {"steps": 2}, "occlusion": {"window": 3}})
    assert {"device", "model", "batch_size", "forward_s", "results"} <= set(record)
    assert record["device"] == "cpu" and record["batch_size"] == 2 and record["forward_s"] > 0
    assert list(record["results"]) == BENCH_METHODS
    for r in record["results"].values():
        assert {"seconds", "ratio_to_forward", "peak_mem_mb"} <= set(r)
        assert len(r["runs"]) == 2 and r["seconds"] == pytest.approx(sum(r["runs"]) / 2, rel=1e-3)
        per_round = [t / f for t, f in zip(r["runs"], record["forward_runs"], strict=True)]
        assert r["ratio_to_forward"] == pytest.approx(sum(per_round) / 2, rel=1e-3)
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
    assert record["options"]["ig"]["steps"] == 2
    assert [p.requires_grad for p in bb.parameters()] == flags
    assert getattr(bb, "config", None) is None  # the untrained DiffMask gates live on a view, not on the model


def test_untrained_gates_give_a_working_diffmask_view(images):
    bb = adapt(make_timm("vit"))
    view = with_untrained_gates(bb, seed=3)
    maps = explain(view, images, "diffmask").maps
    assert maps.shape == (3, 4, 4) and torch.isfinite(maps).all()
    torch.testing.assert_close(explain(with_untrained_gates(bb, seed=3), images, "diffmask").maps, maps)
    assert all(p.requires_grad for p in bb.parameters())


def test_bench_times_bcos_against_its_own_model():
    uri = "bcos:bcos_vit_fashion_patch?num_classes=5&img_size=32&dim=32&depth=1&heads=2&mlp_dim=32"
    record = bench(uri, ["bcos", "rollout"], batch_size=2, repeat=1)
    assert record["model"] == uri and set(record["results"]) == {"bcos", "rollout"}


def test_bench_under_bf16_autocast_on_cpu():
    """The same code paths run under ``torch.autocast`` (what the GPU bf16 figures use), here on the CPU."""
    record = bench(
        adapt(make_timm("vit")), BENCH_METHODS, batch_size=2, repeat=1, autocast=torch.bfloat16,
        options={"ig": {"steps": 2}, "occlusion": {"window": 3}},
    )  # fmt: skip
    assert record["autocast"] == "bfloat16" and list(record["results"]) == BENCH_METHODS


def test_cli_bench_autocast_flag(tiny_checkpoint, capsys):
    assert main(["bench", "--model", str(tiny_checkpoint), "--methods", "rollout,occlusion", "--batch-size", "2",
                 "--repeat", "1", "--autocast", "bf16", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["autocast"] == "bfloat16"


def test_cli_bench_json_prints_exactly_one_object(tiny_checkpoint, capsys):
    code = main(["bench", "--model", str(tiny_checkpoint), "--methods", "pm,rollout,diffmask", "--batch-size", "2",
                 "--repeat", "1", "--json"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    record = json.loads(out)
    assert out.strip().count("\n") == 0 and record["model"] == str(tiny_checkpoint)
    assert set(record["results"]) == {"pm", "rollout", "diffmask"}
    assert load_model(tiny_checkpoint).config.get("kind") != "diffmask"


# --- occlusion and RISE: masks selected per patch, no upsampled pixel masks -------------------------


@pytest.mark.parametrize("fill_kind", ["colour", "image-mean", "full", "row"])
@pytest.mark.parametrize("size", [32, 34])  # 34 px on a 4×4 grid: the odd-size path (nearest-neighbour masks)
def test_keep_patches_equals_blending_with_upsampled_masks(fill_kind, size):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, size, size, generator=g)
    fill = {
        "colour": torch.rand(1, 3, 1, 1, generator=g),
        "image-mean": images.mean((2, 3), keepdim=True),
        "full": torch.rand(3, 3, size, size, generator=g),
        "row": torch.rand(1, 1, 1, size, generator=g),
    }[fill_kind]
    i = torch.tensor([2, 0, 1, 2, 2])
    keep = (torch.rand(5, 4, 4, generator=g) < 0.5).float()
    pix = grid_to_pixels(keep, (size, size))
    f = fill.expand_as(images)[i]
    expected = images[i] * pix + f * (1 - pix)
    assert torch.equal(keep_patches(images, fill, i, keep), expected)
