"""RISE and patch occlusion against captum / a per-mask transcription of Petsiuk et al., and the sanity check
of every baseline on the committed classifiers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import committed, make_timm
from test_explainers_gradients import BACKBONES, backbone, check_contract
from vitlens import VitlensError, explain, load_model
from vitlens.backbones import adapt, gaussian_blur, upsample
from vitlens.data import collate, open_dataset

METHODS = {"rise": {"n_masks": 12, "internal_batch_size": 7}, "occlusion": {"internal_batch_size": 7}}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def probability(bb, x: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return bb(x[None]).softmax(1)[0, target].item()


def rise_reference(bb, images, targets, n, p, seed, fill, smooth=False) -> torch.Tensor:
    """Petsiuk et al.'s estimator, one mask and one image at a time, with the documented mask draws."""
    gen = torch.Generator().manual_seed(seed)
    cells = (torch.rand(n, 4, 4, generator=gen) < p).float()
    shifts = torch.stack([torch.randint(0, 8, (n,), generator=gen) for _ in range(2)], 1) if smooth else None
    saliency = torch.zeros(len(images), 4, 4)
    for m in range(n):
        if smooth:  # RISE: upsample the grid to (s + 1) cells, crop at a random shift of up to one cell
            big = F.interpolate(cells[m][None, None], size=(40, 40), mode="bilinear", align_corners=False)[0, 0]
            dy, dx = shifts[m].tolist()
            mask = big[dy : dy + 32, dx : dx + 32]
            weight = mask.reshape(4, 8, 4, 8).mean((1, 3))
        else:
            mask = cells[m].repeat_interleave(8, 0).repeat_interleave(8, 1)
            weight = cells[m]
        for b in range(len(images)):
            x = images[b] * mask + fill[b] * (1 - mask)
            saliency[b] += probability(bb, x, targets[b]) * weight
    return saliency / (n * p)


@pytest.mark.parametrize("smooth", [False, True])
def test_rise_matches_per_mask_transcription(smooth, images):
    bb = adapt(make_timm("registers"))
    targets = [2, 0, 4]
    ours = explain(
        bb, images, "rise", target=targets, n_masks=10, p=0.3, seed=3, smooth=smooth, internal_batch_size=7
    ).maps
    fill = bb.mean.expand_as(images)
    expected = rise_reference(bb, images, targets, n=10, p=0.3, seed=3, fill=fill, smooth=smooth)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_rise_with_all_patches_kept_is_the_probability(images):
    """p = 1 keeps every patch: the map is P(target | image) everywhere."""
    bb = adapt(make_timm("vit"))
    maps = explain(bb, images, "rise", target=1, n_masks=3, p=1.0).maps
    expected = torch.tensor([probability(bb, x, 1) for x in images])
    torch.testing.assert_close(maps, expected.view(3, 1, 1).expand(3, 4, 4))


@pytest.mark.parametrize(
    ("variant", "window", "fill"), [("vit", 1, "mean"), ("registers", 2, "black"), ("avg-pool-no-cls", 3, 0.3)]
)
def test_occlusion_matches_captum(variant, window, fill, images):
    """captum's Occlusion on the softmax with patch-sized windows, a stride of one patch, the same fill."""
    pytest.importorskip("captum")
    from captum.attr import Occlusion

    bb = adapt(make_timm(variant))
    targets = [0, 4, 2]
    ours = explain(bb, images, "occlusion", target=targets, window=window, fill=fill, internal_batch_size=5).maps
    baseline = bb.mean if fill == "mean" else torch.zeros(1) if fill == "black" else torch.tensor(fill)
    theirs = Occlusion(lambda x: bb(x).softmax(-1)).attribute(
        images,
        sliding_window_shapes=(3, 8 * window, 8 * window),
        strides=(3, 8, 8),
        baselines=baseline.expand_as(images),
        target=targets,
        perturbations_per_eval=4,
    )
    torch.testing.assert_close(ours, theirs[:, 0, ::8, ::8], atol=1e-6, rtol=1e-5)


def test_fills(images):
    bb = adapt(make_timm("vit"))
    for method, options in METHODS.items():
        for fill, tensor in [
            ("image-mean", images.mean((2, 3), keepdim=True)),
            ("blur", gaussian_blur(images, 8.0)),
            ("black", torch.zeros(3, 1, 1)),
            (0.25, torch.full((1, 3, 32, 32), 0.25)),
        ]:
            torch.testing.assert_close(
                explain(bb, images, method, fill=fill, **options).maps,
                explain(bb, images, method, fill=tensor, **options).maps,
            )


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_backbone(method, name, images):
    check_contract(name, method, METHODS[method], images)


@pytest.mark.parametrize("method", list(METHODS))
def test_single_image_equals_batch_and_targets(method, images):
    bb = backbone("timm:deit-distilled")
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


def test_rise_seed(images):
    bb = adapt(make_timm("vit"))
    a = explain(bb, images, "rise", n_masks=8, seed=1).maps
    torch.testing.assert_close(explain(bb, images, "rise", n_masks=8, seed=1).maps, a, atol=0, rtol=0)
    assert not torch.allclose(explain(bb, images, "rise", n_masks=8, seed=2).maps, a)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("rise", {"p": 0}, r"p \(the keep probability\) must be in \(0, 1\]"),
        ("rise", {"p": 1.5}, "keep probability"),
        ("rise", {"n_masks": 0}, "n_masks must be a positive integer"),
        ("rise", {"seed": 1.5}, "seed must be an integer"),
        ("rise", {"smooth": "yes"}, "smooth must be True or False"),
        ("rise", {"fill": "white"}, "fill must be one of mean, image-mean, black, blur"),
        ("occlusion", {"window": 0}, "window must be a positive integer"),
        ("occlusion", {"window": 5}, "window=5 patches does not fit the 4x4 patch grid"),
        ("occlusion", {"fill": torch.zeros(2, 3, 32, 32)}, "does not fit"),
        ("occlusion", {"internal_batch_size": None}, "internal_batch_size"),
    ],
)
def test_bad_options(method, options, match, images):
    bb = adapt(make_timm("vit"))
    with pytest.raises(VitlensError, match=match):
        explain(bb, images, method, **options)


SANITY = {
    "gradcam": {},
    "inputxgrad": {},
    "ig": {"steps": 4},
    "smoothgrad": {"n_samples": 4},
    "rise": {"n_masks": 48},
    "occlusion": {},
}
# Measured on counting-vit (32 test images, energy vs. mean area 0.51): occlusion 0.85, RISE 0.57, but
# Grad-CAM 0.50, Input×Gradient 0.26, IG 0.34, SmoothGrad 0.53: the gradient maps of the counting model do
# not concentrate on the red cells (its prediction "k red cells" also rests on the other cells being
# non-red), so only the perturbation methods are held to the check there.
CONCENTRATED = {"fashion-vit": tuple(SANITY), "counting-vit": ("rise", "occlusion")}


@pytest.mark.parametrize(
    ("name", "data"), [("fashion-vit", "fashion-canvas:test:n=32"), ("counting-vit", "counting:test:n=32")]
)
def test_maps_concentrate_on_the_object(name, data):
    """Every baseline puts more of its positive mass inside the object's boxes than a uniform map would.

    Energy = share of the positive map mass (maps upsampled to pixels with the shared helper) inside the
    union of the ground-truth boxes (for counting: one box per target-colour cell), averaged over the
    images, against the average share of the image the boxes cover. Images whose boxes cover nothing or
    everything (no or only target cells) say nothing and are left out.
    """
    bb = load_model(committed(name))
    batch = collate([s for s in open_dataset(data)])
    images, (h, w) = batch["image"], batch["image"].shape[-2:]
    region = torch.zeros(len(images), h, w, dtype=torch.bool)
    for i, boxes in enumerate(batch["boxes"]):
        for x0, y0, x1, y1 in boxes.long().tolist():
            region[i, y0 : y1 + 1, x0 : x1 + 1] = True
    keep = region.any((1, 2)) & ~region.all((1, 2))
    images, region = images[keep], region[keep]
    area = region.float().mean((1, 2)).mean().item()
    energies = {}
    for method, options in SANITY.items():
        maps = explain(bb, images, method, **options).maps
        assert maps.shape == (len(images), *bb.grid_for((h, w))) and torch.isfinite(maps).all()
        mass = upsample(maps, (h, w)).clamp_min(0)
        energies[method] = ((mass * region).sum((1, 2)) / mass.sum((1, 2)).clamp_min(1e-12)).mean().item()
    assert all(not math.isnan(e) for e in energies.values())
    weak = {m: round(e, 3) for m, e in energies.items() if m in CONCENTRATED[name] and e <= area}
    assert not weak, f"energy in box not above the box area {area:.3f}: {weak}"


def test_rise_refuses_a_mask_count_it_cannot_hold_before_allocating(images):
    bb = adapt(make_timm("vit"))
    with pytest.raises(VitlensError, match="n_masks must be at most 100,000"):
        explain(bb, images, "rise", n_masks=10**12)
