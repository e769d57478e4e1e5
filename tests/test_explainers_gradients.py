"""Grad-CAM, Input×Gradient, Integrated Gradients and SmoothGrad against captum and pytorch-grad-cam.

Reference runs use the backbone itself as the forward function (images in [0, 1], logits out), so the
references see exactly the model vitlens explains. Per-pixel references are pooled to the patch grid
here with ``avg_pool2d × patch area``, independently of :func:`pixels_to_grid`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from conftest import make_timm
from test_backbones_hf_tv import make as make_hf_tv
from vitlens import VitlensError, explain
from vitlens.backbones import Backbone, adapt, gaussian_blur
from vitlens.explainers.gradients import pixels_to_grid

PATCH = 8
BACKBONES = ["timm:vit", "timm:deit-distilled", "timm:registers", "timm:avg-pool-no-cls"]
BACKBONES += ["hf:vit", "hf:deit", "hf:deit_distilled", "torchvision"]
METHODS = {
    "gradcam": {},
    "inputxgrad": {},
    "ig": {"steps": 4, "internal_batch_size": 5},
    "smoothgrad": {"n_samples": 4, "internal_batch_size": 5},
}


def backbone(name: str) -> Backbone:
    family, _, kind = name.partition(":")
    if family == "timm":
        return adapt(make_timm(kind))
    return make_hf_tv(kind or "torchvision")[1]


def pool(attr: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] per-pixel attributions → channel sum → patch sums [B, gh, gw]."""
    return F.avg_pool2d(attr.sum(1, keepdim=True), PATCH)[:, 0] * PATCH**2


def snapshot(bb: Backbone) -> dict:
    """Everything an explainer must leave as it found it."""
    return {
        "state": {k: v.clone() for k, v in bb.state_dict().items()},
        "modes": [m.training for m in bb.modules()],
        "requires_grad": [p.requires_grad for p in bb.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in bb.modules()],
        "patched_forward": ["forward" in vars(m) for m in bb.modules()],
        "fused_attn": [getattr(m, "fused_attn", None) for m in bb.modules()],
        "attn_implementation": getattr(getattr(bb.model, "config", None), "_attn_implementation", None),
    }


def assert_unchanged(bb: Backbone, before: dict) -> None:
    after = snapshot(bb)
    assert after.keys() == before.keys()
    for key in before:
        if key == "state":
            assert all(torch.equal(before[key][k], v) for k, v in after[key].items())
        else:
            assert after[key] == before[key], key
    assert all(p.grad is None for p in bb.parameters()), "an explainer computed parameter gradients"


def check_contract(name: str, method: str, options: dict, images: torch.Tensor) -> None:
    """Shape, dtype, finiteness, a non-constant map and the model unchanged (weights, modes, flags, hooks)."""
    bb = backbone(name)
    bb.train()
    next(bb.parameters()).requires_grad_(False)  # a mixed set of flags must come back as it was
    before = snapshot(bb)
    maps = explain(bb, images, method, **options).maps
    assert maps.shape == (len(images), 4, 4) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert (maps.flatten(1).std(1) > 0).all()
    assert_unchanged(bb, before)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_pixels_to_grid_sums_each_patch():
    torch.manual_seed(0)
    attr = torch.randn(2, 12, 8)
    grid = pixels_to_grid(attr, (3, 2))
    expected = torch.tensor([[[attr[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].sum() for j in range(2)] for i in range(3)]
                             for b in range(2)])  # fmt: skip
    torch.testing.assert_close(grid, expected)
    # sizes that do not divide: a uniform map keeps its mass exactly (bins overlap, so others only roughly)
    uniform = torch.full((2, 9, 9), 0.3)
    torch.testing.assert_close(pixels_to_grid(uniform, (2, 2)).sum((1, 2)), uniform.sum((1, 2)))


def test_gaussian_blur_matches_torchvision(images):
    for sigma in (0.8, 2.5):
        r = int(np.ceil(3 * sigma))
        torch.testing.assert_close(gaussian_blur(images, sigma), TF.gaussian_blur(images, 2 * r + 1, sigma))
    torch.testing.assert_close(gaussian_blur(images, 5.0, radius=5), TF.gaussian_blur(images, 11, 5.0))  # RISE's
    assert gaussian_blur(images, 0) is images
    with pytest.raises(ValueError, match="radius must be at least 1"):
        gaussian_blur(images, 1.0, radius=0)


@pytest.mark.parametrize("baseline", ["black", "blur", "tensor"])
def test_ig_matches_captum(baseline, images):
    """captum's IntegratedGradients with its default rule (Gauss–Legendre), the same steps and baseline."""
    pytest.importorskip("captum")
    from captum.attr import IntegratedGradients

    bb = adapt(make_timm("registers"))
    target = [0, 3, 1]
    if baseline == "tensor":
        base = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        options = {"baseline": base}
    elif baseline == "blur":
        base, options = gaussian_blur(images, 3.0), {"baseline": "blur", "blur_sigma": 3.0}
    else:
        base, options = torch.zeros_like(images), {"baseline": "black"}
    ours = explain(bb, images, "ig", target=target, steps=6, internal_batch_size=4, **options).maps
    theirs = IntegratedGradients(lambda x: bb(x)).attribute(
        images,
        baselines=base.expand_as(images),
        target=target,
        n_steps=6,
        method="gausslegendre",
        internal_batch_size=5,
    )
    torch.testing.assert_close(ours, pool(theirs), atol=1e-5, rtol=1e-4)


def test_ig_completeness_and_default_blur(images):
    """Sundararajan et al.'s completeness axiom: the map sums to logit(x) − logit(baseline)."""
    bb = adapt(make_timm("vit"))
    for baseline, base in [("black", torch.zeros_like(images)), ("blur", gaussian_blur(images, PATCH))]:
        maps = explain(bb, images, "ig", target=2, steps=24, baseline=baseline).maps
        with torch.no_grad():
            gap = bb(images)[:, 2] - bb(base)[:, 2]
        torch.testing.assert_close(maps.sum((1, 2)), gap, atol=1e-4, rtol=1e-3)


def test_inputxgrad_matches_captum(images):
    pytest.importorskip("captum")
    from captum.attr import InputXGradient

    bb = adapt(make_timm("deit-distilled"))
    with torch.no_grad():
        predicted = bb(images).argmax(1)
    theirs = InputXGradient(lambda x: bb(x)).attribute(images.clone().requires_grad_(True), target=predicted)
    torch.testing.assert_close(explain(bb, images, "inputxgrad").maps, pool(theirs), atol=1e-6, rtol=1e-5)


def test_smoothgrad_matches_captum_with_the_same_noise(images, monkeypatch):
    """captum's NoiseTunnel(Saliency(abs=False)), fed the noise SmoothGrad documents (seeded ε · σ per image).

    captum draws its noise with ``torch.normal`` on the expanded batch (image-major); we hand it ours,
    so the comparison is exact: |mean gradient| summed over channels, pooled to patches.
    """
    pytest.importorskip("captum")
    from captum.attr import NoiseTunnel, Saliency

    bb = adapt(make_timm("avg-pool-no-cls"))
    n, seed, level = 5, 7, 0.2
    eps = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    sigma = level * (images.amax((1, 2, 3)) - images.amin((1, 2, 3)))
    noise = (sigma.view(-1, 1, 1, 1, 1) * eps).reshape(-1, 3, 32, 32)
    ours = explain(bb, images, "smoothgrad", target=4, n_samples=n, sigma=level, seed=seed, internal_batch_size=4).maps

    drawn = []

    def fake_normal(mean, std):
        assert std.shape == noise.shape
        drawn.append(True)
        return noise.clone()

    monkeypatch.setattr(torch, "normal", fake_normal)
    theirs = NoiseTunnel(Saliency(lambda x: bb(x))).attribute(
        images, nt_type="smoothgrad", nt_samples=n, stdevs=1.0, target=4, abs=False
    )
    monkeypatch.undo()
    assert drawn
    torch.testing.assert_close(ours, pool(theirs.abs()), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("variant", "layer"), [("vit", -1), ("deit-distilled", -1), ("registers", 0), ("avg-pool-no-cls", 1)]
)
def test_gradcam_matches_pytorch_grad_cam(variant, layer, images):
    """pytorch-grad-cam's GradCAM on ``blocks[layer].norm1`` with a reshape_transform dropping the prefix tokens.

    Strict: its own activations, gradients and ``get_cam_image`` give the raw cam before its min-max
    normalisation and resizing; after ReLU that must equal our map (1e-6). Its final output must then be
    its own post-processing (``scale_cam_image``: min-max + cv2 resize, then the multi-layer aggregation's
    min-max) applied to our map, so the whole pipeline agrees.
    """
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bb = adapt(make_timm(variant))
    p, target = bb.num_prefix_tokens, [1, 0, 4]
    ours = explain(bb, images, "gradcam", target=target, layer=layer).maps

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t[:, p:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    layer_module = bb.model.blocks[layer].norm1
    targets = [ClassifierOutputTarget(t) for t in target]
    with GradCAM(model=bb, target_layers=[layer_module], reshape_transform=reshape) as cam:
        final = cam(input_tensor=images, targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(images, layer_module, targets, acts, grads), 0)
    assert raw.max() > 0
    np.testing.assert_allclose(ours.numpy(), raw, atol=1e-6, rtol=1e-5)
    # per-layer normalisation + resize, then the multi-layer aggregation normalises once more
    np.testing.assert_allclose(final, scale_cam_image(scale_cam_image(ours.numpy(), (32, 32))), atol=1e-5)


def test_gradcam_builds_no_graph_below_its_layer(images):
    """Only the blocks from the chosen one up take part in autograd (no graph below the layer read)."""
    bb = adapt(make_timm("vit"))
    seen = {}
    modules = {"patch_embed": bb.model.patch_embed, "block0": bb.model.blocks[0], "block1": bb.model.blocks[1]}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.requires_grad))
        for name, m in modules.items()
    ]
    try:
        explain(bb, images, "gradcam")
        assert seen == {"patch_embed": False, "block0": False, "block1": True}
        explain(bb, images, "gradcam", layer=0)
        assert seen == {"patch_embed": False, "block0": True, "block1": True}
    finally:
        for h in handles:
            h.remove()


def test_gradcam_default_layer_is_last_attention_norm(images):
    bb = adapt(make_timm("vit"))
    torch.testing.assert_close(explain(bb, images, "gradcam").maps, explain(bb, images, "gradcam", layer=1).maps)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(explain(bb, images, "gradcam").maps, explain(bb, images, "gradcam", layer=0).maps)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_backbone(method, name, images):
    check_contract(name, method, METHODS[method], images)


@pytest.mark.parametrize("method", list(METHODS))
def test_single_image_equals_batch_and_targets(method, images):
    bb = adapt(make_timm("registers"))
    options = METHODS[method]
    maps = explain(bb, images, method, **options).maps
    single = torch.cat([explain(bb, images[i : i + 1], method, **options).maps for i in range(3)])
    torch.testing.assert_close(single, maps, atol=1e-6, rtol=1e-4)

    with torch.no_grad():
        predicted = bb(images).argmax(1)
    torch.testing.assert_close(explain(bb, images, method, target=predicted.tolist(), **options).maps, maps)
    per_image = explain(bb, images, method, target=[4, 0, 2], **options).maps
    for i, t in enumerate([4, 0, 2]):
        torch.testing.assert_close(per_image[i], explain(bb, images[i : i + 1], method, target=t, **options).maps[0])
    assert not torch.allclose(explain(bb, images, method, target=3, **options).maps, maps)


def test_smoothgrad_seed(images):
    bb = adapt(make_timm("vit"))
    a = explain(bb, images, "smoothgrad", n_samples=3, seed=1).maps
    torch.testing.assert_close(explain(bb, images, "smoothgrad", n_samples=3, seed=1).maps, a, atol=0, rtol=0)
    assert not torch.allclose(explain(bb, images, "smoothgrad", n_samples=3, seed=2).maps, a)
    # sigma=0: every noisy copy is the image itself → |plain gradient|
    x = images.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(bb(x)[:, 1].sum(), x)
    torch.testing.assert_close(explain(bb, images, "smoothgrad", target=1, sigma=0.0).maps, pool(g.abs()))


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("gradcam", {"layer": 2}, "layer must be a block index in -2..1"),
        ("gradcam", {"layer": -3}, "layer"),
        ("gradcam", {"layer": "last"}, "layer"),
        ("ig", {"baseline": "white"}, "baseline must be 'black', 'blur' or a tensor"),
        ("ig", {"steps": 0}, "steps must be a positive integer"),
        ("ig", {"internal_batch_size": 2.5}, "internal_batch_size"),
        ("ig", {"blur_sigma": -1}, "blur_sigma"),
        ("smoothgrad", {"n_samples": 0}, "n_samples"),
        ("smoothgrad", {"sigma": -0.1}, "sigma"),
        ("smoothgrad", {"seed": "abc"}, "seed"),
        ("inputxgrad", {"steps": 3}, "unknown option"),
    ],
)
def test_bad_options(method, options, match, images):
    bb = adapt(make_timm("vit"))
    with pytest.raises(VitlensError, match=match):
        explain(bb, images, method, **options)


def test_bad_targets_and_baseline_shape(images):
    bb = adapt(make_timm("vit"))
    with pytest.raises(VitlensError, match="out of range"):
        explain(bb, images, "ig", target=5, steps=2)
    with pytest.raises(VitlensError, match="3 images"):
        explain(bb, images, "gradcam", target=[0, 1])
    with pytest.raises(VitlensError, match="does not fit"):
        explain(bb, images, "ig", steps=2, baseline=torch.zeros(3, 16, 16))
