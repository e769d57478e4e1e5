"""Attention read next to the fused kernel (``Backbone.probe_attention``) equals the explicit path.

The methods that read attention probabilities (attention, rollout, GAE, flow) keep the model's own fused
attention for the forward pass and recompute softmax(q kᵀ·scale) from hooked queries and keys, for the rows
they read; GAE takes ∂score/∂A = (∂score/∂O)·Vᵀ from the per-head attention output O. Everything here is
checked against the explicit softmax(QKᵀ)V path (``run(attention=True)``, ``capture_attention``).
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from test_explainers_chefer import sharpen
from vitlens import VitlensError, explain
from vitlens.backbones import Backbone, adapt
from vitlens.backbones.probe import RecomputedAttention, RecordedAttention
from vitlens.explainers.targets import Target
from zoo import ZOO, buildable

METHODS = ["attention", "rollout", "gae", "flow"]
FUSED_FAMILIES = ("timm", "hf", "torchvision")


def _qk_norm_layer_scale() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=3, num_heads=4, num_classes=5, init_values=0.5, qk_norm=True)  # fmt: skip


#: the zoo's models with attention over the whole image (hierarchical models have none to probe); entries
#: whose library is not installed are kept, and their tests skip
MODELS = {
    **{name: build for name, build in ZOO.items() if not buildable(name) or type(adapt(build())).global_attention},
    "timm-qk-norm-layer-scale": _qk_norm_layer_scale,
}


def backbone(name: str, dtype: torch.dtype = torch.float32) -> Backbone:
    return adapt(sharpen(MODELS[name]())).to(dtype)


def explicit(bb: Backbone):
    """The backbone with the default ``probe_attention`` (the explicit path) for the duration."""
    return _patched(bb, Backbone.probe_attention.__get__(bb))


class _patched:
    def __init__(self, bb: Backbone, probe):
        self.bb, self.probe = bb, probe

    def __enter__(self):
        self.bb.probe_attention = self.probe

    def __exit__(self, *exc):
        del self.bb.probe_attention


def maps_or_error(bb: Backbone, images: torch.Tensor, method: str):
    try:
        return explain(bb, images, method).maps
    except VitlensError as e:
        return str(e)


@pytest.fixture
def images():
    torch.manual_seed(3)
    return torch.rand(2, 3, 32, 32)


def explicit_probabilities_and_gradients(bb: Backbone, images: torch.Tensor, dtype: torch.dtype):
    with torch.enable_grad():
        trace = bb.run(images.to(dtype), attention=True, grad_from=0)
        score = Target().fixed(trace.logits).score(trace.logits).sum()
        return trace.attentions, torch.autograd.grad(score, trace.attentions)


@pytest.mark.parametrize("name", list(MODELS))
def test_probe_equals_explicit_probabilities_and_gradients(name, images):
    """Every block's probabilities (all rows and a subset) and ∂score/∂A equal the explicit path's; in float64
    the fused families agree to rounding (HF's eager softmax is float32 internally)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-6 if name.startswith("hf") else 1e-10)):
        bb = backbone(name, dtype)
        probs, grads = explicit_probabilities_and_gradients(bb, images, dtype)
        with torch.enable_grad(), bb.probe_attention(gradients=True) as probe:
            trace = bb.run(images.to(dtype), grad_from=0)
            probe.backward(Target().fixed(trace.logits).score(trace.logits).sum())
        assert probe.blocks == list(range(len(bb.blocks)))
        assert isinstance(probe, RecomputedAttention) == (bb.family in FUSED_FAMILIES)
        rows = torch.tensor([0, 3])
        for b, (a, g) in enumerate(zip(probs, grads, strict=True)):
            scale = g.abs().max()
            torch.testing.assert_close(probe.probabilities(b), a, atol=tol, rtol=tol)
            torch.testing.assert_close(probe.probabilities(b, rows), a[:, :, rows], atol=tol, rtol=tol)
            torch.testing.assert_close(probe.gradient(b) / scale, g / scale, atol=tol, rtol=tol)
            torch.testing.assert_close(probe.gradient(b, rows) / scale, g[:, :, rows] / scale, atol=tol, rtol=tol)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bb.modules())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_maps_equal_the_explicit_path(name, method, images):
    bb = backbone(name)
    fused = maps_or_error(bb, images, method)
    with explicit(bb):
        reference = maps_or_error(bb, images, method)
    if isinstance(reference, str):
        assert fused == reference
        return
    torch.testing.assert_close(fused / reference.abs().max(), reference / reference.abs().max(), atol=1e-5, rtol=1e-4)


class SdpaCalls:
    """Counts calls of ``F.scaled_dot_product_attention`` (the fused kernel every family reaches)."""

    def __init__(self, monkeypatch):
        self.count, original = 0, F.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)


def fused_checks(bb: Backbone) -> list:
    """Forward pre-hooks asserting, at every block's attention, that it is on its fused path."""
    checks = []
    for block in bb.blocks:
        if bb.family == "timm":
            module, fused = block.attn, lambda m: m.fused_attn
        elif bb.family == "hf":
            module, fused = block.attention, lambda m: m.config._attn_implementation == "sdpa"
        else:
            module, fused = block.self_attention, lambda m: "forward" not in vars(m)  # forward not replaced
        checks.append(module.register_forward_pre_hook(lambda m, _a, fused=fused: None if fused(m) else 1 / 0))
    return checks


@pytest.mark.parametrize("method", ["attention", "rollout", "gae"])
@pytest.mark.parametrize("name", ["timm-vit", "timm-deit-distilled", "hf-vit", "torchvision-vit"])
def test_the_forward_stays_fused(name, method, images, monkeypatch):
    """The attention kernel runs once per block: the methods cost one fused forward (plus GAE's backward)."""
    bb = backbone(name)
    if bb.family == "timm":
        assert all(block.attn.fused_attn for block in bb.blocks)
    checks = fused_checks(bb)
    calls = SdpaCalls(monkeypatch)
    try:
        explain(bb, images, method)
    finally:
        for h in checks:
            h.remove()
    # torchvision's eval fast path (no gradients) runs torch's native fused MHA op instead of F.sdpa
    expected = 0 if bb.family == "torchvision" and method != "gae" else len(bb.blocks)
    assert calls.count == expected
    with explicit(bb):
        calls.count = 0
        explain(bb, images, method)
        assert calls.count == 0  # the explicit path, for contrast


def test_rows_read_by_the_methods(images, monkeypatch):
    """Raw attention reads one row of the last block; rollout and GAE read the readout rows of the last block
    and full matrices of the others; nothing reads blocks before rollout's start_layer."""
    calls = []
    for name in ("probabilities", "gradient"):
        original = getattr(RecomputedAttention, name)

        def spy(self, block, rows=None, original=original, name=name):
            calls.append((name, block, None if rows is None else list(range(99))[rows]))
            return original(self, block, rows)

        monkeypatch.setattr(RecomputedAttention, name, spy)
    bb = backbone("timm-deit-distilled")
    explain(bb, images, "attention")
    assert calls == [("probabilities", -1, [0])]
    calls.clear()
    explain(bb, images, "rollout", start_layer=1)
    assert calls == [("probabilities", 1, [0, 1])]
    bb = backbone("timm-qk-norm-layer-scale")
    calls.clear()
    explain(bb, images, "gae")
    assert calls == [
        ("gradient", 2, [0]),
        ("probabilities", 2, [0]),
        ("gradient", 1, None),
        ("probabilities", 1, None),
        ("gradient", 0, None),
        ("probabilities", 0, None),
    ]
    calls.clear()
    explain(adapt(sharpen(MODELS["timm-vit-avg-pool"]())), images, "rollout")
    assert [rows for *_, rows in calls] == [None, None]  # a mean readout reads every row


@pytest.mark.parametrize("method", ["attention", "rollout", "gae"])
@pytest.mark.parametrize("name", ["timm-vit", "timm-qk-norm-layer-scale", "hf-deit-distilled", "torchvision-vit"])
def test_bf16_autocast_on_cpu_follows_the_explicit_path_and_float32(name, method, images):
    bb = backbone(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = explain(bb, images, method).maps
        with explicit(bb):
            reference = explain(bb, images, method).maps
    full = explain(bb, images, method).maps
    top = full.abs().amax((1, 2), keepdim=True)
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    torch.testing.assert_close(fused / top, reference / top, atol=0.05, rtol=0)
    torch.testing.assert_close(fused / top, full / top, atol=0.05, rtol=0)


@pytest.mark.parametrize("name", ["timm-vit", "timm-qk-norm-layer-scale", "hf-deit-distilled", "torchvision-vit"])
def test_bf16_autocast_on_cpu_gradients_follow_the_explicit_path(name, images):
    """GAE reads the explicit path under CPU autocast (the fused bf16 backward is slow there); the fused
    probe's ∂score/∂A under bf16 still follows the explicit path's, block by block."""
    bb = backbone(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, grads = explicit_probabilities_and_gradients(bb, images, torch.float32)
        with torch.enable_grad(), bb.probe_attention(gradients=True) as probe:
            trace = bb.run(images, grad_from=0)
            probe.backward(Target().fixed(trace.logits).score(trace.logits).sum())
        for b, (a, g) in enumerate(zip(probs, grads, strict=True)):
            assert probe.gradient(b).dtype == probe.probabilities(b).dtype == torch.float32
            torch.testing.assert_close(probe.probabilities(b), a.float(), atol=0.02, rtol=0)
            top = g.abs().max()
            torch.testing.assert_close(probe.gradient(b) / top, g.float() / top, atol=0.03, rtol=0)


def test_fallback_for_families_without_hooks(images):
    """A family that does not override ``probe_attention`` (B-cos: its attention is always explicit) reads the
    explicit path's matrices through the same interface."""
    bb = backbone("vitlens-bcos-vit")
    with bb.probe_attention([-1], gradients=True) as probe, torch.enable_grad():
        trace = bb.run(images)
        probe.backward(trace.logits[:, 0].sum())
    assert isinstance(probe, RecordedAttention) and probe.blocks == [1]
    reference = bb.run(images, attention=True).attentions[-1]
    torch.testing.assert_close(probe.probabilities(-1), reference)
    assert probe.gradient(1, [2]).shape == (2, 4, 1, 16)
    with pytest.raises(KeyError, match="not probed"):
        probe.probabilities(0)


def test_probe_errors_and_cleanup(images):
    bb = backbone("timm-vit")
    with pytest.raises(ValueError, match="out of range"), bb.probe_attention([2]):
        pass
    with pytest.raises(RuntimeError, match="boom"), bb.probe_attention():
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in bb.modules())
    with bb.probe_attention([0]) as probe:
        pass
    with pytest.raises(RuntimeError, match="recorded no q"):
        probe.probabilities(0)
    with bb.probe_attention([0]) as probe:
        trace = bb.run(images)
    with pytest.raises(RuntimeError, match="gradients=True"):
        probe.backward(trace.logits.sum())
    with pytest.raises(KeyError, match="not probed"):
        probe.probabilities(1)
    assert probe.probabilities(0).shape == (2, 4, 17, 17)
