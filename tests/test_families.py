"""Every method on every family of the zoo (``tests/zoo.py``), parametrised over both registries.

A method either gives a map of the model's patch-grid shape that is finite and not constant, leaving the
model exactly as it was (weights, train/eval mode, fused attention flags), or it refuses in one line that
says why. Which pairs refuse is listed here, so a refusal appearing or disappearing fails a test.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vitlens.backbones import adapt
from vitlens.errors import VitlensError
from vitlens.explainers import EXPLAINERS, get_explainer
from vitlens.explainers.diffmask import DiffMask, DiffMaskGates
from zoo import ZOO

#: options that keep the sampling methods quick on tiny models
FAST = {"rise": {"n_masks": 64}, "ig": {"steps": 8}, "smoothgrad": {"n_samples": 4}}

#: (method, zoo entry) pairs that refuse, and a word their one-line message contains
REFUSES = {
    **{("bcos", name): "b-cos" for name in ZOO if name != "vitlens-bcos-vit"},
    ("attention", "timm-vit-avg-pool"): "class token",
    ("attention", "vitlens-bcos-vit"): "class token",
    ("chefer", "vitlens-bcos-vit"): "lrp rules",
    ("attnlrp", "vitlens-bcos-vit"): "lrp rules",
    **{
        (method, name): "windowed"
        for method in ("attention", "rollout", "flow", "gae", "chefer", "attnlrp", "diffmask")
        for name in ("timm-swin", "timm-swinv2", "hf-swin", "hf-swinv2")
    },
    ("attention", "hf-siglip"): "class token",  # SigLIP pools with attention (MAP): no class token
    ("chefer", "hf-siglip"): "lrp rules",  # no relevance rules for the attention-pooling head
    ("attnlrp", "hf-siglip"): "lrp rules",
}

#: pairs whose map is legitimately all zero on the zoo's random model: Grad-CAM's ReLU removes a layer whose
#: mean-gradient-weighted activations are negative everywhere for the predicted class (B-cos' centred norm)
CONSTANT = {("gradcam", "vitlens-bcos-vit")}

#: pairs whose map is the average-pooling readout's uniform row plus Chefer's terms (∇A ⊙ R_A, rolled out),
#: which are below float32 precision next to it on the zoo's random weights: the map is that uniform row
NEAR_UNIFORM = {("chefer", "timm-eva02"), ("chefer", "timm-beit")}


def model_state(model: torch.nn.Module) -> dict:
    """Everything an explanation must leave as it was."""
    flags = {
        f"{name}.{attr}": getattr(m, attr)
        for name, m in model.named_modules()
        for attr in ("fused_attn", "_attn_implementation", "training")
        if hasattr(m, attr)
    }
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()}, "flags": flags}


def explainer_for(method: str, model: torch.nn.Module):
    if method == "diffmask":
        backbone = adapt(model)
        return DiffMask(backbone, DiffMaskGates.for_backbone(backbone))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "method 'pm' on a model that was not PM fine-tuned")
        return get_explainer(method, model, **FAST.get(method, {}))


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("method", list(EXPLAINERS))
def test_method_on_family(method, name):
    model = ZOO[name]()
    before = model_state(model)
    size = adapt(model).preprocessing.input_size
    grid = adapt(model).grid_for(size)
    torch.manual_seed(1)
    images = torch.rand(2, 3, *size)
    expected_refusal = REFUSES.get((method, name))
    try:
        explanation = explainer_for(method, model)(images)
    except VitlensError as e:
        message = str(e)
        assert expected_refusal is not None, f"{method} on {name} refused: {message}"
        assert "\n" not in message and expected_refusal in message.lower(), message
        return
    assert expected_refusal is None, f"{method} on {name} gave a map; expected a refusal ({expected_refusal})"
    maps = explanation.maps
    assert maps.shape == (2, *grid)
    assert torch.isfinite(maps).all()
    if (method, name) in NEAR_UNIFORM:
        uniform = torch.full_like(maps, 1 / maps[0].numel())
        assert torch.allclose(maps, uniform, rtol=1e-5), f"{method} on {name}: not the readout's uniform row"
    else:
        assert explanation.degenerate.any() == ((method, name) in CONSTANT), f"{method} on {name}: constant maps"
    after = model_state(model)
    assert after["flags"] == before["flags"]
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), f"{method} changed {key}"


def test_zoo_covers_every_adapter():
    """Each registered adapter has at least one model in the zoo."""
    from vitlens.backbones import ADAPTERS

    families = {type(adapt(build())).__name__ for build in ZOO.values()}
    assert families >= {adapter.__name__ for _, adapter in ADAPTERS}
