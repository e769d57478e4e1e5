"""The backbone contract on timm's newer ViT families: Eva (EVA, EVA-02), Beit, DeiT III and FlexiViT.

Logits equal the timm model's own; attention probabilities equal a recomputation from each block's own
weights written here (q/k/v, rotary embedding, relative position bias); the blocks recomputed from
``block_parts`` reproduce the model; the model is left as it was.
"""

from __future__ import annotations

import inspect

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.eva import Eva

import vitlens
from vitlens import VitlensError, load_model
from vitlens.backbones import adapt
from vitlens.backbones.timm_beit import TimmBeit
from vitlens.backbones.timm_eva import TimmEva
from vitlens.backbones.timm_vit import TimmViT
from vitlens.explainers.chefer import _check_against_model, forward_parts
from vitlens.metrics.sanity import cascade, unassigned
from zoo import ZOO, _timm

#: zoo entry → (adapter, prefix kinds, pooling)
FAMILIES = {
    "timm-deit3": (TimmViT, ("cls",), "token"),
    "timm-flexivit": (TimmViT, ("cls",), "token"),
    "timm-eva02": (TimmEva, ("cls",), "avg"),
    "timm-eva02-swiglu-norm": (TimmEva, ("cls",), "token"),
    "timm-eva-registers": (TimmEva, ("cls", "reg", "reg"), "token"),
    "timm-beit": (TimmBeit, ("cls",), "avg"),
    "timm-beit-shared-bias": (TimmBeit, ("cls",), "token"),
}

#: more Eva layouts, beyond the zoo: name → timm kwargs on eva02_tiny_patch14_224
EVA_VARIANTS = {
    "dynamic-registers": {"dynamic_img_size": True, "num_reg_tokens": 1},
    "rope-mixed": {"rope_type": "mixed"},
    "rope-rotate-half": {"rope_rotate_half": True},
    "rope-attention-separate-qkv": {"attn_type": "rope", "qkv_fused": False},
    "qk-norm-scale-attn": {"qk_norm": True, "scale_attn_inner": True},
}


def build(name: str) -> torch.nn.Module:
    if name in ZOO:
        return ZOO[name]()
    torch.manual_seed(0)
    model = _timm("eva02_tiny_patch14_224", **EVA_VARIANTS[name]).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def _eva_variant(name: str):
    """``name`` as a test parameter, skipped where the installed timm's Eva lacks one of its options."""
    missing = set(EVA_VARIANTS[name]) - set(inspect.signature(Eva.__init__).parameters)
    reason = f"timm {timm.__version__}'s Eva has no {', '.join(sorted(missing))}"
    return pytest.param(name, marks=pytest.mark.skipif(bool(missing), reason=reason))


ALL = list(FAMILIES) + [_eva_variant(name) for name in EVA_VARIANTS]


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


# --- an independent recomputation of the attention probabilities ---------------------------------


def rotate(t: torch.Tensor, emb: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotary embedding: t·cos + rot(t)·sin, rot pairing (2i, 2i+1) or the two halves of the head dim."""
    sin, cos = emb.chunk(2, -1)
    if half:
        a, b = t.chunk(2, -1)
        rotated = torch.cat([-b, a], -1)
    else:
        rotated = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
    return t * cos + rotated * sin


def manual_attention(model: torch.nn.Module, index: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) of block ``index`` on its input ``x``, from the block's weights."""
    block = model.blocks[index]
    attn = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        bias = attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
    else:
        q, k = (getattr(attn, n)(h).reshape(b, t, heads, -1).transpose(1, 2) for n in ("q_proj", "k_proj"))
    identity = torch.nn.Identity()
    q, k = getattr(attn, "q_norm", identity)(q), getattr(attn, "k_norm", identity)(k)
    logits_bias = 0.0
    if getattr(model, "rope", None) is not None:
        rope = model.rope
        emb = rope.get_embed(shape=grid) if model.dynamic_img_size else rope.get_embed()
        if getattr(model, "rope_mixed", False):
            emb = emb[index]
        n = model.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :n], rotate(q[:, :, n:], emb, half)], 2)
        k = torch.cat([k[:, :, :n], rotate(k[:, :, n:], emb, half)], 2)
    if getattr(attn, "relative_position_bias_table", None) is not None:
        table, idx = attn.relative_position_bias_table, attn.relative_position_index
        logits_bias = logits_bias + table[idx.reshape(-1)].reshape(t, t, heads).permute(2, 0, 1)
    if getattr(model, "rel_pos_bias", None) is not None:
        shared = model.rel_pos_bias
        logits_bias = logits_bias + shared.relative_position_bias_table[shared.relative_position_index.reshape(-1)] \
            .reshape(t, t, heads).permute(2, 0, 1)  # fmt: skip
    return (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + logits_bias).softmax(-1)


# --- the contract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_and_layout(name):
    adapter, kinds, pooling = FAMILIES[name]
    bb = adapt(build(name))
    assert type(bb) is adapter
    assert bb.prefix_kinds == kinds and bb.num_prefix_tokens == len(kinds)
    assert bb.pooling == pooling and bb.num_classes == 5
    assert bb.grid_for((32, 32)) == (4, 4) and bb.patch_size == (8, 8)
    assert bb.describe()["blocks"] == 2
    readout = bb.readout(len(kinds) + 16)
    if pooling == "token":
        assert readout[0] == 1 and readout.sum() == 1
    else:
        torch.testing.assert_close(readout[len(kinds) :], torch.full((16,), 1 / 16))


@pytest.mark.parametrize("name", ALL)
def test_logits_and_attention_equal_the_model(name, images):
    model = build(name)
    bb = adapt(model)
    with torch.no_grad():
        reference = model(bb.normalize(images))
        plain = bb(images)
        traced = bb.run(images, attention=True)
    scale = reference.abs().max()
    assert scale > 0.1  # a head whose logits are not all about zero
    torch.testing.assert_close(plain, reference, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(traced.logits, reference, atol=1e-5 * scale, rtol=1e-5)
    assert len(traced.attentions) == len(traced.hidden) - 1 == 2
    t = bb.num_prefix_tokens + 16
    for i, (x, a) in enumerate(zip(traced.hidden[:-1], traced.attentions, strict=True)):
        assert a.shape == (3, 4, t, t)
        torch.testing.assert_close(a, manual_attention(model, i, x, (4, 4)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["timm-beit", "timm-beit-shared-bias", "timm-eva02"])
def test_position_terms_matter(name, images):
    """The relative position bias and the rotary embedding change the attention (the tests above see them)."""
    model = build(name)
    bb = adapt(model)
    with torch.no_grad():
        traced = bb.run(images, attention=True)
        if name == "timm-eva02":
            model.rope = None
        else:
            for key, p in model.named_parameters():
                if "relative_position_bias_table" in key:
                    p.zero_()
        plain = manual_attention(model, 0, traced.hidden[0], (4, 4))
    assert (plain - traced.attentions[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_block_parts_reproduce_the_blocks(name, images):
    bb = adapt(build(name))
    _check_against_model(bb, images[:1])  # every block's output and attention, and the logits (raises if not)
    with torch.no_grad():
        ours = forward_parts(bb, images)
        trace = bb.run(images, attention=True)
    for i, (parts, c) in enumerate(ours.blocks):
        torch.testing.assert_close(c.out, trace.hidden[i + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c.a, trace.attentions[i], atol=1e-5, rtol=1e-4)
        assert (parts.rope is not None) == (getattr(bb.model, "rope", None) is not None)
        assert (parts.attn_bias is not None) == (type(bb) is TimmBeit)
    torch.testing.assert_close(ours.logits, trace.logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["timm-eva02-swiglu-norm", "timm-beit", "timm-deit3"])
def test_head_parts_reproduce_the_logits(name, images):
    bb = adapt(build(name))
    head = bb.head_parts()
    with torch.no_grad():
        trace = bb.run(images)
        pooled = [trace.tokens[:, i] if i is not None else trace.patch_tokens.mean(1) for i, _ in head.heads]
        logits = sum(F.linear(head.pre(z), *affine) for z, (_, affine) in zip(pooled, head.heads, strict=True))
    torch.testing.assert_close(logits / len(head.heads), trace.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_run_from_embeddings_equals_images(name, images):
    bb = adapt(build(name))
    with torch.no_grad():
        emb, grid = bb.embed(bb.normalize(images))
        assert emb.shape == (3, 16, 32) and grid == (4, 4)
        torch.testing.assert_close(bb.run(embeddings=emb, grid=grid).logits, bb(images))


@pytest.mark.parametrize("name", ["timm-eva02-swiglu-norm", "timm-beit", "timm-beit-shared-bias"])
def test_token_logits_read_the_class_token_as_the_head(name, images):
    bb = adapt(build(name))
    with torch.no_grad():
        trace = bb.run(images)
        tokens = bb.token_logits(trace.tokens)
    assert tokens.shape == (3, bb.num_prefix_tokens + 16, 5)
    if bb.pooling == "token":
        torch.testing.assert_close(tokens[:, 0], trace.logits)
    else:  # average pooling: the classifier of the mean token, the norm after pooling on every token
        m = bb.model
        torch.testing.assert_close(tokens, m.head(m.fc_norm(trace.tokens)))


@pytest.mark.parametrize("name", ALL)
def test_capture_leaves_the_model_as_it_was(name, images):
    model = build(name)
    bb = adapt(model)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = bb(images)
        bb.run(images, attention=True)
        after = bb(images)
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert all(not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(before, after)
    with pytest.raises(RuntimeError, match="boom"), bb.capture_attention():
        assert not any(blk.attn.fused_attn for blk in model.blocks)
        raise RuntimeError("boom")
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["timm-eva02", "rope-mixed", "timm-beit-shared-bias"])
def test_wrapped_blocks_share_the_models_parameters(name):
    """Blocks the model calls with more arguments are wrapped; the wrappers own nothing (sanity's cascade
    randomises every parameter through them)."""
    bb = adapt(build(name))
    for wrapped, block in zip(bb.blocks, bb.model.blocks, strict=True):
        assert wrapped is not block
        assert [id(p) for p in wrapped.parameters()] == [id(p) for p in block.parameters()]
    assert bb.state_dict().keys() == {f"model.{k}" for k in bb.model.state_dict()}
    levels = cascade(bb)
    assert unassigned(bb, levels) == 0
    position = {id(p) for p in dict(levels)["position"]}
    model = bb.model
    shared = model.rel_pos_bias if getattr(model, "rel_pos_bias", None) is not None else model.rope
    assert {id(p) for p in shared.parameters()} <= position  # the shared bias, learned rotary frequencies


def test_eva_other_sizes_with_dynamic_img_size():
    model = build("dynamic-registers")
    bb = adapt(model)
    torch.manual_seed(2)
    images = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        reference = model(bb.normalize(images))
        trace = bb.run(images, attention=True)
        ours = forward_parts(bb, images)
    assert trace.grid == (6, 5) and trace.attentions[0].shape[-1] == 2 + 30
    torch.testing.assert_close(trace.logits, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits, reference, atol=1e-5, rtol=1e-5)
    for i, (x, a) in enumerate(zip(trace.hidden[:-1], trace.attentions, strict=True)):
        torch.testing.assert_close(a, manual_attention(model, i, x, (6, 5)), atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # back to the built size: the rotary embedding follows the grid
        torch.testing.assert_close(bb(torch.rand(1, 3, 32, 32)).shape, torch.Size([1, 5]))
    with pytest.raises(VitlensError, match="or sides that are multiples of 8x8"):  # a size the patches do not tile
        vitlens.explain(model, torch.rand(1, 3, 44, 40), method="gradcam")


@pytest.mark.parametrize("name", ["timm-deit3", "timm-flexivit"])
def test_vit_families_other_sizes_equal_timms_dynamic_size(name):
    """DeiT III (position embedding without the class token) and FlexiViT at 48x40 equal the same weights
    built with ``dynamic_img_size=True``."""
    bb = adapt(build(name))
    timm_name = {"timm-deit3": "deit3_small_patch16_224", "timm-flexivit": "flexivit_small"}[name]
    kw = {"init_values": 0.1} if name == "timm-deit3" else {}
    dynamic = _timm(timm_name, dynamic_img_size=True, **kw).eval()
    dynamic.load_state_dict(bb.model.state_dict())
    images = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(bb(images), dynamic(bb.normalize(images)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["timm-eva02", "timm-beit", "timm-beit-shared-bias"])
def test_fixed_size_models_refuse_other_sizes_in_one_line(name):
    bb = adapt(build(name))
    for call in (lambda: bb(torch.rand(1, 3, 48, 40)), lambda: bb.run(embeddings=torch.rand(1, 30, 32), grid=(6, 5))):
        with pytest.raises(VitlensError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and ("32x32" in message or "4x4" in message), message


def test_explicit_size_check_names_the_fix():
    from vitlens.explainers import get_explainer

    with pytest.raises(VitlensError, match="dynamic_img_size=True"):
        get_explainer("rollout", build("timm-eva02"))(torch.rand(1, 3, 48, 40))


@pytest.mark.parametrize(
    "uri",
    [
        "timm:eva02_tiny_patch14_224?pretrained=0&num_classes=3&depth=2&img_size=56",
        "timm:beit_base_patch16_224?pretrained=0&num_classes=3&depth=2&embed_dim=48&num_heads=4&img_size=64",
        "timm:deit3_small_patch16_224?pretrained=0&num_classes=3&depth=2&img_size=64",
        "timm:flexivit_small?pretrained=0&num_classes=3&depth=2&img_size=64",
    ],
)
def test_model_uris_load_offline(uri, tmp_path):
    from vitlens.models.checkpoint import load_checkpoint, save_checkpoint

    bb = load_model(uri)
    size = bb.preprocessing.input_size
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        logits = bb(images)
    assert logits.shape == (2, 3) and bb.spec["source"] == "timm"
    again = load_checkpoint(save_checkpoint(tmp_path / "ckpt", bb))
    assert type(again) is type(bb)
    with torch.no_grad():
        torch.testing.assert_close(again(images), logits)
