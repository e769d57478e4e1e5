"""Models without a classifier head (DINOv2 ``Dinov2Model``, HF ``ViTModel``, timm ``num_classes=0``): their
output is an embedding, explained through :class:`EmbeddingSimilarity` to a reference embedding, image or patch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlens
from test_families import FAST, model_state
from vitlens.backbones import adapt
from vitlens.errors import VitlensError
from vitlens.explainers import EXPLAINERS, EmbeddingSimilarity, TopK, get_explainer
from vitlens.explainers.diffmask import DiffMask, DiffMaskGates
from zoo import HEADLESS, ZOO

NO_HEAD = "this model has no classifier head: pass target=EmbeddingSimilarity(...)"

#: (method, headless entry) → a word of the one-line refusal; every other pair gives a map
REFUSES = {
    **{("pm", name): "classifier head" for name in HEADLESS},
    **{("diffmask", name): "classifier head" for name in HEADLESS},
    **{("bcos", name): "b-cos" for name in HEADLESS},
    ("attention", "timm-vit-avg-no-head"): "class token",
}

#: pairs whose map is constant on the zoo's random model: Chefer's map is the readout row of I + Σ Ā; with an
#: average-pooled embedding that row is uniform, and the relevance of a cosine (at most 1, and scale invariant:
#: its gradient is orthogonal to the embedding, so its relevance sums to about 0) makes Ā vanishingly small
CONSTANT = {("chefer", "timm-vit-avg-no-head")}


def images_and_reference(model, n: int = 2):
    size = adapt(model).preprocessing.input_size
    torch.manual_seed(1)
    return torch.rand(n, 3, *size), torch.rand(n, 3, *size)


def explainer_for(method: str, model):
    if method == "diffmask":
        backbone = adapt(model)
        return DiffMask(backbone, DiffMaskGates.for_backbone(backbone))
    return get_explainer(method, model, **FAST.get(method, {}))


@pytest.mark.parametrize("name", list(HEADLESS))
@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_method_on_headless_model(method, name):
    model = HEADLESS[name]()
    backbone = adapt(model)
    assert backbone.headless and backbone.classes == []
    before = model_state(model)
    images, reference = images_and_reference(model)
    cls = EXPLAINERS[method]
    # methods that explain a score function get the similarity to a reference image, one per image;
    # class-agnostic ones need no target
    target = EmbeddingSimilarity.of_image(model, reference) if cls.class_specific else None
    refusal = REFUSES.get((method, name))
    try:
        explanation = explainer_for(method, model)(images, target)
    except VitlensError as e:
        assert refusal is not None, f"{method} on {name} refused: {e}"
        assert "\n" not in str(e) and refusal in str(e).lower(), str(e)
        return
    assert refusal is None, f"{method} on {name} gave a map; expected a refusal ({refusal})"
    maps = explanation.maps
    assert maps.shape == (2, *backbone.grid_for(tuple(images.shape[-2:])))
    assert torch.isfinite(maps).all()
    assert explanation.degenerate.any() == ((method, name) in CONSTANT), f"{method} on {name}: constant maps"
    assert explanation.predicted is None and explanation.predicted_names is None
    assert explanation.logits.shape == (2, backbone(images[:1]).shape[-1])  # the embeddings
    after = model_state(model)
    assert after["flags"] == before["flags"]
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())


@pytest.mark.parametrize("target", [None, 0, "0", [0, 1], TopK(1)])
@pytest.mark.parametrize("method", ["gradcam", "chefer", "occlusion"])
def test_classes_on_a_headless_model_are_one_line(method, target):
    model = HEADLESS["hf-dinov2-model"]()
    images, _ = images_and_reference(model)
    with pytest.raises(VitlensError) as e:
        vitlens.explain(model, images, method=method, target=target)
    assert str(e.value) == NO_HEAD


@pytest.mark.parametrize("method", ["pm", "diffmask"])
def test_methods_that_need_classes_refuse(method):
    model = HEADLESS["hf-vit-model"]()
    with pytest.raises(VitlensError, match=f"^method '{method}' needs a classifier head; this model outputs"):
        explainer_for(method, model)


def test_class_agnostic_methods_run_without_a_target():
    model = HEADLESS["hf-dinov2-registers-model"]()
    images, reference = images_and_reference(model)
    e = vitlens.explain(model, images, method="rollout")
    assert e.maps.shape == (2, 4, 4) and e.targets is None
    with pytest.raises(VitlensError, match="cannot explain a score function"):
        vitlens.explain(model, images, method="rollout", target=EmbeddingSimilarity.of_image(model, reference))


# --- independent recomputations ---------------------------------------------------------------------------------

#: per entry: the module whose output Grad-CAM reads (as the model's own library names it), the embedding
#: computed by the model's own forward, and the number of prefix tokens
OWN = {
    "hf-dinov2-model": (lambda m: m.encoder.layer[-1].norm1, lambda m, x: m(x).pooler_output, 1),
    "hf-dinov2-registers-model": (lambda m: m.encoder.layer[-1].norm1, lambda m, x: m(x).pooler_output, 3),
    "hf-vit-model": (lambda m: m.layers[-1].layernorm_before, lambda m, x: m(x).last_hidden_state[:, 0], 1),
    "timm-vit-no-head": (lambda m: m.blocks[-1].norm1, lambda m, x: m(x), 1),
    "timm-deit-distilled-no-head": (lambda m: m.blocks[-1].norm1, lambda m, x: m(x), 2),
    "timm-vit-avg-no-head": (lambda m: m.blocks[-1].norm1, lambda m, x: m(x), 0),
}


def normalise(model, images):
    prep = adapt(model).preprocessing
    return (images - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", list(OWN))
def test_gradcam_equals_autograd_on_the_cosine_similarity(name):
    model = HEADLESS[name]()
    layer, embed, prefix = OWN[name]
    images, reference = images_and_reference(model)
    ours = vitlens.explain(model, images, method="gradcam", target=EmbeddingSimilarity.of_image(model, reference))

    with torch.no_grad():
        ref = embed(model, normalise(model, reference))
    found = {}
    handle = layer(model).register_forward_hook(lambda _m, _i, out: found.__setitem__("a", out))
    try:
        cos = F.cosine_similarity(embed(model, normalise(model, images)), ref, dim=-1)
    finally:
        handle.remove()
    acts = found["a"]
    (grads,) = torch.autograd.grad(cos.sum(), acts)
    weights = grads[:, prefix:].mean(1, keepdim=True)
    cam = (acts[:, prefix:] * weights).sum(-1).clamp_min(0).reshape(2, 4, 4)
    assert cam.abs().max() > 0
    torch.testing.assert_close(ours.maps, cam.detach(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.logits, embed(model, normalise(model, images)).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(OWN))
def test_inputxgrad_equals_autograd_on_the_cosine_similarity(name):
    model = HEADLESS[name]()
    _, embed, _ = OWN[name]
    images, reference = images_and_reference(model)
    target = EmbeddingSimilarity.of_image(model, reference[0])  # one reference for every image
    assert target.reference.ndim == 1
    ours = vitlens.explain(model, images, method="inputxgrad", target=target)

    with torch.no_grad():
        ref = embed(model, normalise(model, reference[:1]))
    x = images.clone().requires_grad_(True)
    cos = F.cosine_similarity(embed(model, normalise(model, x)), ref, dim=-1)
    (g,) = torch.autograd.grad(cos.sum(), x)
    expected = (x * g).sum(1).detach().reshape(2, 4, 8, 4, 8).sum((2, 4))
    torch.testing.assert_close(ours.maps, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", list(HEADLESS))
def test_similarity_to_the_image_itself_is_one(name):
    model = HEADLESS[name]()
    backbone = adapt(model)
    images, _ = images_and_reference(model)
    with torch.no_grad():
        output = backbone(images)
    per_image = EmbeddingSimilarity.of_image(model, images)
    torch.testing.assert_close(per_image(output), torch.ones(2), atol=1e-5, rtol=0)
    first = EmbeddingSimilarity.of_image(model, images[0])
    assert first(output)[0].item() == pytest.approx(1.0, abs=1e-5) and first(output)[1] < 1 - 1e-4
    # uint8 images are read as 0..255 and the model's modes are left alone
    model.train()
    uint8 = EmbeddingSimilarity.of_image(model, (images * 255).round().to(torch.uint8))
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(uint8.reference, output, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", ["hf-dinov2-registers-model", "timm-vit-no-head"])
def test_patch_reference(name):
    model = HEADLESS[name]()
    backbone = adapt(model)
    images, reference = images_and_reference(model)
    target = EmbeddingSimilarity.of_patch(model, reference[0], row=1, col=2)
    with torch.no_grad():
        tokens = backbone.run(reference[:1]).tokens  # final-normed tokens, prefix first, patches row-major
    torch.testing.assert_close(target.reference, tokens[0, backbone.num_prefix_tokens + 1 * 4 + 2])
    e = vitlens.explain(model, images, method="gradcam", target=target)
    assert e.maps.shape == (2, 4, 4) and not e.degenerate.any()
    with torch.no_grad():
        expected = F.cosine_similarity(backbone(images), target.reference[None], dim=-1)
    torch.testing.assert_close(target(backbone(images)), expected)

    with pytest.raises(VitlensError, match=r"^EmbeddingSimilarity.of_patch: row=4 is not on the 4x4 patch grid$"):
        EmbeddingSimilarity.of_patch(model, reference[0], row=4, col=0)
    with pytest.raises(VitlensError, match=r"^EmbeddingSimilarity.of_patch: col=True is not on"):
        EmbeddingSimilarity.of_patch(model, reference[0], row=0, col=True)
    with pytest.raises(VitlensError, match="give one reference image, got 2"):
        EmbeddingSimilarity.of_patch(model, reference, row=0, col=0)


def test_patch_reference_on_a_classifier_is_that_patchs_logits():
    model = ZOO["hf-dinov2"]()
    backbone = adapt(model)
    images, reference = images_and_reference(model)
    target = EmbeddingSimilarity.of_patch(model, reference[0], row=3, col=0)
    with torch.no_grad():
        tokens = backbone.run(reference[:1]).tokens
        expected = backbone.token_logits(tokens)[0, 1 + 3 * 4]
    torch.testing.assert_close(target.reference, expected)
    assert vitlens.explain(model, images, method="gae", target=target).maps.shape == (2, 4, 4)


def test_embedding_choice_changes_the_explanation():
    from vitlens.backbones.hf_dinov2 import HFDinov2

    model = HEADLESS["hf-dinov2-model"]()
    images, reference = images_and_reference(model)
    maps = {}
    for embedding in ("cls", "mean"):
        backbone = HFDinov2(model, embedding=embedding)
        target = EmbeddingSimilarity.of_image(backbone, reference)
        maps[embedding] = vitlens.explain(backbone, images, method="gae", target=target).maps
    assert not torch.allclose(maps["cls"], maps["mean"])
