"""B-cos ViTs: the official implementation (PyPI ``bcos``) as the reference, exactness, units, training, CLI."""

from __future__ import annotations

import importlib.util
import math
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import committed, tiny_timm
from vitlens import VitlensError, explain, load_model
from vitlens.backbones import adapt, upsample
from vitlens.backbones.bcos_vit import BcosViT
from vitlens.bcos import (
    ARCHS,
    BcosConv2d,
    BcosLayerNorm,
    BcosLayerNorm2d,
    BcosLinear,
    BcosSimpleViT,
    Detachable,
    explanation_mode,
    sincos_2d,
)
from vitlens.bcos.official import URLS, convert_state_dict
from vitlens.cli import main
from vitlens.data import collate, open_dataset
from vitlens.explainers import get_explainer
from vitlens.explainers.bcos import colour_picture
from vitlens.models.checkpoint import load_checkpoint, read_config, save_checkpoint
from vitlens.training.bcos import adaptive_clip_grad_, bcos_loss

bcos = pytest.importorskip("bcos")
pytest.importorskip("einops")

TINY = dict(img_size=32, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64)
STEM = [8, 16, 32]  # stride 8: a 4×4 grid at 32 px, like patch 8
VARIANTS = {"patch": {}, "stem": {"conv_stem": STEM}, "b1.5-maxout": {"b": 1.5, "max_out": 2}}


def ours(variant: str = "patch", dtype=torch.float32) -> BcosSimpleViT:
    kw = {**TINY, **VARIANTS[variant]}
    kw["patch_size"] = 1 if "conv_stem" in kw else 8
    torch.manual_seed(0)
    model = BcosSimpleViT(**kw).to(dtype).eval()
    with torch.no_grad():  # random norm scales too, so no parameter is left at its initial value
        for m in model.modules():
            if isinstance(m, BcosLayerNorm | BcosLayerNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return model


def official(variant: str = "patch") -> torch.nn.Module:
    """The same tiny architecture built from the official B-cos-v2 classes (as its vit_final config does)."""
    from bcos.models.vit import SimpleViT
    from bcos.modules import BcosConv2d as OBcosConv2d
    from bcos.modules import BcosLinear as OBcosLinear
    from bcos.modules import BcosSequential, DetachableGNLayerNorm2d, LogitLayer, norms
    from torch import nn

    kw = {**TINY, **VARIANTS[variant]}
    units = {"b": kw.pop("b", 2), "max_out": kw.pop("max_out", 1)}
    stem = kw.pop("conv_stem", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SimpleViT(
            image_size=kw.pop("img_size"), patch_size=1 if stem else 8, conv_stem=stem, channels=6, **kw,
            linear_layer=partial(OBcosLinear, **units), conv2d_layer=partial(OBcosConv2d, **units),
            norm_layer=norms.NoBias(norms.DetachableLayerNorm), norm2d_layer=norms.NoBias(DetachableGNLayerNorm2d),
            act_layer=nn.Identity,
        )  # fmt: skip
    return BcosSequential(model, LogitLayer(logit_bias=math.log(1 / (TINY["num_classes"] - 1)))).eval()


def official_pair(variant: str):
    ref = official(variant)
    model = ours(variant)
    ref.load_state_dict({"0." + k: v for k, v in model.state_dict().items()}, strict=True)
    return ref, model


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(3, 3, 32, 32)


# --- the official implementation as reference -------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_state_dict_gives_identical_logits(variant, images, tmp_path):
    ref, _ = official_pair(variant)
    torch.save(ref.state_dict(), tmp_path / "official.pth")  # keys "0.…", as the official code saves them
    kw = {**TINY, **VARIANTS[variant], "patch_size": 1 if variant == "stem" else 8}
    arch = "bcos_vit_fashion" if variant == "stem" else "bcos_vit_fashion_patch"
    model = load_model(f"bcos:{arch}", weights=tmp_path / "official.pth", **kw)
    assert isinstance(model, BcosViT) and not model.training
    with torch.no_grad():
        expected = ref(torch.cat([images, 1 - images], 1))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
        torch.testing.assert_close(model.model(images), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["patch", "stem"])
def test_same_contributions_as_official_explain(variant):
    ref, model = official_pair(variant)
    torch.manual_seed(2)
    image = torch.rand(1, 3, 32, 32)
    for target in (None, 3):
        x6 = torch.cat([image, 1 - image], 1).requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = ref.explain(x6, idx=target, smooth=3)
        explanation = explain(model, image, "bcos", target=target, smooth=3)
        got = explanation.extras
        assert explanation.targets.item() == want["explained_class_idx"]
        torch.testing.assert_close(got["weights"], want["dynamic_linear_weights"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["contributions"], want["contribution_map"].detach(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["colour"][0].numpy(), want["explanation"], rtol=1e-5, atol=1e-6)
    assert not any(m.explaining for m in model.modules() if isinstance(m, Detachable))


def test_official_architectures_have_the_official_state_dict_layout():
    from bcos.models import pretrained

    for name, arch in ARCHS.items():
        if not arch.official:
            continue
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = getattr(pretrained, name)(pretrained=False)
            model = BcosSimpleViT(**arch.kwargs, num_classes=1000)
        want = {k: tuple(v.shape) for k, v in convert_state_dict(ref.state_dict()).items()}
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want, name
        assert model.logit_bias == ref[1].logit_bias


def test_release_urls_are_the_official_ones():
    from bcos.models.pretrained import URLS as OFFICIAL

    assert {k.removeprefix("bcos_"): v for k, v in OFFICIAL["vit_final"].items() if k.startswith("bcos_")} == URLS


def test_pretrained_downloads_the_official_release(monkeypatch, images):
    ref = official("stem")
    calls = []

    def fake_download(url, **kw):
        calls.append((url, kw))
        return ref.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    kw = {**TINY, "conv_stem": STEM, "patch_size": 1}
    model = load_model("bcos:vitc_ti_patch1_14", **kw)  # official architectures are pretrained by default
    assert calls[0][0] == URLS["vitc_ti_patch1_14"] and calls[0][1]["check_hash"]
    with torch.no_grad():
        torch.testing.assert_close(model(images), ref(torch.cat([images, 1 - images], 1)), rtol=0, atol=0)
    load_model("bcos:vitc_ti_patch1_14?pretrained=0", **kw)
    assert len(calls) == 1


def test_agc_and_loss_match_the_official_code():
    path = Path(bcos.__file__).parent / "training" / "agc.py"  # the package's training/__init__ needs lightning
    spec = importlib.util.spec_from_file_location("bcos_agc", path)
    agc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agc)
    from bcos.modules.losses import UniformOffLabelsBCEWithLogitsLoss

    torch.manual_seed(0)
    params = [torch.randn(s) * 0.1 for s in [(7, 5), (4, 3, 3, 3), (6,), (1, 9)]]
    params[2][:] = 1e-5  # below eps
    grads = [torch.randn_like(p) * torch.tensor([0.001, 1.0])[torch.randint(2, ())] for p in params]
    mine = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    for a, b, g in zip(mine, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    adaptive_clip_grad_(mine, 0.01, 1e-3)
    agc.adaptive_clip_grad_(theirs, 0.01, 1e-3)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert not torch.equal(mine[0].grad, grads[0]) or not torch.equal(mine[1].grad, grads[1])

    logits, labels = torch.randn(6, 10), torch.randint(10, (6,))
    torch.testing.assert_close(bcos_loss(logits, labels), UniformOffLabelsBCEWithLogitsLoss()(logits, labels))


# --- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_contributions_plus_constant_terms_reproduce_every_logit(variant):
    """In explanation mode logit_c = Σ x ⊙ W(x)_c + (position-embedding path) + logit bias, for every c."""
    model = ours(variant, torch.float64)
    bb = adapt(model).double()
    torch.manual_seed(3)
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with explanation_mode(model):
        x = model.encode(images).requires_grad_(True)
        e = model.to_patch_embedding(x)
        pe = sincos_2d(e.shape[1], e.shape[2], e.shape[3], dtype=torch.float64).expand(2, -1, -1)
        pe = pe.clone().requires_grad_(True)  # one leaf per image
        logits = model.classify(model.transformer(e.flatten(1, 2) + pe).mean(1))
        torch.testing.assert_close(logits, model(images), rtol=1e-12, atol=1e-12)
        for c in range(TINY["num_classes"]):
            gx, gpe = torch.autograd.grad(logits[:, c].sum(), (x, pe), retain_graph=True)
            contributions = (x * gx).sum(1)
            rebuilt = contributions.sum((1, 2)) + (pe * gpe).sum((1, 2)) + model.logit_bias
            torch.testing.assert_close(rebuilt, logits[:, c].detach(), rtol=1e-10, atol=1e-10)
            got = explain(bb, images, "bcos", target=c)
            torch.testing.assert_close(got.extras["contributions"], contributions.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.maps.double().sum((1, 2)), contributions.detach().sum((1, 2)))
    assert (pe * gpe).abs().sum() > 1e-3  # the constant path is real, not zero


def test_gradients_outside_explanation_mode_are_the_normal_ones():
    model = ours("stem", torch.float64)
    torch.manual_seed(4)
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    (normal,) = torch.autograd.grad(model(images)[0, 1], images)
    with torch.no_grad():  # central differences along random directions
        for v in torch.randn(3, *images.shape, dtype=torch.float64):
            slope = (model(images + 1e-6 * v)[0, 1] - model(images - 1e-6 * v)[0, 1]) / 2e-6
            torch.testing.assert_close(slope, (normal * v).sum(), rtol=1e-6, atol=1e-8)
    with explanation_mode(model):
        (dynamic,) = torch.autograd.grad(model(images)[0, 1], images)
    assert not torch.allclose(normal, dynamic)  # explanation mode does change the gradient…
    (again,) = torch.autograd.grad(model(images)[0, 1], images)
    torch.testing.assert_close(again, normal, rtol=0, atol=0)  # …and only inside the context
    with pytest.raises(RuntimeError), explanation_mode(model):
        raise RuntimeError
    assert not any(m.explaining for m in model.modules() if isinstance(m, Detachable))


# --- the B-cos unit -----------------------------------------------------------------------------


def test_b1_is_a_linear_layer_with_normalised_weights():
    torch.manual_seed(5)
    lin = BcosLinear(12, 7, b=1)
    x = torch.randn(4, 9, 12)
    w = lin.linear.weight
    torch.testing.assert_close(lin(x), x @ (w / w.norm(dim=1, keepdim=True)).T)
    conv = BcosConv2d(6, 5, 3, stride=2, padding=1, b=1)
    y = torch.randn(2, 6, 9, 9)
    cw = conv.linear.weight
    torch.testing.assert_close(conv(y), F.conv2d(y, cw / cw.flatten(1).norm(dim=1)[:, None, None, None], None, 2, 1))


@pytest.mark.parametrize("b", [1, 1.5, 2, 3])
@pytest.mark.parametrize("max_out", [1, 3])
def test_unit_output_never_exceeds_the_input_norm(b, max_out):
    torch.manual_seed(6)
    lin = BcosLinear(16, 8, b=b, max_out=max_out)
    x = torch.randn(64, 16) * torch.logspace(-3, 3, 64)[:, None]
    x[0] = lin.linear.weight[0].detach() * 5  # perfectly aligned: |cos| = 1, |out| = ‖x‖
    out = lin(x)
    bound = x.norm(dim=1, keepdim=True)
    assert (out.abs() <= bound * (1 + 1e-5)).all()
    if max_out == 1:
        torch.testing.assert_close(out[0, 0], bound[0, 0], rtol=1e-5, atol=0)
    conv = BcosConv2d(4, 6, 3, padding=1, b=b, max_out=max_out)
    y = torch.randn(2, 4, 7, 7)
    patch_norms = F.unfold(y, 3, padding=1).norm(dim=1).reshape(2, 1, 7, 7)
    assert (conv(y).abs() <= patch_norms * (1 + 1e-5) + 1e-6).all()
    if b == 2 and max_out == 1:  # B-cos with B=2: (ŵᵀx)·|ŵᵀx| / ‖x‖
        w = lin.linear.weight / lin.linear.weight.norm(dim=1, keepdim=True)
        lin_out = x @ w.T
        torch.testing.assert_close(out, lin_out * lin_out.abs() / bound, rtol=1e-5, atol=1e-7)


# --- backbone, explainer, checkpoint ------------------------------------------------------------


def test_backbone_view(images):
    bb = adapt(ours("stem"))
    assert bb.family == "bcos" and bb.prefix_kinds == () and bb.pooling == "avg" and bb.class_token_index is None
    assert bb.describe()["grid"] == [4, 4] and bb.patch_size == (8, 8)
    assert bb.preprocessing.mean == (0.0, 0.0, 0.0) and bb.preprocessing.std == (1.0, 1.0, 1.0)
    torch.testing.assert_close(bb.readout(16), torch.full((16,), 1 / 16))
    x = images.clone().requires_grad_(True)
    trace = bb.run(x, attention=True)
    torch.testing.assert_close(trace.logits, bb.model(images), rtol=0, atol=0)
    assert len(trace.attentions) == 2 and trace.attentions[0].shape == (3, 4, 16, 16)
    torch.testing.assert_close(trace.attentions[0].sum(-1), torch.ones(3, 4, 16))
    assert trace.attentions[-1].requires_grad
    assert bb.token_logits(trace.tokens).shape == (3, 16, 5)
    torch.testing.assert_close(bb.token_logits(trace.tokens.mean(1, keepdim=True))[:, 0], trace.logits)
    assert bb.attention_norm(1) is bb.model.transformer[1].attn.norm
    assert all(not m._forward_hooks for m in bb.modules())


def test_bcos_explainer_contract(images):
    model = ours("stem")
    bb = adapt(model)
    bb.model.linear_head.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in bb.named_parameters()}
    state = {k: v.clone() for k, v in bb.state_dict().items()}
    bb.train()
    maps = explain(bb, images, method="bcos").maps
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
    with torch.no_grad():
        pred = bb(images).argmax(1)
    torch.testing.assert_close(maps, explain(bb, images, method="bcos", target=pred).maps)
    single = explain(bb, images[1:2], method="bcos", target=pred[1:2]).maps
    torch.testing.assert_close(single[0], maps[1], rtol=1e-5, atol=1e-6)
    assert bb.training and {n: p.requires_grad for n, p in bb.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in bb.state_dict().items())
    assert not any(m.explaining for m in bb.modules() if isinstance(m, Detachable))
    assert all(not m._forward_hooks for m in bb.modules())
    both = get_explainer("bcos", bb)(images)
    torch.testing.assert_close(both.maps, maps)
    with torch.no_grad():
        torch.testing.assert_close(both.logits, bb(images), rtol=1e-5, atol=1e-6)
    full = explain(bb, images, method="bcos", target=2)
    weights, colour = full.extras["weights"], full.extras["colour"]
    assert weights.shape == (3, 6, 32, 32) and colour.shape == (3, 32, 32, 4)
    assert colour.min() >= 0 and colour.max() <= 1 and (full.targets == 2).all()
    assert colour_picture(colour[0]).mode == "RGBA"
    with pytest.raises(VitlensError, match="B-cos"):
        explain(tiny_timm(img_size=32), images, method="bcos")


@pytest.mark.parametrize("method", ["rollout", "gae", "gradcam", "inputxgrad", "ig", "smoothgrad", "occlusion", "rise"])
def test_baseline_explainers_run_on_the_bcos_vit(method, images):
    options = {"rise": {"n_masks": 64}, "ig": {"steps": 4}, "smoothgrad": {"n_samples": 4}}.get(method, {})
    maps = explain(adapt(ours("stem")), images, method=method, **options).maps
    assert maps.shape == (3, 4, 4) and torch.isfinite(maps).all()


def test_checkpoint_round_trip_and_uri_errors(images, tmp_path):
    bb = load_model("bcos:bcos_vit_fashion?pretrained=0", **{**TINY, "conv_stem": STEM})
    assert bb.spec == {"source": "bcos", "name": "bcos_vit_fashion", "kwargs": {**TINY, "conv_stem": STEM}}
    path = save_checkpoint(tmp_path / "ck", bb, kind="bcos")
    again = load_checkpoint(path, kind="bcos")
    assert isinstance(again, BcosViT) and again.preprocessing == bb.preprocessing
    with torch.no_grad():
        torch.testing.assert_close(again(images), bb(images), rtol=0, atol=0)
    with pytest.raises(VitlensError, match="unknown B-cos architecture"):
        load_model("bcos:resnet50")
    with pytest.raises(VitlensError, match="not found"):
        load_model("bcos:bcos_vit_fashion", weights=tmp_path / "missing.pth")
    torch.save({"0.linear_head.norm.weight": torch.ones(3)}, tmp_path / "bad.pth")
    with pytest.raises(VitlensError, match="do not fit"):
        load_model("bcos:bcos_vit_fashion", weights=tmp_path / "bad.pth")
    with pytest.raises(VitlensError, match="only apply to a model URI"):
        load_model(path, weights="x.pth")


# --- training and CLI ---------------------------------------------------------------------------


def test_train_and_explain_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "bcos", "--data", "fashion-canvas:train:n=48", "--out", str(out), "--max-steps", "3",
            "--batch-size", "16", "--warmup-steps", "1", "--eval-data", "fashion-canvas:test:n=16"]  # fmt: skip
    assert main(args) == 0
    config = read_config(out)
    assert config["kind"] == "bcos" and config["model"]["name"] == "bcos_vit_fashion"
    assert config["training"]["config"]["weight_decay"] == 0.0 and config["training"]["config"]["grad_clip"] is None
    assert config["training"]["test_n"] == 16 and config["preprocessing"]["std"] == [1.0, 1.0, 1.0]
    bb = load_model(out)
    assert isinstance(bb, BcosViT) and bb.classes == list(open_dataset("fashion-canvas:test:n=1").classes)

    sample = open_dataset("fashion-canvas:test:n=1")[0]
    img = tmp_path / "item.png"
    Image.fromarray((sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(img)
    capsys.readouterr()
    assert main(["explain", str(img), "--model", str(out), "--method", "bcos", "--out", str(tmp_path / "x")]) == 0
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "item.bcos-colour.png",
        "item.bcos.npy",
        "item.bcos.png",
    ]
    colour = Image.open(tmp_path / "x" / "item.bcos-colour.png")
    assert colour.mode == "RGBA" and colour.size == (256, 256)
    assert np.load(tmp_path / "x" / "item.bcos.npy").shape == (8, 8)


# --- the committed checkpoint -------------------------------------------------------------------


def _energy_in_box(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy pointing game (Wang et al. 2020): share of the positive map energy inside the object's box."""
    pixels = upsample(maps, tuple(masks.shape[-2:])).clamp(min=0)
    return (pixels * masks).sum((1, 2)) / pixels.sum((1, 2)).clamp(min=1e-12)


def test_committed_bcos_maps_localise_better_than_rollout():
    bb = load_model(committed("fashion-bcos-vit"))
    batch = collate([open_dataset("fashion-canvas:test:n=200")[i] for i in range(200)])
    boxes = torch.zeros_like(batch["mask"])
    for i, item_boxes in enumerate(batch["boxes"]):
        for x0, y0, x1, y1 in item_boxes.long().tolist():
            boxes[i, y0 : y1 + 1, x0 : x1 + 1] = True
    bcos_energy = _energy_in_box(explain(bb, batch["image"], method="bcos").maps, boxes).mean()
    rollout_energy = _energy_in_box(explain(bb, batch["image"], method="rollout").maps, boxes).mean()
    assert bcos_energy > rollout_energy
