"""The library as a user meets it: targets, inputs, wrapped models, the Explanation object and pictures."""

from __future__ import annotations

import dataclasses
import json
import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from conftest import make_timm, run_cli, tiny_timm
from vitlens import EmbeddingSimilarity, Explanation, TopK, VitlensError, explain, load_model, show
from vitlens.backbones import Preprocessing, adapt
from vitlens.explainers import EXPLAINERS, get_explainer
from vitlens.explainers.base import option_docs

matplotlib.use("Agg")

CLASSES = ["cat", "dog", "bird", "fish", "frog"]


@pytest.fixture
def bb():
    return adapt(tiny_timm(), classes=CLASSES)


def test_class_names_indices_and_whole_floats_give_the_same_map(bb, images):
    by_index = explain(bb, images, "gae", target=1).maps
    torch.testing.assert_close(explain(bb, images, "gae", target="dog").maps, by_index)
    torch.testing.assert_close(explain(bb, images, "gae", target="DOG").maps, by_index)
    torch.testing.assert_close(explain(bb, images, "gae", target=1.0).maps, by_index)
    torch.testing.assert_close(explain(bb, images, "gae", target=np.int64(1)).maps, by_index)
    e = explain(bb, images, "gae", target=["dog", 2, "fish"])
    assert e.targets.tolist() == [1, 2, 3] and e.class_names == ["dog", "bird", "fish"]
    torch.testing.assert_close(e.maps[0], by_index[0])


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (3.7, "not a class index"),
        (True, "bool"),
        ("Trouser", "not a class of this model"),
        (5, "out of range"),
        ([1, 2], "got 2 targets for 3 images"),
        ([[1], [1, 2], [0]], "same number"),
        (TopK(9), "only 5 classes"),
        ({"a": 1}, "not supported"),
    ],
)
def test_bad_targets_are_one_line_errors(bb, images, target, message):
    with pytest.raises(VitlensError, match=message) as err:
        explain(bb, images, "gae", target=target)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["gae", "gradcam", "inputxgrad", "chefer", "pm"])
def test_several_targets_per_image_equal_one_call_per_target(bb, images, method):
    with torch.no_grad():
        ranked = bb(images).topk(3, dim=1).indices
    top = explain(bb, images, method, target=TopK(3))
    assert top.maps.shape == (3, 3, 4, 4) and top.targets.tolist() == ranked.tolist()
    assert top.class_names[0] == [CLASSES[i] for i in ranked[0].tolist()]
    lists = explain(bb, images, method, target=ranked.tolist())
    torch.testing.assert_close(lists.maps, top.maps)
    for k in range(3):
        torch.testing.assert_close(top.maps[:, k], explain(bb, images, method, target=ranked[:, k]).maps)


@pytest.mark.parametrize("method", ["inputxgrad", "ig", "gradcam", "gae", "chefer"])
def test_a_score_function_of_one_logit_equals_that_class(bb, images, method):
    by_class = explain(bb, images, method, target=2).maps
    by_function = explain(bb, images, method, target=lambda out: out[:, 2])
    torch.testing.assert_close(by_function.maps, by_class, rtol=1e-5, atol=1e-6)
    assert by_function.targets is None and by_function.class_names == ["<lambda>"] * 3
    per_image = explain(bb, images, method, target=[lambda o: o[2]] * 3).maps
    torch.testing.assert_close(per_image, by_class, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["inputxgrad", "ig"])
def test_linear_methods_are_linear_in_the_score_function(bb, images, method):
    # a multi-label score: 2·logit_1 − logit_3; Input×Gradient and IG are linear in the differentiated score
    combined = explain(bb, images, method, target=lambda out: 2 * out[:, 1] - out[:, 3]).maps
    expected = 2 * explain(bb, images, method, target=1).maps - explain(bb, images, method, target=3).maps
    torch.testing.assert_close(combined, expected, rtol=1e-4, atol=1e-5)


def test_score_function_gradient_matches_autograd(bb, images):
    ref = torch.randn(5)
    e = explain(bb, images, "inputxgrad", target=EmbeddingSimilarity(ref))
    x = images.clone().requires_grad_(True)
    score = torch.nn.functional.cosine_similarity(bb(x), ref.expand(3, -1), dim=-1)
    (g,) = torch.autograd.grad(score.sum(), x)
    expected = (x.detach() * g).sum(1).reshape(3, 4, 8, 4, 8).sum((2, 4))
    torch.testing.assert_close(e.maps, expected, rtol=1e-4, atol=1e-6)
    # a reference per image follows its image through IG's chunks of interpolated copies
    refs = torch.randn(3, 5)
    per_image = explain(bb, images, "ig", target=EmbeddingSimilarity(refs), steps=4, internal_batch_size=5).maps
    singles = [
        explain(bb, images[i : i + 1], "ig", target=EmbeddingSimilarity(refs[i]), steps=4).maps for i in range(3)
    ]
    torch.testing.assert_close(per_image, torch.cat(singles), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rollout", "attention", "pm"])
def test_methods_that_cannot_explain_a_function_say_so(bb, images, method):
    with pytest.raises(VitlensError, match=f"method '{method}' cannot explain a score function"):
        explain(bb, images, method, target=lambda out: out[:, 0])


def test_score_function_of_the_wrong_shape_is_refused(bb, images):
    with pytest.raises(VitlensError, match=r"one score per image \(shape \[3\]\)"):
        explain(bb, images, "gae", target=lambda out: out)


def test_uint8_images_and_normalised_tensors(bb, images):
    as_uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(explain(bb, as_uint8, "gae").maps, explain(bb, as_uint8.float() / 255, "gae").maps)
    normalised = (images - bb.mean) / bb.std
    torch.testing.assert_close(explain(bb, normalised, "gae", normalized=True).maps, explain(bb, images, "gae").maps)
    single = explain(bb, images[0], "gae")
    torch.testing.assert_close(single.maps, explain(bb, images[:1], "gae").maps)


@pytest.mark.parametrize(("scale", "message"), [(255.0, "0–255 values"), (-1.0, "already normalised")])
def test_float_images_outside_unit_range_are_refused(bb, images, scale, message):
    with pytest.raises(VitlensError, match=message) as err:
        explain(bb, images * scale, "gae")
    assert "normalized=True" in str(err.value)
    with pytest.raises(VitlensError, match="float in"):
        explain(bb, (images * 255).to(torch.int32), "gae")


def test_wrapped_models_give_the_plain_models_maps(images):
    model = tiny_timm()
    plain = explain(model, images, "gae", target=1).maps
    norm = torchvision.transforms.Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    for wrapped in (nn.DataParallel(model), torch.compile(model), nn.Sequential(norm, model)):
        torch.testing.assert_close(explain(wrapped, images, "gae", target=1).maps, plain)
    other = nn.Sequential(torchvision.transforms.Normalize([0.5] * 3, [0.25] * 3), model)
    declared = adapt(model, Preprocessing((32, 32), (0.5,) * 3, (0.25,) * 3))
    torch.testing.assert_close(
        explain(other, images, "gae", target=1).maps, explain(declared, images, "gae", target=1).maps
    )
    with pytest.raises(VitlensError, match="only a torchvision Normalize"):
        explain(nn.Sequential(nn.Identity(), model), images, "gae")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_explained_in_float32_and_left_as_they_were(images, dtype):
    model = tiny_timm()
    reference = explain(model, images, "ig", target=1, steps=8).maps
    low = tiny_timm().to(dtype)
    low.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    e = explain(low, images, "ig", target=1, steps=8)
    assert e.maps.dtype == torch.float32 and all(p.dtype == dtype for p in low.parameters())
    # the only difference left is the weights' rounding to 16 bits
    assert torch.corrcoef(torch.stack([e.maps.flatten(), reference.flatten()]))[0, 1] > 0.99


def test_half_precision_model_at_another_size(images):
    low = make_timm("vit").half()
    e = explain(low, torch.rand(1, 3, 48, 40), "ig", steps=4)
    assert e.maps.shape == (1, 6, 5) and torch.isfinite(e.maps).all()
    assert all(p.dtype == torch.float16 for p in low.parameters())


def test_other_input_sizes_interpolate_position_embeddings_and_restore_the_model():
    model = make_timm("vit")  # built for 32x32, 8x8 patches
    bb = adapt(model)
    e = explain(bb, torch.rand(2, 3, 48, 40), "gae")
    assert e.maps.shape == (2, 6, 5) and torch.isfinite(e.maps).all()
    assert not model.dynamic_img_size and model.patch_embed.strict_img_size
    torch.testing.assert_close(explain(bb, torch.rand(2, 3, 32, 32), "rollout").maps.shape, (2, 4, 4))
    with pytest.raises(VitlensError, match="cannot take 30x32 images") as err:
        explain(bb, torch.rand(2, 3, 30, 32), "gae")
    assert "multiples of 8x8" in str(err.value)


def test_explanation_object(bb, images):
    e = explain(bb, images, "gradcam", target="cat")
    assert isinstance(e, Explanation) and len(e) == 3 and e.grid == (4, 4)
    assert e.logits.shape == (3, 5) and e.probabilities.sum(1).allclose(torch.ones(3))
    assert e.predicted_names == [CLASSES[i] for i in e.logits.argmax(1).tolist()]
    assert e.upsample().shape == (3, 32, 32) and e.upsample((64, 48)).shape == (3, 64, 48)
    nearest = e.upsample((8, 8), mode="nearest")
    torch.testing.assert_close(nearest[:, ::2, ::2], e.maps)
    assert isinstance(e.numpy(), np.ndarray) and e.numpy().shape == (3, 4, 4)
    one = e[1]
    assert len(one) == 1 and torch.equal(one.maps[0], e.maps[1]) and one.class_names == ["cat"]
    constant = Explanation(maps=torch.stack([torch.zeros(4, 4), torch.rand(4, 4)]), method="gradcam")
    assert constant.degenerate.tolist() == [True, False]


def test_overlays_keep_the_image_resolution_and_aspect(bb):
    photo = torch.rand(1, 3, 300, 500, generator=torch.Generator().manual_seed(0))  # a non-square photo
    small = torch.nn.functional.interpolate(photo, size=(32, 32), mode="bilinear", antialias=True)
    e = explain(bb, small, "ig", steps=4)
    (picture,) = e.overlay(photo, title=False)
    assert picture.size == (500, 300) and e.scale == "signed"
    # a signed map negative on the left half and positive on the right: blue and red where they lie
    halves = torch.ones(1, 4, 4)
    halves[..., :2] = -1
    (picture,) = dataclasses.replace(e, maps=halves).overlay(photo, title=False)
    signed = np.asarray(picture).astype(int)
    left, right = signed[:, :150], signed[:, 350:]  # the outer thirds, away from the interpolated middle
    assert (left[..., 2] > left[..., 0] + 20).all() and (right[..., 0] > right[..., 2] + 20).all()


def test_show_draws_images_by_methods_and_labels_constant_maps(bb, images):
    gae = explain(bb, images, "gae")
    top = explain(bb, images, "gradcam", target=TopK(2))
    zero = Explanation(maps=torch.zeros(3, 4, 4), method="gradcam", class_names=["cat"] * 3, images=images)
    fig, axes = show(images, {"GAE": gae, "Grad-CAM": top, "dead": zero})
    assert axes.shape == (3, 1 + 1 + 2 + 1)
    assert axes[0, 1].get_title().startswith("GAE") and "constant map" in axes[0, 4].get_title()
    fig2, axes2 = gae.show(original=False)
    assert axes2.shape == (3, 1)


def _rectangles(ax):
    return [(*r.get_xy(), r.get_width(), r.get_height()) for r in ax.patches]


def test_show_draws_boxes_at_the_overlay_resolution_with_a_legend():
    from vitlens.metrics.localisation import map_box

    torch.manual_seed(0)
    photo = torch.rand(1, 3, 60, 100)  # a non-square photo; its overlay is drawn 256 px wide, aspect kept
    small = torch.nn.functional.interpolate(photo, size=(32, 32), mode="bilinear", antialias=True)
    heat = torch.zeros(1, 4, 4)
    heat[0, 1, 2] = 1.0  # evidence in one cell: the implied box is a part of the image
    e = Explanation(maps=heat, method="gradcam", class_names=["cat"], images=small)
    truth = [[(10, 5, 49, 29), (60, 0, 99, 59)]]
    fig, axes = e.show(photo, boxes=truth, map_boxes=0.4)
    assert axes.shape == (1, 2) and axes[0, 1].images[0].get_array().shape[:2] == (154, 256)
    f = 256 / 100

    def expected(boxes, factor):  # inclusive pixel corners, pixel centres at integers
        return [(x0 * factor - 0.5, y0 * factor - 0.5, (x1 - x0 + 1) * factor, (y1 - y0 + 1) * factor)
                for x0, y0, x1, y1 in boxes]  # fmt: skip

    np.testing.assert_allclose(_rectangles(axes[0, 0]), expected(truth[0], 1.0))
    implied = map_box(e.maps[0], (60, 100), 0.4)
    assert 0 < implied[0] < implied[2] < 99 and 0 < implied[1] < implied[3] < 59
    np.testing.assert_allclose(_rectangles(axes[0, 1]), expected([*truth[0], implied], f))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ground truth", "from the map (τ = 0.4)"]
    _, axes = show(photo, e, boxes=truth)  # ground truth alone: no map boxes, one legend entry
    assert len(axes[0, 1].patches) == 2 and len(axes[0, 1].figure.legends[0].get_texts()) == 1


@pytest.mark.parametrize("boxes", [[[(0, 0, 5, 5)], []], [[(0, 0, 5)]], 3])
def test_show_refuses_boxes_of_a_wrong_shape_in_one_line(bb, images, boxes):
    e = explain(bb, images[:1], "gae")
    with pytest.raises(VitlensError, match="show\\(\\): boxes") as info:
        show(images[:1], e, boxes=boxes)
    assert "\n" not in str(info.value)


def test_model_is_left_as_it_was_under_every_option(images):
    model = tiny_timm()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, images, "chefer", target=TopK(2))
    explain(model.half(), images, "gae")
    model.float()
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.allclose(state[k].float(), v.float(), atol=1e-2) for k, v in model.state_dict().items())


def test_pm_warns_on_a_model_that_was_never_pm_trained(bb, images):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_explainer("pm", bb)
    assert any("not PM fine-tuned" in str(w.message) for w in caught)


def test_every_option_is_typed_and_documented():
    for name, cls in EXPLAINERS.items():
        docs, types = option_docs(cls), cls.option_types()
        assert set(types) == set(cls.options())
        for option in cls.options():
            assert docs.get(option), f"{name}.{option} has no description under Args:"
        assert cls.meaning and cls.paper and cls.cost, name


def test_methods_command_lists_every_option(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for name, cls in EXPLAINERS.items():
        assert f"{name}: {cls.meaning}" in out
        for option in cls.options():
            assert f"option {option}:" in out


def _save(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_explain_mirrors_the_input_tree_whatever_the_order(tmp_path, capsys, tiny_checkpoint):
    photos = tmp_path / "photos"
    _save(photos / "bag" / "000.png", 96, 160, 0)
    _save(photos / "sneaker" / "000.png", 48, 48, 1)
    outs = []
    for order, out in ((["bag", "sneaker"], "a"), (["sneaker", "bag"], "b")):
        args = [str(photos / d / "000.png") for d in order]
        code, stdout, _ = run_cli(["explain", *args, "--model", str(tiny_checkpoint), "--method", "gae",
                                           "--out", str(tmp_path / out), "--json"], capsys)  # fmt: skip
        assert code == 0
        outs.append({r["image"]: np.load(r["map"]) for r in json.loads(stdout)})
        assert (tmp_path / out / "bag" / "000.gae.png").is_file() and (
            tmp_path / out / "sneaker" / "000.gae.npy"
        ).is_file()
    for image, m in outs[0].items():  # the same map; the batch position may change the BLAS's summation order
        np.testing.assert_allclose(outs[1][image], m, rtol=1e-5, atol=1e-9)
    overlay = Image.open(tmp_path / "a" / "bag" / "000.gae.png")
    assert overlay.width == 256 and 150 <= overlay.height - 0 <= 200  # aspect 160:96 kept, plus the caption bar


def test_explain_top_k_and_class_names_from_the_command_line(tmp_path, capsys, tiny_checkpoint):
    _save(tmp_path / "in" / "x.png", 48, 48, 2)
    code, out, _ = run_cli(["explain", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--method", "gae",
                                    "--top-k", "2", "--out", str(tmp_path / "o"), "--json"], capsys)  # fmt: skip
    (record,) = json.loads(out)
    assert code == 0 and len(record["overlays"]) == 2 and np.load(record["map"]).shape[0] == 2
    classes = load_model(tiny_checkpoint).classes
    code, out, _ = run_cli(["explain", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--method", "gae",
                            "--target", classes[1], "--out", str(tmp_path / "p"), "--json"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)[0]["target"] == 1
    code, _, err = run_cli(["explain", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--target", "2.5",
                                    "--out", str(tmp_path / "q")], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "not a class" in err


def test_hub_uri_without_network_fails_in_one_line_naming_the_offline_ways(monkeypatch):
    import vitlens.models as backbones

    monkeypatch.setattr(backbones, "hub_reachable", lambda host=backbones.HUB_HOST: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(VitlensError, match="no network: without a network, load weights from disk") as err:
        load_model("timm:vit_tiny_patch16_224")  # pretrained weights by default, not in the cache
    assert "\n" not in str(err.value)
    assert load_model("timm:vit_tiny_patch16_224?pretrained=0&img_size=32").num_classes == 1000  # no hub needed


def test_folder_data_without_arch_trains_a_default_sized_to_the_images(tmp_path, capsys):
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(4):
                _save(tmp_path / "data" / split / c / f"{i}.png", 40, 52, i)
    code, out, err = run_cli(["train", "classifier", "--data", f"folder:{tmp_path / 'data'}:train", "--out",
                              str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4"], capsys)  # fmt: skip
    assert code == 0, err
    assert "fashion-vit at 40 px" in err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["name"] == "fashion-vit" and config["preprocessing"]["input_size"] == [40, 40]


def test_map_box_is_the_largest_component_above_the_threshold():
    from vitlens.metrics.localisation import map_box

    heat = torch.zeros(4, 4)
    heat[1:3, 2:4] = 1.0  # a 2×2-patch blob on the right
    heat[0, 0] = 0.3  # a weak one, below the threshold
    box = map_box(heat, (40, 80), 0.5)  # the image is 40 × 80 px: 10 × 20 px per cell
    pixels = torch.nn.functional.interpolate(heat[None, None], size=(40, 80), mode="bilinear")[0, 0]
    keep = (pixels / pixels.max() * 255).floor() > int(0.5 * 255)
    ys, xs = keep.nonzero(as_tuple=True)
    assert box == [int(xs.min()), int(ys.min()), min(int(xs.max()) + 1, 79), min(int(ys.max()) + 1, 39)]
    assert map_box(torch.zeros(4, 4), (40, 80), 0.5) == [0, 0, 79, 39]


def test_explain_boxes_writes_a_localization_file_folder_data_reads(tmp_path, capsys, tiny_checkpoint):
    from vitlens.data.folder import read_localization

    _save(tmp_path / "in" / "a" / "x.png", 60, 90, 3)
    _save(tmp_path / "in" / "b" / "y.png", 32, 32, 4)
    code, out, err = run_cli(["explain", str(tmp_path / "in"), "--model", str(tiny_checkpoint), "--method", "gae",
                              "--boxes", "--out", str(tmp_path / "o"), "--json"], capsys)  # fmt: skip
    assert code == 0, err
    records = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(out)}
    boxes = read_localization(tmp_path / "o" / "localization.txt")
    assert [b[:4] for b in boxes["a/x.png"]] == [[float(v) for v in records["x.png"]["box"]]]
    x0, y0, x1, y1 = records["x.png"]["box"]
    assert 0 <= x0 <= x1 < 90 and 0 <= y0 <= y1 < 60


def test_one_line_errors_for_overlay_images_and_per_image_references():
    import vitlens
    from vitlens.errors import VitlensError

    model = vitlens.load_model("vitlens:fashion-vit")
    images = torch.rand(2, 3, 64, 64)
    e = vitlens.explain(model, images, method="gradcam")
    with pytest.raises(VitlensError, match=r"overlay: images must be a tensor \[2, 3, H, W\]"):
        e.overlay([object(), object()])
    with pytest.raises(VitlensError, match=r"in \[0, 1\], got \(3, 3, 64, 64\)"):
        e.overlay(torch.rand(3, 3, 64, 64))
    refs = vitlens.EmbeddingSimilarity(torch.rand(3, 10))
    with pytest.raises(VitlensError, match="3 references .one per image. for 2 images"):
        vitlens.explain(model, images, method="gradcam", target=refs)


def test_hub_uri_with_hf_hub_offline_set_names_the_offline_ways_too(monkeypatch):
    import vitlens.models as backbones

    monkeypatch.setattr(backbones, "hub_reachable", lambda host=backbones.HUB_HOST: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VitlensError, match="HF_HUB_OFFLINE is set: without a network, load weights from disk") as e:
        load_model("timm:vit_tiny_patch16_224")  # pretrained weights by default, not in the cache
    assert "\n" not in str(e.value)
