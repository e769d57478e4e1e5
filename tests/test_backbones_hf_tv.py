"""The Hugging Face and torchvision adapters on tiny random models (the Hugging Face ones need transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from vitlens.backbones.base import Backbone
from vitlens.backbones.hf_vit import HFViT, hf_preprocessing, is_hf_vit
from vitlens.backbones.torchvision_vit import TorchvisionViT, is_torchvision_vit, torchvision_preprocessing
from vitlens.errors import VitlensError

KINDS = ["vit", "deit", "deit_distilled", "torchvision"]
HF_KINDS = KINDS[:3]
HEADS = 4
TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    intermediate_size=64,
    num_labels=5,
)


def make(kind: str) -> tuple[nn.Module, Backbone]:
    """A tiny random model of ``kind`` and its backbone; a Hugging Face kind skips the test without transformers."""
    transformers = None if kind == "torchvision" else pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY))
    elif kind == "deit":
        model = transformers.DeiTForImageClassification(transformers.DeiTConfig(**TINY))
    elif kind == "deit_distilled":
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY))
    else:
        model = VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=HEADS,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=5,
        )
        nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zero
        nn.init.normal_(model.class_token)
    model.eval()
    backbone = TorchvisionViT(model) if kind == "torchvision" else HFViT(model)
    return model, backbone


def reference_logits(kind: str, model: nn.Module, x: Tensor, **kwargs) -> Tensor:
    return model(x) if kind == "torchvision" else model(pixel_values=x, **kwargs).logits


def manual_attention(kind: str, block: nn.Module, hidden: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) recomputed from a block's input and its own q/k projections."""
    b, t, d = hidden.shape
    if kind == "torchvision":
        x = block.ln_1(hidden)
        w, bias = block.self_attention.in_proj_weight, block.self_attention.in_proj_bias
        q, k = F.linear(x, w[:d], bias[:d]), F.linear(x, w[d : 2 * d], bias[d : 2 * d])
    else:
        x = block.layernorm_before(hidden)
        q, k = block.attention.q_proj(x), block.attention.k_proj(x)
    q, k = (z.reshape(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k))
    return (q @ k.transpose(-2, -1) / (d // HEADS) ** 0.5).softmax(-1)


def hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


@pytest.fixture
def images() -> Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_the_model(kind, images):
    model, backbone = make(kind)
    with torch.no_grad():
        ours = backbone.run(images).logits
        theirs = reference_logits(kind, model, backbone.normalize(images))
    assert ours.shape == (2, 5)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(backbone(images), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_layout(kind):
    _, backbone = make(kind)
    kinds = ("cls", "dist") if kind.startswith("deit") else ("cls",)
    assert backbone.prefix_kinds == kinds
    assert backbone.num_prefix_tokens == len(kinds)
    assert backbone.class_token_index == 0
    assert backbone.describe() == {
        "family": "torchvision" if kind == "torchvision" else "hf",
        "input_size": [32, 32],
        "patch_size": [8, 8],
        "grid": [4, 4],
        "prefix_tokens": list(kinds),
        "blocks": 2,
        "classes": 5,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_attention_capture(kind, images):
    model, backbone = make(kind)
    implementation = None if kind == "torchvision" else model.config._attn_implementation
    plain = backbone.run(images)
    trace = backbone.run(images, attention=True)

    # restored: no hooks (the model was never called directly, so transformers has installed none), no patches
    assert sum(hook_counts(model)) == 0
    if kind == "torchvision":
        assert all("forward" not in vars(block.self_attention) for block in backbone.blocks)
    else:
        assert model.config._attn_implementation == implementation
    torch.testing.assert_close(backbone.run(images).logits, plain.logits, atol=0, rtol=0)

    t = 16 + backbone.num_prefix_tokens
    assert len(trace.attentions) == len(backbone.blocks) == 2
    for block, hidden, attn in zip(backbone.blocks, trace.hidden, trace.attentions, strict=False):
        assert attn.shape == (2, HEADS, t, t)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, HEADS, t), atol=1e-5, rtol=0)
        torch.testing.assert_close(attn, manual_attention(kind, block, hidden), atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.logits, plain.logits, atol=1e-5, rtol=0)

    grads = torch.autograd.grad(trace.logits[:, 0].sum(), trace.attentions)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    # transformers installs (inactive) output-capturing hooks on a first direct call: compare counts
    with torch.no_grad():
        reference_logits(kind, model, backbone.normalize(images))
    before = hook_counts(model)
    backbone.run(images, attention=True)
    assert hook_counts(model) == before


def test_torchvision_explicit_attention_matches_mha():
    _, backbone = make("torchvision")
    mha = backbone.blocks[0].self_attention
    x = torch.randn(2, 17, 32)
    expected = mha(x, x, x, need_weights=False)[0]
    with backbone.capture_attention() as found:
        out, weights = mha(x, x, x, need_weights=False)
    assert weights is None and len(found) == 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert "forward" not in vars(mha)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_capture_restores_eager_too(kind, images):
    model, backbone = make(kind)
    model.set_attn_implementation("eager")
    with backbone.capture_attention():
        pass
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", KINDS)
def test_run_from_embeddings(kind, images):
    _, backbone = make(kind)
    embeddings, grid = backbone.embed(backbone.normalize(images))
    assert embeddings.shape == (2, 16, 32) and grid == (4, 4)
    torch.testing.assert_close(
        backbone.run(embeddings=embeddings, grid=grid).logits, backbone.run(images).logits, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_token_logits(kind, images):
    model, backbone = make(kind)
    tokens = backbone.run(images).tokens
    per_token = backbone.token_logits(tokens)
    assert per_token.shape == (2, 16 + backbone.num_prefix_tokens, 5)
    cls = tokens[:, 0]
    if kind == "torchvision":
        expected = model.heads(cls)
    elif kind == "deit_distilled":
        expected = (model.cls_classifier(cls) + model.distillation_classifier(cls)) / 2
    else:
        expected = model.classifier(cls)
    torch.testing.assert_close(per_token[:, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_other_input_size(kind):
    model, backbone = make(kind)
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    trace = backbone.run(images, attention=True)
    assert trace.grid == (6, 6) == backbone.grid_for((48, 48))
    assert trace.attentions[0].shape[-1] == 36 + backbone.num_prefix_tokens
    with torch.no_grad():
        expected = reference_logits(kind, model, backbone.normalize(images), interpolate_pos_encoding=True)
    torch.testing.assert_close(trace.logits, expected, atol=1e-5, rtol=0)


def test_torchvision_other_input_size_is_refused():
    _, backbone = make("torchvision")
    with pytest.raises(VitlensError, match="32x32"):
        backbone.run(torch.rand(1, 3, 48, 48))
    with pytest.raises(VitlensError, match="grid"):
        backbone.run(embeddings=torch.zeros(1, 36, 32), grid=(6, 6))


def test_detection_and_preprocessing():
    transformers = pytest.importorskip("transformers")
    vit, _ = make("vit")
    tv, _ = make("torchvision")
    assert is_hf_vit(vit) and not is_hf_vit(tv) and not is_hf_vit(nn.Linear(2, 2))
    assert is_torchvision_vit(tv) and not is_torchvision_vit(vit)
    with pytest.raises(VitlensError):
        HFViT(nn.Linear(2, 2))

    assert hf_preprocessing(vit).to_dict() == {
        "input_size": [32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
    }
    prep = hf_preprocessing(vit, transformers.DeiTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]))
    assert prep.mean == (0.1, 0.2, 0.3) and prep.std == (0.4, 0.5, 0.6) and prep.interpolation == "bicubic"
    assert hf_preprocessing(vit, transformers.ViTImageProcessor()).interpolation == "bilinear"

    prep = torchvision_preprocessing(tv)
    assert prep.input_size == (32, 32) and prep.mean == (0.485, 0.456, 0.406)
    assert prep.interpolation == "bilinear"


def test_hf_class_names_from_config():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    labels = {"id2label": {0: "cat", 1: "dog"}, "label2id": {"cat": 0, "dog": 1}}
    config = transformers.ViTConfig(**{**TINY, "num_labels": 2, **labels})
    assert HFViT(transformers.ViTForImageClassification(config)).classes == ["cat", "dog"]
    assert make("vit")[1].classes == [str(i) for i in range(5)]
