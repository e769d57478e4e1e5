"""Hugging Face DINOv2 (with and without registers, heads, SwiGLU) and ViT / DeiT under SDPA, on tiny random
models: outputs equal the model's own, explicit attention probabilities, flags restored, ``hf:`` loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("transformers")

from transformers import (
    BitImageProcessor,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from vitlens.backbones import adapt
from vitlens.backbones.hf_dinov2 import HFDinov2, dinov2_preprocessing, is_hf_dinov2
from vitlens.backbones.hf_vit import HFViT
from vitlens.errors import VitlensError
from vitlens.models import load_model

HEADS = 4
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, num_labels=5)
DINOV2 = {
    "dinov2": (Dinov2ForImageClassification, Dinov2Config, {}),
    "dinov2-swiglu": (Dinov2ForImageClassification, Dinov2Config, {"use_swiglu_ffn": True}),
    "dinov2-registers": (Dinov2WithRegistersForImageClassification, Dinov2WithRegistersConfig,
                         {"num_register_tokens": 4}),
    "dinov2-registers-swiglu": (Dinov2WithRegistersForImageClassification, Dinov2WithRegistersConfig,
                                {"num_register_tokens": 3, "use_swiglu_ffn": True}),
    "dinov2-model": (Dinov2Model, Dinov2Config, {}),
    "dinov2-registers-model": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig, {"num_register_tokens": 2}),
}  # fmt: skip
SIZES = [(32, 32), (48, 40)]  # the built size, and another one (position embeddings interpolated)


def make_dinov2(kind: str, **overrides) -> nn.Module:
    cls, config_cls, extra = DINOV2[kind]
    torch.manual_seed(0)
    model = cls(config_cls(**TINY, mlp_ratio=2, layerscale_value=0.7, **extra, **overrides))
    with torch.no_grad():  # random layer scale and registers, a unit-variance head: nothing hides a mistake
        for block in model.base_model.encoder.layer:
            block.layer_scale1.lambda1.uniform_(0.2, 1.5)
            block.layer_scale2.lambda1.uniform_(0.2, 1.5)
        if hasattr(model.base_model.embeddings, "register_tokens"):
            model.base_model.embeddings.register_tokens.normal_()
        if isinstance(getattr(model, "classifier", None), nn.Linear):
            nn.init.normal_(model.classifier.weight)
    return model.eval()


def registers(kind: str) -> int:
    return DINOV2[kind][2].get("num_register_tokens", 0)


def own_output(model: nn.Module, pixels: Tensor, embedding: str = "cls") -> Tensor:
    """The model's own forward: logits, or the embedding read from its last hidden state."""
    out = model(pixels)
    if hasattr(out, "logits"):
        return out.logits
    if embedding == "cls":  # the final-normed class token (DINOv2's pooler_output; ViTModel's pooler is not it)
        return out.last_hidden_state[:, 0]
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    return out.last_hidden_state[:, prefix:].mean(1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", list(DINOV2))
def test_dinov2_output_equals_the_model(kind, size):
    model = make_dinov2(kind)
    backbone = adapt(model)
    assert isinstance(backbone, HFDinov2) and is_hf_dinov2(model)
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        ours = backbone(images)
        theirs = own_output(model, backbone.normalize(images))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if backbone.headless:
        torch.testing.assert_close(ours, model(backbone.normalize(images)).pooler_output, atol=1e-5, rtol=0)
    grid = (size[0] // 8, size[1] // 8)
    assert backbone.grid_for(size) == grid
    trace = backbone.run(images)
    assert trace.tokens.shape == (2, 1 + registers(kind) + grid[0] * grid[1], 32)


@pytest.mark.parametrize("kind", ["dinov2-model", "dinov2-registers-model"])
def test_dinov2_mean_embedding(kind):
    model = make_dinov2(kind)
    backbone = HFDinov2(model, embedding="mean")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), own_output(model, backbone.normalize(images), "mean"))
    assert backbone.headless and backbone.pooling == "avg" and backbone.num_classes == 0 and backbone.classes == []
    readout = backbone.readout(backbone.num_prefix_tokens + 16)
    assert readout[: backbone.num_prefix_tokens].sum() == 0 and torch.allclose(readout[-16:], torch.full((16,), 1 / 16))
    with pytest.raises(VitlensError, match="^embedding='pool': expected one of 'cls', 'mean'$"):
        HFDinov2(model, embedding="pool")


@pytest.mark.parametrize("kind", list(DINOV2))
def test_dinov2_layout(kind):
    backbone = adapt(make_dinov2(kind))
    n = registers(kind)
    assert backbone.prefix_kinds == ("cls",) + ("reg",) * n
    assert backbone.num_prefix_tokens == 1 + n and backbone.class_token_index == 0
    assert backbone.headless == kind.endswith("-model")
    t = 1 + n + 16
    readout = backbone.readout(t)
    assert readout.sum().item() == pytest.approx(1.0)
    assert readout[1 : 1 + n].sum() == 0  # registers are never read
    if backbone.headless:
        assert readout[0] == 1
    else:  # the classifier reads concat(class token, mean of the patches)
        assert readout[0] == 0.5 and torch.allclose(readout[1 + n :], torch.full((16,), 0.5 / 16))


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-registers-swiglu"])
def test_dinov2_head_parts_and_token_logits(kind):
    model = make_dinov2(kind)
    backbone = adapt(model)
    tokens = torch.randn(2, backbone.num_prefix_tokens + 16, 32)
    logits = backbone.head(tokens)
    w, b = model.classifier.weight, model.classifier.bias
    expected = torch.cat([tokens[:, 0], tokens[:, backbone.num_prefix_tokens :].mean(1)], -1) @ w.T + b
    torch.testing.assert_close(logits, expected)

    parts = backbone.head_parts()  # the logits are the heads' mean
    patch_mean = tokens[:, backbone.num_prefix_tokens :].mean(1)
    pooled = [tokens[:, i] if i is not None else patch_mean for i, _ in parts.heads]
    from_parts = sum(F.linear(parts.pre(z), *affine) for z, (_, affine) in zip(pooled, parts.heads, strict=True))
    torch.testing.assert_close(from_parts / len(parts.heads), logits)

    # one token's logits: the head's answer for an image whose every token is that one
    same = tokens[:, :1].expand(-1, tokens.shape[1], -1)
    torch.testing.assert_close(backbone.token_logits(tokens)[:, 0], backbone.head(same))


def parts_forward(parts, x: Tensor) -> Tensor:
    """One block recomputed from its parts, independently of the adapter and of transformers."""
    b, t, d = x.shape
    q, k, v = F.linear(parts.norm1(x), *parts.qkv).reshape(b, t, 3, parts.heads, -1).permute(2, 0, 3, 1, 4)
    a = (q @ k.transpose(-1, -2) * parts.scale).softmax(-1)
    x = x + F.linear((a @ v).transpose(1, 2).reshape(b, t, d), *parts.proj)
    h = parts.norm2(x)
    hidden = parts.act(F.linear(h, *parts.fc1))
    if parts.gate is not None:
        hidden = hidden * F.linear(h, *parts.gate)
    return x + F.linear(parts.mlp_norm(hidden), *parts.fc2)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-swiglu", "dinov2-registers-swiglu"])
def test_dinov2_block_parts_reproduce_the_blocks(kind):
    backbone = adapt(make_dinov2(kind))
    x = torch.randn(2, backbone.num_prefix_tokens + 16, 32)
    for block in backbone.blocks:
        parts = backbone.block_parts(block)
        assert (parts.gate is not None) == ("swiglu" in kind)
        with torch.no_grad():
            torch.testing.assert_close(parts_forward(parts, x), block(x), atol=1e-5, rtol=0)


def eager_twin(model: nn.Module) -> nn.Module:
    """The same weights in a model built with eager attention."""
    config = type(model.config).from_dict(model.config.to_dict())
    config._attn_implementation = "eager"
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    assert twin.config._attn_implementation == "eager"
    return twin


def attention_outputs(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("attention") and hasattr(m, "q_proj")]


@pytest.mark.parametrize("kind", ["dinov2", "dinov2-registers-swiglu", "dinov2-registers-model"])
def test_dinov2_capture_attention(kind):
    model = make_dinov2(kind)
    assert model.config._attn_implementation == "sdpa"
    backbone = adapt(model)
    images = torch.rand(2, 3, 32, 32)
    trace = backbone.run(images, attention=True)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        theirs = eager_twin(model)(backbone.normalize(images), output_attentions=True).attentions
    t = backbone.num_prefix_tokens + 16
    assert len(trace.attentions) == len(theirs) == 2
    for ours, ref in zip(trace.attentions, theirs, strict=True):
        assert ours.shape == (2, HEADS, t, t)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(trace.logits, backbone.run(images).logits, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(trace.logits.sum(), trace.attentions)
    assert all(g.abs().sum() > 0 for g in grads)


# --- ViT / DeiT under SDPA ------------------------------------------------------------------------------------

SDPA = {
    "vit": (ViTForImageClassification, ViTConfig),
    "deit": (DeiTForImageClassification, DeiTConfig),
    "deit-distilled": (DeiTForImageClassificationWithTeacher, DeiTConfig),
    "vit-model": (ViTModel, ViTConfig),
    "dinov2": None,
}


def make_sdpa(kind: str) -> nn.Module:
    if kind == "dinov2":
        return make_dinov2("dinov2-registers")
    cls, config_cls = SDPA[kind]
    torch.manual_seed(0)
    model = cls(config_cls(**TINY, intermediate_size=64, attn_implementation="sdpa")).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.mark.parametrize("kind", list(SDPA))
def test_sdpa_attention_maps_equal_eager(kind):
    model = make_sdpa(kind)
    backbone = adapt(model)
    twin = adapt(eager_twin(model))
    images = torch.rand(2, 3, 32, 32)

    seen = []  # what the attention modules return: no probabilities on the fused path
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out[1])) for m in attention_outputs(model)]
    try:
        plain = backbone.run(images)
        assert seen and all(p is None for p in seen)  # the plain forward stays on sdpa
        seen.clear()
        trace = backbone.run(images, attention=True)
        assert seen and all(p is not None for p in seen)
    finally:
        for h in handles:
            h.remove()
    assert model.config._attn_implementation == "sdpa"

    reference = twin.run(images, attention=True)
    for ours, theirs in zip(trace.attentions, reference.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(trace.logits, plain.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.logits, plain.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(SDPA))
def test_sdpa_restored_after_an_error(kind):
    model = make_sdpa(kind)
    backbone = adapt(model)
    with pytest.raises(RuntimeError, match="inside"), backbone.capture_attention():
        assert model.config._attn_implementation == "eager"
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert all(not m._forward_hooks for m in attention_outputs(model))


@pytest.mark.parametrize("method", ["attention", "rollout", "gae", "chefer", "attnlrp"])
def test_sdpa_explanations_equal_eager(method):
    import vitlens

    model = make_sdpa("vit")
    images = torch.rand(2, 3, 32, 32)
    ours = vitlens.explain(model, images, method=method).maps
    theirs = vitlens.explain(eager_twin(model), images, method=method).maps
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"


# --- headless Hugging Face ViT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ViTModel, DeiTModel])
def test_hf_vit_model_without_head(cls):
    torch.manual_seed(0)
    model = cls((DeiTConfig if cls is DeiTModel else ViTConfig)(**TINY, intermediate_size=64)).eval()
    backbone = adapt(model)
    assert isinstance(backbone, HFViT) and backbone.headless and backbone.classes == []
    prefix = backbone.num_prefix_tokens
    assert prefix == (2 if cls is DeiTModel else 1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(backbone.normalize(images))
        torch.testing.assert_close(backbone(images), out.last_hidden_state[:, 0])  # not the tanh pooler
        mean = HFViT(model, embedding="mean")
        torch.testing.assert_close(mean(images), out.last_hidden_state[:, prefix:].mean(1))
    assert backbone.readout(prefix + 16).tolist() == [1.0] + [0.0] * (prefix + 15)
    assert mean.readout(prefix + 16)[:prefix].sum() == 0
    with pytest.raises(VitlensError, match="no classifier head"):
        backbone.token_logits(torch.randn(1, 17, 32))


# --- preprocessing and hf: URIs ---------------------------------------------------------------------------------


def test_dinov2_preprocessing():
    model = make_dinov2("dinov2")
    assert dinov2_preprocessing(model).input_size == (32, 32)
    processor = BitImageProcessor(crop_size={"height": 24, "width": 24}, do_center_crop=True,
                                  image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5], resample=3)  # fmt: skip
    prep = dinov2_preprocessing(model, processor)
    assert prep.input_size == (24, 24) and prep.mean == (0.1, 0.2, 0.3) and prep.interpolation == "bicubic"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models saved with save_pretrained: loaded back offline from their folders."""
    root = tmp_path_factory.mktemp("hf-families")
    models = {
        "dinov2": make_dinov2("dinov2"),
        "dinov2-registers-model": make_dinov2("dinov2-registers-model"),
        "vit-model": make_sdpa("vit-model"),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, models


@pytest.mark.parametrize(
    "name, cls, headless",
    [("dinov2", HFDinov2, False), ("dinov2-registers-model", HFDinov2, True), ("vit-model", HFViT, True)],
)
def test_hf_uri_loads_through_auto_classes(saved, monkeypatch, name, cls, headless):
    import vitlens.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda host=models.HUB_HOST: False)  # offline: local files only
    root, built = saved
    backbone = load_model(f"hf:{root / name}")
    assert type(backbone) is cls and backbone.headless == headless and not backbone.training
    assert backbone.spec["name"] == type(built[name]).__name__
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), own_output(built[name], backbone.normalize(images)))


def test_hf_uri_embedding_option(saved):
    root, built = saved
    backbone = load_model(f"hf:{root / 'dinov2-registers-model'}?embedding=mean")
    assert backbone.pooling == "avg"
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = own_output(built["dinov2-registers-model"], backbone.normalize(images), "mean")
        torch.testing.assert_close(backbone(images), expected)
    with pytest.raises(VitlensError, match="^embedding= applies to models without a classifier head"):
        load_model(f"hf:{root / 'dinov2'}?embedding=mean")
    with pytest.raises(VitlensError, match="^embedding='x': expected one of 'cls', 'mean'$"):
        load_model(f"hf:{root / 'vit-model'}?embedding=x")


def test_hf_uri_never_trusts_remote_code(saved, monkeypatch):
    import transformers

    monkeypatch.delenv("VITLENS_TRUST_REMOTE_CODE", raising=False)
    seen = []
    for auto in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoModelForImageClassification):
        real = auto.from_pretrained

        def spy(name, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(name, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    root, _ = saved
    load_model(f"hf:{root / 'dinov2-registers-model'}")
    load_model(f"hf:{root / 'dinov2'}")
    assert seen and all(flag is False for flag in seen)
    with pytest.raises(VitlensError, match="trust_remote_code not allowed"):
        load_model(f"hf:{root / 'dinov2'}?trust_remote_code=1")


@pytest.mark.parametrize("name", ["dinov2", "dinov2-registers-swiglu"])
def test_dinov2_classifier_checkpoint_round_trip(tmp_path, name):
    from vitlens.models.checkpoint import load_checkpoint, save_checkpoint

    model = make_dinov2(name)
    model.save_pretrained(tmp_path / "hf")
    backbone = load_model(f"hf:{tmp_path / 'hf'}")
    path = save_checkpoint(tmp_path / "ck", backbone)
    loaded = load_checkpoint(path)
    assert type(loaded) is HFDinov2 and loaded.prefix_kinds == backbone.prefix_kinds
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), backbone(images), atol=0, rtol=0)


def test_checkpoint_register_tokens_are_bounded():
    from vitlens.models.checkpoint import check_model_sizes

    with pytest.raises(VitlensError, match="num_register_tokens"):
        check_model_sizes({"config": {"num_register_tokens": 10**9}}, "config.json")


def test_hub_dinov2_without_network_fails_in_one_line(monkeypatch):
    import time

    import vitlens.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda host=models.HUB_HOST: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    expected = r"^could not load hf:facebook/dinov2-small\?revision=\S+: .* no network: "
    with pytest.raises(VitlensError, match=expected) as err:
        load_model("hf:facebook/dinov2-small?revision=no-such-revision-in-any-cache")
    assert "\n" not in str(err.value) and time.monotonic() - start < 30
