"""The backbone contract on timm's VisionTransformer family (HF / torchvision: test_backbones_hf_tv.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_timm, tiny_timm
from vitlens import VitlensError, load_model
from vitlens.backbones import adapt, to_grid, upsample
from vitlens.models import parse_model_uri

EXPECTED_PREFIX = {
    "vit": ("cls",),
    "deit-distilled": ("cls", "dist"),
    "registers": ("cls", "reg", "reg", "reg", "reg"),
    "avg-pool-no-cls": (),
    "dynamic-size": ("cls",),
    "no-embed-class": ("cls",),
}


def manual_attention(block, x):
    """softmax(q kᵀ / √d) recomputed from the block's own weights (independent of timm's code path)."""
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    qkv = torch.nn.functional.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(b, t, 3, attn.num_heads, -1)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)


def test_layout(timm_variant):
    name, bb = timm_variant
    assert bb.prefix_kinds == EXPECTED_PREFIX[name]
    assert bb.num_prefix_tokens == len(EXPECTED_PREFIX[name])
    assert bb.grid_for((32, 32)) == (4, 4)
    assert bb.patch_size == (8, 8)
    assert bb.num_classes == 5
    assert bb.class_token_index == (None if name == "avg-pool-no-cls" else 0)


def test_logits_equal_model_and_attention_matches_manual(timm_variant, images):
    name, bb = timm_variant
    with torch.no_grad():
        reference = bb.model(bb.normalize(images))
        plain = bb.run(images)
        traced = bb.run(images, attention=True)
    torch.testing.assert_close(plain.logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traced.logits, reference, atol=1e-5, rtol=1e-5)
    assert len(traced.attentions) == len(bb.blocks) == 2
    assert len(traced.hidden) == len(bb.blocks) + 1
    t = bb.num_prefix_tokens + 16
    for block, x, a in zip(bb.blocks, traced.hidden[:-1], traced.attentions, strict=True):
        assert a.shape == (3, 4, t, t)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, t))
        torch.testing.assert_close(a, manual_attention(block, x), atol=1e-5, rtol=1e-5)


def test_capture_restores_fused_path_and_hooks(timm_variant, images):
    _, bb = timm_variant
    fused = [blk.attn.fused_attn for blk in bb.blocks]
    with torch.no_grad():
        before = bb(images)
        bb.run(images, attention=True)
        after = bb(images)
    assert [blk.attn.fused_attn for blk in bb.blocks] == fused
    assert all(not m._forward_hooks for m in bb.modules())
    torch.testing.assert_close(before, after)


def test_unfused_attention_same_values_and_gradients(images):
    bb = adapt(tiny_timm())
    assert all(blk.attn.fused_attn for blk in bb.blocks)

    def logits_and_grads():
        bb.zero_grad()
        logits = bb(images)
        logits.sum().backward()
        return logits.detach(), [p.grad.clone() for p in bb.parameters()]

    fused_logits, fused_grads = logits_and_grads()
    with bb.unfused_attention():
        assert not any(blk.attn.fused_attn for blk in bb.blocks)
        logits, grads = logits_and_grads()
    assert all(blk.attn.fused_attn for blk in bb.blocks)
    torch.testing.assert_close(logits, fused_logits, atol=1e-5, rtol=1e-5)
    for g, f in zip(grads, fused_grads, strict=True):
        torch.testing.assert_close(g, f, atol=1e-5, rtol=1e-4)


def test_capture_restored_on_error(images):
    bb = adapt(tiny_timm())
    fused = bb.blocks[0].attn.fused_attn
    with pytest.raises(RuntimeError), bb.capture_attention():
        assert bb.blocks[0].attn.fused_attn is False
        raise RuntimeError("boom")
    assert bb.blocks[0].attn.fused_attn == fused
    assert all(not m._forward_hooks for m in bb.modules())


def test_attention_is_differentiable(images):
    bb = adapt(tiny_timm())
    trace = bb.run(images, attention=True)
    grads = torch.autograd.grad(trace.logits[:, 0].sum(), trace.attentions)
    assert all(g.shape == a.shape and g.abs().sum() > 0 for g, a in zip(grads, trace.attentions, strict=True))


def test_run_from_embeddings_equals_images(timm_variant, images):
    _, bb = timm_variant
    with torch.no_grad():
        emb, grid = bb.embed(bb.normalize(images))
        assert emb.shape == (3, 16, 32) and grid == (4, 4)
        torch.testing.assert_close(bb.run(embeddings=emb, grid=grid).logits, bb(images))


def test_token_logits_of_readout_match_head(timm_variant, images):
    name, bb = timm_variant
    with torch.no_grad():
        trace = bb.run(images)
        per_token = bb.token_logits(trace.tokens)
    assert per_token.shape == (3, bb.num_prefix_tokens + 16, 5)
    if name == "avg-pool-no-cls":  # linear head on fc_norm(mean) ≠ mean of per-token logits, but the head is shared
        torch.testing.assert_close(bb.model.head(bb.model.fc_norm(trace.tokens)), per_token)
    elif name == "deit-distilled":  # both heads averaged at every token, as timm averages them at inference
        z = trace.tokens
        torch.testing.assert_close(per_token, (bb.model.head(z) + bb.model.head_dist(z)) / 2)
        torch.testing.assert_close(
            (bb.model.head(z[:, 0]) + bb.model.head_dist(z[:, 1])) / 2, trace.logits, atol=1e-5, rtol=1e-5
        )
    else:
        torch.testing.assert_close(per_token[:, 0], trace.logits, atol=1e-5, rtol=1e-5)


def test_readout_weights(timm_variant):
    name, bb = timm_variant
    w = bb.readout(bb.num_prefix_tokens + 16)
    assert torch.isclose(w.sum(), torch.tensor(1.0))
    if name == "avg-pool-no-cls":
        assert torch.allclose(w, torch.full((16,), 1 / 16))
    elif name == "deit-distilled":
        assert w[:2].tolist() == [0.5, 0.5] and w[2:].sum() == 0
    else:
        assert w[0] == 1


def test_non_square_and_non_default_sizes():
    bb = adapt(tiny_timm(dynamic_img_size=True))
    x = torch.rand(2, 3, 48, 24)
    with torch.no_grad():
        trace = bb.run(x, attention=True)
        torch.testing.assert_close(trace.logits, bb.model(bb.normalize(x)))
    assert trace.grid == (6, 3)
    assert trace.attentions[0].shape[-1] == 1 + 18
    assert bb.grid_for((48, 24)) == (6, 3)


def test_grid_helpers():
    v = torch.arange(12.0).reshape(1, 12)
    g = to_grid(v, (3, 4))
    assert g.shape == (1, 3, 4) and g[0, 1, 0] == 4  # row-major
    up = upsample(torch.ones(2, 3, 4), (30, 40))
    assert up.shape == (2, 30, 40) and torch.allclose(up, torch.ones_like(up))
    with pytest.raises(ValueError):
        to_grid(v, (5, 5))


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("timm:vit_tiny_patch16_224", ("timm", "vit_tiny_patch16_224", {})),
        ("timm:vit_tiny?pretrained=0&img_size=64", ("timm", "vit_tiny", {"pretrained": False, "img_size": 64})),
        ("torchvision:vit_b_16?pretrained=false", ("torchvision", "vit_b_16", {"pretrained": False})),
        ("hf:google/vit-base-patch16-224", ("hf", "google/vit-base-patch16-224", {})),
        ("timm:x?drop_rate=0.1&global_pool=avg", ("timm", "x", {"drop_rate": 0.1, "global_pool": "avg"})),
    ],
)  # fmt: skip
def test_parse_model_uri(uri, expected):
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["nope:x", "timm:", "timm:x?novalue", "plain-name"])
def test_bad_model_uris(uri):
    with pytest.raises(VitlensError):
        parse_model_uri(uri)


def test_load_model_uris_without_network():
    bb = load_model("timm:vit_tiny_patch16_224?pretrained=0&img_size=32&patch_size=8&depth=1&num_classes=3")
    assert bb.family == "timm" and bb.num_classes == 3 and not bb.training
    assert bb.spec == {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 3},
    }
    tv = load_model("torchvision:vit_b_16?pretrained=0&image_size=32")
    assert tv.family == "torchvision" and tv.grid_for((32, 32)) == (2, 2)


@pytest.mark.parametrize("uri", ["timm:no_such_model?pretrained=0", "timm:resnet18?pretrained=0", "torchvision:nope"])
def test_load_model_errors(uri):
    with pytest.raises(VitlensError):
        load_model(uri)


def test_load_model_accepts_plain_modules_and_backbones():
    model = make_timm("vit")
    bb = load_model(model)
    assert bb.model is model and load_model(bb) is bb


def test_grad_from_starts_the_graph_at_a_block(images):
    bb = adapt(tiny_timm())
    for p in bb.parameters():
        p.requires_grad_(False)
    trace = bb.run(images, grad_from=1)
    assert trace.hidden[1].is_leaf and trace.hidden[1].requires_grad and not trace.hidden[0].requires_grad
    (g,) = torch.autograd.grad(trace.logits[:, 0].sum(), trace.hidden[1])
    assert g.shape == trace.hidden[1].shape and g.abs().sum() > 0
    last = bb.run(images, grad_from=len(bb.blocks))
    assert last.hidden[-1].is_leaf and last.hidden[-1].requires_grad


def test_capture_outputs_records_named_modules(images):
    bb = adapt(tiny_timm())
    with bb.capture_outputs({"norm": bb.attention_norm(1)}) as found:
        trace = bb.run(images)
    torch.testing.assert_close(found["norm"], bb.model.blocks[1].norm1(trace.hidden[1]))
    assert all(not m._forward_hooks for m in bb.modules())


def test_grid_for_leaves_batchnorm_statistics_alone():
    from vitlens.backbones.presets import build_preset

    module, prep = build_preset("fashion-vit", num_classes=10)
    bb = adapt(module, prep).train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    assert bb.grid_for((64, 64)) == (8, 8) and bb.training
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_fashion_presets_stems():
    """``fashion-vit`` has two 3×3 convs per stem stage (the second keeps the resolution), the first design
    (``fashion-vit-1conv``) one; both give the 8×8 token grid and differ only in the stem's parameters."""
    from vitlens.backbones.presets import build_preset, conv_stem

    two, prep = build_preset("fashion-vit", num_classes=10)
    one, _ = build_preset("fashion-vit-1conv", num_classes=10)
    convs = [[m for m in mod.patch_embed.backbone.modules() if isinstance(m, torch.nn.Conv2d)] for mod in (two, one)]
    assert [c.stride for c in convs[0]] == [(2, 2), (1, 1)] * 3 and [c.stride for c in convs[1]] == [(2, 2)] * 3
    for model in (two, one):
        assert adapt(model, prep).grid_for((64, 64)) == (8, 8)
    extra = {k for k in two.state_dict() if k not in one.state_dict()}
    assert extra and all(k.startswith("patch_embed.backbone.") for k in extra)
    with pytest.raises(ValueError, match="at least 1"):
        conv_stem(convs_per_stage=0)
