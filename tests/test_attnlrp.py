"""AttnLRP against LXT itself (the authors' library) on torchvision's ViT, and its invariants.

LXT computes AttnLRP by monkey-patching torchvision's modules (``lxt.efficient.monkey_patch``): LayerNorm
with its standard deviation detached, GELU with the identity rule and, by default for torchvision's ViT,
``nn.MultiheadAttention`` with q and k detached (CP-LRP inside the attention). For the paper's attention
rules the test patches ``nn.MultiheadAttention.forward`` with LXT's own attention wrapper (q and k
gradients divided by 4, v by 2), as LXT does for the Hugging Face models. Relevance is read as LXT's
examples read it, input × gradient, at the output of the patch embedding (per patch, summed over channels).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
from timm.layers import RmsNorm
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from test_explainers_chefer import sharpen
from vitlens import VitlensError, explain
from vitlens.backbones import adapt
from vitlens.backbones.parts import BlockParts
from vitlens.explainers.attnlrp import lrp_block, norm_rules
from zoo import ZOO


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    return sharpen(model)


@contextlib.contextmanager
def restored(*classes: type):
    """LXT patches the classes themselves (``torch.nn.LayerNorm``, …): put them back afterwards."""
    saved = [(c, {k: c.__dict__[k] for k in ("forward", "original_forward") if k in c.__dict__}) for c in classes]
    try:
        yield
    finally:
        for c, attrs in saved:
            for k in ("forward", "original_forward"):
                if k in c.__dict__ and k not in attrs:
                    delattr(c, k)
            for k, v in attrs.items():
                setattr(c, k, v)


def lxt_module(name: str) -> types.ModuleType:
    """``lxt.efficient.<name>``. LXT 2.1's ``lxt.efficient`` and ``lxt.efficient.models`` packages import its
    Hugging Face model patches, which need transformers < 5; where that import fails, the two packages are
    entered as bare namespaces so that the modules read here (rules, patches, the torchvision map) load."""
    lxt = pytest.importorskip("lxt")
    try:
        importlib.import_module("lxt.efficient")
    except ImportError:
        for package in ("lxt.efficient", "lxt.efficient.models"):
            bare = types.ModuleType(package)
            bare.__path__ = [str(Path(lxt.__file__).parent.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = bare
    return importlib.import_module(f"lxt.efficient.{name}")


def lxt_relevance(model: nn.Module, inputs: Tensor, target: Tensor, attention: str) -> Tensor:
    """LXT's relevance of each patch embedding [B, gh, gw] for the logits ``target`` [B] (normalised inputs)."""
    patches = lxt_module("patches")
    if attention == "cp":
        patch_map = lxt_module("models.vit_torch").cp_LRP  # LXT's default map for torchvision's ViT
    else:
        patch_map = {
            nn.GELU: partial(patches.patch_method, patches.non_linear_forward, keep_original=True),
            nn.LayerNorm: partial(patches.patch_method, patches.layer_norm_forward),
            nn.MultiheadAttention: partial(
                patches.patch_method, patches.wrap_attention_forward(nn.MultiheadAttention.forward)
            ),
        }
    with restored(*patch_map), torch.enable_grad():
        for cls, patch in patch_map.items():  # lxt.efficient.monkey_patch(vision_transformer, patch_map)
            assert patch(cls)
        found = {}
        hook = model.conv_proj.register_forward_hook(lambda _m, _i, out: found.setdefault("e", out))
        try:
            logits = model(inputs.clone().requires_grad_(True))
            e = found["e"]
            e.retain_grad()
            logits.gather(1, target[:, None]).sum().backward()
        finally:
            hook.remove()
    return (e * e.grad).sum(1).detach()


@pytest.fixture
def images() -> Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attention", ["attnlrp", "cp"])
def test_matches_lxt_on_torchvision_vit(attention, images):
    pytest.importorskip("lxt")
    model = torchvision_vit()
    bb = adapt(model)
    target = torch.tensor([0, 3, 1])
    ours = explain(model, images, "attnlrp", target=target.tolist(), attention=attention).maps
    theirs = lxt_relevance(model, bb.normalize(images), target, attention)
    assert theirs.flatten(1).std(1).min() > 0.05 * theirs.abs().max()  # an informative map, so a mismatch shows
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max(), rtol=1e-4)
    if attention == "attnlrp":  # the attention rules make a difference here
        cp = explain(model, images, "attnlrp", target=target.tolist(), attention="cp").maps
        assert (cp - ours).abs().max() > 0.05 * ours.abs().max()


def without_biases(model: nn.Module) -> nn.Module:
    """Every bias, position embedding and prefix token set to zero: the modified network becomes linear."""
    constants = ("pos_embed", "position_embeddings", "class_token", "cls_token")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(k in name for k in constants):
                p.zero_()
    return model


class SoftmaxShares(TorchFunctionMode):
    """Records, per image, what the softmax rule does not pass on: Σ R_A − Σ R_z over every softmax in the
    graph, with R = tensor × gradient halved (the uniform rule's half of the attention product, which the
    modified gradients apply at q, k and v)."""

    def __init__(self):
        super().__init__()
        self.lost: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (Tensor.softmax, torch.softmax) and args[0].requires_grad:
            self.watch(args[0], -0.5)
            self.watch(out, 0.5)
        return out

    def watch(self, t: Tensor, sign: float) -> None:
        value = t.detach()
        t.register_hook(lambda g: self.lost.append(sign * (value * g).sum((1, 2, 3))))


@pytest.mark.parametrize("kind", ["torchvision", "timm-vit", "hf-vit", "timm-vit-avg-pool"])
def test_relevance_sums_to_the_target_logit_without_biases(kind, images):
    """What AttnLRP conserves, on a model whose biases, position embeddings and class token are zero (so that
    no bias absorbs relevance): the patch relevances plus what the softmax rule gives to the bias of its
    Taylor expansion add up to the target logit; with the attention held constant (``cp``) the patch
    relevances alone do (LXT's identity rules: exact up to their 1e-10)."""
    model = without_biases(torchvision_vit() if kind == "torchvision" else sharpen(ZOO[kind]()))
    e = explain(model, images, "attnlrp", attention="cp")
    target_logit = e.logits.gather(1, e.targets[:, None])[:, 0]
    torch.testing.assert_close(e.maps.sum((1, 2)), target_logit, atol=1e-4, rtol=1e-4)
    shares = SoftmaxShares()
    with shares:
        full = explain(model, images, "attnlrp").maps.sum((1, 2))
    assert len(shares.lost) == 2 * len(adapt(model).blocks)  # every block's softmax, both sides
    lost = sum(shares.lost)
    assert lost.abs().min() > 1e-2 * target_logit.abs().max()  # the softmax rule is not conservative here
    torch.testing.assert_close(full + lost, target_logit, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["timm-vit", "timm-deit-distilled", "timm-vit-registers", "hf-deit-distilled"])
def test_batch_equals_single_images(kind, images):
    model = sharpen(ZOO[kind]())
    maps = explain(model, images, "attnlrp", target=[0, 2, 4]).maps
    single = torch.cat([explain(model, images[i : i + 1], "attnlrp", target=t).maps for i, t in enumerate([0, 2, 4])])
    assert maps.flatten(1).std(1).min() > 0
    torch.testing.assert_close(single, maps, atol=1e-5 * maps.abs().max(), rtol=1e-4)


def test_one_hot_score_function_equals_the_class_target(images):
    model = sharpen(ZOO["timm-vit"]())
    by_class = explain(model, images, "attnlrp", target=3).maps
    by_function = explain(model, images, "attnlrp", target=lambda logits: logits[:, 3]).maps
    torch.testing.assert_close(by_function, by_class)
    doubled = explain(model, images, "attnlrp", target=lambda logits: 2 * logits[:, 3] + 1).maps
    torch.testing.assert_close(doubled, 2 * by_class)  # the relevance is linear in the start gradient


def test_model_is_restored_and_bad_options_refused(images):
    model = sharpen(ZOO["timm-vit"]())
    explain(model, images, "attnlrp")
    assert not any("forward" in m.__dict__ for m in model.modules())  # the norm rules are removed
    with pytest.raises(VitlensError, match="attention must be"):
        explain(model, images, "attnlrp", attention="softmax")
    with pytest.raises(VitlensError, match="attnlrp.*LRP rules"):
        explain(ZOO["vitlens-bcos-vit"](), images, "attnlrp")


def newer_block(dim: int = 16, heads: int = 2, seed: int = 0) -> BlockParts:
    """A block with every optional part: attention bias, rotary embedding, gated MLP and an MLP norm; no biases."""
    g = torch.Generator().manual_seed(seed)

    def w(o, i):
        return torch.randn(o, i, generator=g) / i**0.5, None

    d = dim // heads
    angles = torch.rand(5, d // 2, generator=g) * 3

    def rope(x, grid):  # rotate pairs of channels by a per-position angle (prefix token: position 0)
        cos, sin = angles.cos()[: x.shape[-2]], angles.sin()[: x.shape[-2]]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)

    bias = torch.randn(heads, 5, 5, generator=g)
    norms = [nn.LayerNorm(n, bias=False) for n in (dim, dim, 2 * dim)]
    q_norm = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else RmsNorm(d)  # torch's from 2.4, else timm's
    return BlockParts(
        norm1=norms[0], qkv=w(3 * dim, dim), heads=heads, scale=d**-0.5, q_norm=q_norm, k_norm=nn.Identity(),
        out_norm=nn.Identity(), proj=w(dim, dim), norm2=norms[1], fc1=w(2 * dim, dim), act=nn.SiLU(),
        fc2=w(dim, 2 * dim), attn_bias=lambda t: bias[:, :t, :t], rope=rope, gate=w(2 * dim, dim), mlp_norm=norms[2],
    )  # fmt: skip


def test_newer_block_parts_forward_and_conservation():
    """attn_bias, rope, gate and mlp_norm: the forward values are the block's; with constant attention the
    block conserves relevance exactly (rope linear, the gated product halved between its two factors)."""
    p = newer_block()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    module = nn.ModuleList([p.norm1, p.q_norm, p.norm2, p.mlp_norm])
    with torch.no_grad():  # the block written out plainly
        q, k, v = (p.norm1(x) @ p.qkv[0].T).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k = p.rope(p.q_norm(q), (2, 2)), p.rope(k, (2, 2))
        a = (q @ k.transpose(-2, -1) * p.scale + p.attn_bias(5)).softmax(-1)
        mid = x + (a @ v).transpose(1, 2).reshape(2, 5, 16) @ p.proj[0].T
        h = p.norm2(mid)
        expected = mid + p.mlp_norm(p.act(h @ p.fc1[0].T) * (h @ p.gate[0].T)) @ p.fc2[0].T
    seed = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    for cp in (True, False):
        with norm_rules(module):
            out = lrp_block(p, x, (2, 2), cp=cp)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        (grad,) = torch.autograd.grad(out, x, seed)
        r_in, r_out = (x * grad).sum(), (out * seed).sum()
        if cp:
            torch.testing.assert_close(r_in, r_out, atol=1e-4, rtol=1e-4)
        else:
            assert not torch.allclose(r_in, r_out, atol=1e-2)  # the softmax rule's bias share
    assert not any("forward" in m.__dict__ for m in module.modules())


# --- the same newer parts through Chefer's transformer attribution (explicit LRP rules) --------------


def test_chefer_rules_on_newer_block_parts_conserve_relevance():
    """Chefer's rules on a block with an attention bias, rotary embedding, gated MLP and MLP norm: the block's
    forward values, and the relevance of its output arrives whole at its input (the reference's rules are
    conservative; the extensions — constant bias, z-rule through the rotation, halved gated product — too)."""
    from vitlens.explainers.chefer import _activations, _lrp_block

    p = newer_block()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    with norm_rules(nn.ModuleList([p.norm1])), torch.no_grad():
        expected = lrp_block(p, x, (2, 2))  # AttnLRP's forward: the plain block's values (checked above)
    with torch.no_grad():
        c = _activations(p, x, (2, 2))
        torch.testing.assert_close(c.out, expected, atol=1e-5, rtol=1e-5)
        r_out = torch.rand(2, 5, 16, generator=torch.Generator().manual_seed(3))
        r_a, r_in = _lrp_block(p, c, r_out, to_input=True)
    assert r_a.shape == (2, 2, 5, 5) and r_a.abs().sum() > 0
    torch.testing.assert_close(r_in.sum((1, 2)), r_out.sum((1, 2)), atol=1e-4, rtol=1e-4)
