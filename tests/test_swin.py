"""Swin (timm ``SwinTransformer`` / ``SwinTransformerV2``, Hugging Face ``SwinForImageClassification`` /
``SwinModel``) on its last stage's grid, against the libraries' own outputs, pytorch-grad-cam and captum.

The zoo's tiny Swins (32 px, patch 4, window 4, two stages) have an 8×8 patch-embedding grid and a 4×4
last-stage grid: every map is 4×4, each cell covering 8×8 pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from vitlens import EmbeddingSimilarity, VitlensError, explain, load_model
from vitlens.backbones import adapt
from vitlens.backbones.hf_swin import HFSwin
from vitlens.backbones.timm_swin import TimmSwin
from vitlens.models.checkpoint import load_checkpoint, save_checkpoint
from zoo import ZOO

SWINS = ["timm-swin", "timm-swinv2", "hf-swin", "hf-swinv2"]
GRID, CELL = (4, 4), 8
REFUSING = ["attention", "rollout", "flow", "gae", "chefer"]
WORKING = {
    "gradcam": {},
    "inputxgrad": {},
    "ig": {"steps": 4},
    "smoothgrad": {"n_samples": 3},
    "occlusion": {},
    "rise": {"n_masks": 32},
}


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def own_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The library's own forward on normalised images."""
    out = model(x)
    return out if torch.is_tensor(out) else (out.logits if hasattr(out, "logits") else out.pooler_output)


def pool(attr: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] per-pixel attributions → channel sum → sums over 8×8 cells [B, 4, 4]."""
    return F.avg_pool2d(attr.sum(1, keepdim=True), CELL)[:, 0] * CELL**2


@pytest.mark.parametrize("name", SWINS)
def test_logits_and_stages_match_the_library(name, images):
    model = ZOO[name]()
    bb = adapt(model)
    assert isinstance(bb, HFSwin if name.startswith("hf") else TimmSwin) and not bb.global_attention
    trace = bb.run(images)
    with torch.no_grad():
        expected = own_logits(model, bb.normalize(images))
    torch.testing.assert_close(trace.logits, expected, atol=1e-6, rtol=1e-6)
    assert trace.grid == bb.grid_for((32, 32)) == GRID and bb.patch_size == (CELL, CELL)
    assert trace.embeddings.shape == (3, 64, 16)  # the patch-embedding grid (8×8) is finer than the maps'
    assert [tuple(h.shape) for h in trace.hidden][-1] == (3, 16, 32) and len(trace.hidden) == len(bb.blocks) + 1
    assert trace.num_prefix_tokens == 0 and trace.patch_tokens.shape == (3, 16, 32)
    # the model's head averages the final tokens before its linear classifier: the mean of the token logits
    torch.testing.assert_close(bb.token_logits(trace.tokens).mean(1), trace.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SWINS)
def test_gradcam_matches_pytorch_grad_cam(name, images):
    """pytorch-grad-cam's Swin recipe: the last block's ``norm2`` (HF: ``layernorm_after``) with a reshape to
    the 4×4 grid; its raw cam (before min-max and resizing) after ReLU equals ours."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    bb = adapt(ZOO[name]())
    target = [1, 0, 4]
    ours = explain(bb, images, "gradcam", target=target).maps
    last = bb.blocks[-1].blocks[-1]
    layer = last.layernorm_after if name.startswith("hf") else last.norm2

    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], *GRID, t.shape[-1]).permute(0, 3, 1, 2)

    targets = [ClassifierOutputTarget(t) for t in target]
    with GradCAM(model=bb, target_layers=[layer], reshape_transform=reshape) as cam:
        cam(input_tensor=images, targets=targets)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(images, layer, targets, acts, grads), 0)
    assert raw.max() > 0
    np.testing.assert_allclose(ours.numpy(), raw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SWINS)
def test_inputxgrad_matches_captum(name, images):
    """captum's InputXGradient on the library's own forward (normalisation in front), pooled to 8×8 cells."""
    pytest.importorskip("captum")
    from captum.attr import InputXGradient

    model = ZOO[name]()
    bb = adapt(model)
    with torch.no_grad():
        predicted = bb(images).argmax(1)
    theirs = InputXGradient(lambda x: own_logits(model, bb.normalize(x))).attribute(
        images.clone().requires_grad_(True), target=predicted
    )
    torch.testing.assert_close(explain(bb, images, "inputxgrad").maps, pool(theirs), atol=1e-6, rtol=1e-5)


def test_ig_sums_to_the_logit_gap(images):
    """Integrated Gradients' completeness on a Swin: the map sums to logit(x) − logit(black)."""
    bb = adapt(ZOO["timm-swin"]())
    maps = explain(bb, images, "ig", target=2, steps=24).maps
    with torch.no_grad():
        gap = bb(images)[:, 2] - bb(torch.zeros_like(images))[:, 2]
    torch.testing.assert_close(maps.sum((1, 2)), gap, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", SWINS)
def test_occlusion_hides_last_stage_cells(name, images):
    """Occlusion's map, recomputed by hand: hide each 8×8-pixel cell with the mean colour, probability drop."""
    bb = adapt(ZOO[name]())
    ours = explain(bb, images, "occlusion", target=3).maps
    with torch.no_grad():
        base = bb(images).softmax(1)[:, 3]
        expected = torch.zeros(3, *GRID)
        for i in range(GRID[0]):
            for j in range(GRID[1]):
                hidden = images.clone()
                hidden[:, :, i * CELL : (i + 1) * CELL, j * CELL : (j + 1) * CELL] = bb.mean
                expected[:, i, j] = base - bb(hidden).softmax(1)[:, 3]
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SWINS)
def test_pm_is_the_classifier_on_every_final_token(name, images):
    """PM = sigmoid(classifier(final-normed last-stage token)), read from the library's own features."""
    model = ZOO[name]()
    bb = adapt(model)
    with pytest.warns(UserWarning, match="not PM fine-tuned"):
        ours = explain(bb, images, "pm", target=2).maps
    with torch.no_grad():
        x = bb.normalize(images)
        if name.startswith("hf"):
            logits = model.classifier(model.base_model(x).last_hidden_state).reshape(3, *GRID, -1)
        else:
            logits = model.head.fc(model.forward_features(x))  # NHWC
    torch.testing.assert_close(ours, logits[..., 2].sigmoid(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", SWINS)
def test_every_working_method_maps_the_stage_grid(name, images):
    bb = adapt(ZOO[name]())
    for method, options in WORKING.items():
        maps = explain(bb, images[:2], method, **options).maps
        assert maps.shape == (2, *GRID) and torch.isfinite(maps).all(), method


@pytest.mark.parametrize("name", SWINS)
def test_global_attention_methods_refuse_in_one_line(name, images):
    bb = adapt(ZOO[name]())
    for method in REFUSING:
        with pytest.raises(VitlensError, match="windowed attention") as e:
            explain(bb, images, method)
        assert "\n" not in str(e.value) and method in str(e.value)
    with pytest.raises(VitlensError, match="windowed attention only"):
        bb.run(images, attention=True)
    with pytest.raises(VitlensError, match=r"reads its last stage \(layer=-1 or 1\): stage 0") as e:
        explain(bb, images, "gradcam", layer=0)
    assert "\n" not in str(e.value)


def test_diffmask_refuses_in_one_line():
    from vitlens.explainers.diffmask import DiffMask, DiffMaskGates

    bb = adapt(ZOO["hf-swin"]())
    with pytest.raises(VitlensError, match="windowed attention") as e:
        DiffMask(bb, DiffMaskGates.for_backbone(bb))
    assert "\n" not in str(e.value)


def test_headless_hf_swin_model_explains_an_embedding(images):
    """``SwinModel`` (no classifier): the output is the pooled embedding; a similarity target explains it."""
    pytest.importorskip("transformers")
    pytest.importorskip("captum")
    from captum.attr import InputXGradient
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    model = SwinModel(config).eval()
    bb = adapt(model)
    assert isinstance(bb, HFSwin) and bb.num_classes == 0
    with torch.no_grad():
        embedding = model(bb.normalize(images)).pooler_output
    torch.testing.assert_close(bb(images), embedding, atol=1e-6, rtol=1e-6)
    target = EmbeddingSimilarity(embedding[0])
    ours = explain(bb, images, "inputxgrad", target=target).maps
    theirs = InputXGradient(lambda x: target(model(bb.normalize(x)).pooler_output)).attribute(
        images.clone().requires_grad_(True)
    )
    torch.testing.assert_close(ours, pool(theirs), atol=1e-6, rtol=1e-5)
    assert explain(bb, images, "gradcam", target=target).maps.shape == (3, *GRID)


def test_timm_uri_builds_swin_tiny_offline():
    """``timm:swin_tiny_patch4_window7_224?pretrained=0``: the 224-px Swin-T, its maps on the 7×7 grid."""
    bb = load_model("timm:swin_tiny_patch4_window7_224?pretrained=0&num_classes=3")
    assert isinstance(bb, TimmSwin)
    assert bb.describe() | {"classes": 3} == {
        "family": "timm-swin", "input_size": [224, 224], "patch_size": [32, 32], "grid": [7, 7],
        "prefix_tokens": [], "blocks": 4, "classes": 3,
    }  # fmt: skip
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert explain(bb, image, "gradcam", target=0).maps.shape == (1, 7, 7)
    with pytest.raises(VitlensError, match="cannot take 64x64 images"):
        explain(bb, image[..., :64, :64], "inputxgrad", target=0)


def test_hf_uri_loads_a_saved_swin(tmp_path, images):
    model = ZOO["hf-swin"]()
    model.config.id2label = {i: f"class{i}" for i in range(5)}
    model.config.label2id = {f"class{i}": i for i in range(5)}
    model.save_pretrained(tmp_path)
    bb = load_model(f"hf:{tmp_path}")
    assert isinstance(bb, HFSwin) and bb.classes == [f"class{i}" for i in range(5)]
    torch.testing.assert_close(bb(images), adapt(model)(images), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["timm-swin", "hf-swin", "hf-swinv2"])
def test_checkpoint_round_trip(name, tmp_path, images):
    """A vitlens checkpoint of a Swin (what ``vitlens train pm`` writes) loads back as the same model."""
    model = ZOO[name]()
    bb = adapt(model)
    if name.startswith("hf"):
        bb.spec = {"source": "hf", "name": type(model).__name__, "config": model.config.to_dict()}
    else:
        kwargs = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2])
        bb.spec = {"source": "timm", "name": "swin_tiny_patch4_window7_224", "kwargs": {**kwargs, "num_classes": 5}}
    save_checkpoint(tmp_path / "ckpt", bb, kind="pm")
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(bb)
    torch.testing.assert_close(loaded(images), bb(images), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(explain(loaded, images, "pm").maps, explain(bb, images, "pm").maps)


def test_pm_trains_on_swin_and_diffmask_training_refuses():
    """PM fine-tuning's loss runs on the last stage's grid; DiffMask training refuses in one line."""
    from vitlens.data import collate, open_dataset
    from vitlens.training.diffmask import DiffMaskTask
    from vitlens.training.pm import PMTask

    dataset = open_dataset("fashion-canvas:train:n=64")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, patch_size=4, window_size=4, embed_dim=16,
        depths=(2, 2), num_heads=(2, 2), num_classes=10,
    )  # fmt: skip
    bb = adapt(model)
    torch.manual_seed(0)
    task = PMTask(bb, dataset, mask_fraction=0.1, mask_batch=2, composites=2)
    assert task.grid == (8, 8)
    loss, logs = task.loss(task.net, collate([dataset[i] for i in range(8)]), 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["pm_bce"] > 0
    assert model.head.fc.weight.grad.abs().sum() > 0
    with pytest.raises(VitlensError, match="windowed attention") as e:
        DiffMaskTask(bb)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["hf", "timm"])
def test_other_input_sizes_match_the_library(family):
    """HF Swin at 48 px with absolute position embeddings (interpolated, as ``interpolate_pos_encoding=True``)
    and a timm Swin built with ``strict_img_size=False``: the libraries' own logits, maps on the 6×6 grid."""
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    if family == "hf":
        transformers = pytest.importorskip("transformers")
        config = transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=5,
            use_absolute_embeddings=True,
        )  # fmt: skip
        model = transformers.SwinForImageClassification(config).eval()
        torch.nn.init.normal_(model.swin.embeddings.position_embeddings)
        own = lambda x: model(x, interpolate_pos_encoding=True).logits
    else:
        model = own = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
            depths=(2, 2), num_heads=(2, 2), num_classes=5, strict_img_size=False,
        ).eval()  # fmt: skip
    bb = adapt(model)
    with torch.no_grad():
        torch.testing.assert_close(bb(images), own(bb.normalize(images)), atol=1e-5, rtol=1e-5)
    assert bb.grid_for((48, 48)) == (6, 6)
    assert explain(bb, images, "inputxgrad", target=0).maps.shape == (2, 6, 6)


def test_unsupported_pooling_is_refused():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, window_size=4, embed_dim=16,
        depths=(2, 2), num_heads=(2, 2), num_classes=5, global_pool="",
    )  # fmt: skip
    with pytest.raises(VitlensError, match="global_pool='' is not supported"):
        adapt(model)
