"""Image–text models (OpenCLIP, Hugging Face CLIP and SigLIP): outputs, zero-shot logits and text-prompt targets
checked against the libraries' own computations on tiny random models built locally (no network). A test skips
where the library of its model (open_clip, transformers) is not installed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vitlens
from conftest import run_cli
from vitlens.backbones import adapt
from vitlens.backbones.image_text import CLIP_TEMPLATES
from vitlens.errors import VitlensError
from vitlens.explainers import EXPLAINERS
from vitlens.models.checkpoint import load_checkpoint, save_checkpoint
from zoo import char_tokenizer, tiny_hf_clip, tiny_hf_siglip, tiny_open_clip

CLASSES = ["cat", "dog", "car"]


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _open_clip_model(**vision) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_open_clip(**vision).eval()


def _hf(build) -> torch.nn.Module:
    torch.manual_seed(0)
    return build().eval()


def _patch_sums(values: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel values ``[B, H, W]`` summed over each ``patch × patch`` cell → ``[B, H / patch, W / patch]``."""
    b, h, w = values.shape
    return values.reshape(b, h // patch, patch, w // patch, patch).sum((2, 4))


@pytest.mark.parametrize("vision", [{}, {"pool_type": "avg", "final_ln_after_pool": True}])
def test_open_clip_output_is_encode_image_and_zero_shot_logits_are_open_clips(vision):
    open_clip = pytest.importorskip("open_clip")
    model = _open_clip_model(**vision)
    backbone = adapt(model)
    x = _images()
    with torch.no_grad():
        image = model.encode_image(backbone.normalize(x))
        assert torch.allclose(backbone(x), image, atol=1e-6)
        # open_clip's own zero-shot classifier: prompt ensembling over the same templates
        tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the bundled BPE tokenizer
        weights = open_clip.build_zero_shot_classifier(
            model, lambda t: tokenizer(t, context_length=16), CLASSES, CLIP_TEMPLATES, device="cpu"
        )
        expected = model.logit_scale.exp() * F.normalize(image, dim=-1) @ weights
        logits = vitlens.zero_shot(model, CLASSES)(x)
    assert backbone.num_classes == 16 and logits.shape == (2, 3)
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("build", [tiny_hf_clip, tiny_hf_siglip], ids=["clip", "siglip"])
def test_hf_output_and_zero_shot_logits_are_the_models_own(build):
    model = _hf(build)
    backbone = adapt(model)
    x = _images()
    prompts = [f"a photo of a {c}." for c in CLASSES]
    with torch.no_grad():
        out = model(input_ids=char_tokenizer(prompts), pixel_values=backbone.normalize(x))
        assert torch.allclose(backbone(x), model.get_image_features(pixel_values=backbone.normalize(x)).pooler_output,
                              atol=1e-6)  # fmt: skip
        logits = vitlens.zero_shot(model, CLASSES, templates=["a photo of a {}."], tokenizer=char_tokenizer)(x)
    assert torch.allclose(logits, out.logits_per_image, atol=1e-5)  # SigLIP: + logit_bias, also the model's


def _open_clip_similarity(model, prompt: str):
    open_clip = pytest.importorskip("open_clip")
    tokens = open_clip.tokenize([prompt], context_length=16)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokens), dim=-1)[0]
    return lambda pixels: F.cosine_similarity(model.encode_image(pixels), text[None], dim=-1)


def _hf_clip_similarity(model, prompt: str):  # CLIPModel and SiglipModel alike
    with torch.no_grad():
        text = F.normalize(model.get_text_features(input_ids=char_tokenizer([prompt])).pooler_output, dim=-1)[0]
    return lambda pixels: F.cosine_similarity(
        model.get_image_features(pixel_values=pixels).pooler_output, text[None], dim=-1
    )


@pytest.mark.parametrize("family", ["open_clip", "hf_clip", "hf_siglip"])
def test_prompt_explanations_differ_and_each_is_the_gradient_of_its_similarity(family):
    """inputxgrad of TextPrompt(p) is x · ∂cos(image, text p)/∂x summed per patch, computed here with the
    library's own encoders; "a photo of a cat" and "a photo of a dog" give different maps."""
    if family == "open_clip":
        model, tokenizer, similarity = _open_clip_model(), None, _open_clip_similarity
    else:
        build = tiny_hf_clip if family == "hf_clip" else tiny_hf_siglip
        model, tokenizer, similarity = _hf(build), char_tokenizer, _hf_clip_similarity
    backbone = adapt(model)
    x = _images()
    maps = {}
    for prompt in ("a photo of a cat", "a photo of a dog"):
        e = vitlens.explain(model, x, method="inputxgrad", target=vitlens.TextPrompt(prompt, tokenizer=tokenizer))
        pixels = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(similarity(model, prompt)(backbone.normalize(pixels)).sum(), pixels)
        expected = _patch_sums((x * grad).sum(1), 8)
        assert torch.allclose(e.maps, expected, atol=1e-6, rtol=1e-4), prompt
        assert e.class_names == [prompt, prompt]
        maps[prompt] = e.maps
    assert not torch.allclose(maps["a photo of a cat"], maps["a photo of a dog"], rtol=1e-2)


def test_text_prompt_forms_and_refusals():
    model = _open_clip_model()
    x = _images(1)
    text = vitlens.backbones.adapt(model).text_embeddings(["a photo of a cat"])[0]
    by_text = vitlens.explain(model, x, method="inputxgrad", target=vitlens.TextPrompt("a photo of a cat")).maps
    by_embedding = vitlens.explain(model, x, method="inputxgrad", target=vitlens.TextPrompt(text)).maps
    by_string = vitlens.explain(model, x, method="inputxgrad", target="a photo of a cat").maps
    assert torch.allclose(by_text, by_embedding) and torch.allclose(by_text, by_string)
    with pytest.raises(VitlensError, match="no classes") as e:
        vitlens.explain(model, x, method="gradcam")  # the predicted "class" of an embedding means nothing
    assert "\n" not in str(e.value)
    with pytest.raises(VitlensError, match="zero-shot logits"):
        vitlens.explain(vitlens.zero_shot(model, CLASSES), x, method="gradcam", target=vitlens.TextPrompt("a cat"))
    with pytest.raises(VitlensError, match="no tokenizer"):
        vitlens.zero_shot(_hf(tiny_hf_clip), CLASSES)
    with pytest.raises(VitlensError, match="image–text model"):
        vitlens.zero_shot(_timm_vit(), CLASSES)
    with pytest.raises(VitlensError, match="templates"):
        vitlens.zero_shot(model, CLASSES, templates=["no placeholder"])
    with pytest.raises(VitlensError, match="dimensions"):
        vitlens.explain(model, x, method="inputxgrad", target=vitlens.TextPrompt(torch.ones(7)))


def _timm_vit():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=1, num_heads=2, num_classes=3)  # fmt: skip


def test_zero_shot_class_targets_and_top_k():
    zs = vitlens.zero_shot(_open_clip_model(), CLASSES)
    e = vitlens.explain(zs, _images(), method="gae", target=vitlens.TopK(2))
    assert e.maps.shape == (2, 2, 4, 4) and all(n in CLASSES for row in e.class_names for n in row)
    assert vitlens.explain(zs, _images(), method="gradcam", target="dog").class_names == ["dog", "dog"]


def test_describe_says_whether_the_output_is_classes_or_the_embedding():
    model = vitlens.load_model(_open_clip_model())
    assert (model.describe()["classes"], model.describe()["embedding"]) == (0, model.embed_dim)
    assert vitlens.zero_shot(_open_clip_model(), CLASSES).describe()["classes"] == len(CLASSES)


def _open_clip_dir(tmp_path, size: int = 32):
    """A local OpenCLIP model folder (``open_clip_config.json`` + weights), as ``open_clip:DIR`` loads it."""
    model = _open_clip_model(image_size=size)
    vision = dict(image_size=size, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2)
    config = {"model_cfg": {"embed_dim": 16, "vision_cfg": vision,
                            "text_cfg": dict(context_length=16, width=32, heads=4, layers=2)},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}  # fmt: skip
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder, model


def test_open_clip_uri_local_folder_and_zero_shot_checkpoint_round_trip(tmp_path):
    folder, model = _open_clip_dir(tmp_path)
    backbone = vitlens.load_model(f"open_clip:{folder}")
    assert backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.std == (0.25, 0.25, 0.25)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(backbone(x), model.encode_image((x - 0.5) / 0.25), atol=1e-6)
    with torch.no_grad():  # ?pretrained=0: the folder's architecture, random weights
        assert not torch.allclose(vitlens.load_model(f"open_clip:{folder}?pretrained=0")(x), backbone(x))
    zs = vitlens.zero_shot(f"open_clip:{folder}", CLASSES)
    save_checkpoint(tmp_path / "ck", zs)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.classes == CLASSES
    with torch.no_grad():
        assert torch.equal(loaded(x), zs(x))


def test_hf_clip_checkpoint_round_trip(tmp_path):
    model = _hf(tiny_hf_clip)
    model.save_pretrained(tmp_path / "hf")
    backbone = vitlens.load_model(f"hf:{tmp_path / 'hf'}")
    assert type(backbone).__name__ == "HFCLIP" and backbone.tokenizer is None  # no tokenizer files saved
    zs = vitlens.zero_shot(backbone, CLASSES, tokenizer=char_tokenizer)
    save_checkpoint(tmp_path / "ck", zs)
    loaded = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(_images()), zs(_images()))


@pytest.mark.parametrize("uri, message", [
    ("open_clip:ViT-B-32", "name the pretrained weights"),
    ("open_clip:no-such-model/x", "unknown OpenCLIP model"),
    ("open_clip:ViT-B-32/no-such-tag", "unknown OpenCLIP pretrained tag"),
    ("open_clip:ViT-B-32/openai?foo=1", "not allowed"),
    ("open_clip:ViT-B-32/openai?pretrained=maybe", "pretrained"),
])  # fmt: skip
def test_open_clip_uri_errors_are_one_line(uri, message):
    pytest.importorskip("open_clip")
    with pytest.raises(VitlensError, match=message) as e:
        vitlens.load_model(uri)
    assert "\n" not in str(e.value)


def test_custom_text_clip_and_layer_scale():
    """OpenCLIP's CustomTextCLIP is adapted like CLIP; layer scale folds into Chefer's rules, which check that
    they reproduce the model block by block (and refuse otherwise)."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2, ls_init_value=0.5)
    model = open_clip.CustomTextCLIP(16, vision, dict(context_length=16, width=32, heads=4, layers=2)).eval()
    x = _images()
    with torch.no_grad():
        assert torch.allclose(adapt(model)(x), model.encode_image(adapt(model).normalize(x)), atol=1e-6)
    with pytest.raises(VitlensError, match="no tokenizer"):  # its tokenizer is not known from the module
        vitlens.zero_shot(model, CLASSES)
    zs = vitlens.zero_shot(model, CLASSES, tokenizer=lambda texts: open_clip.tokenize(texts, context_length=16))
    e = vitlens.explain(zs, x, method="chefer")
    assert e.maps.shape == (2, 4, 4) and not e.degenerate.any()


def test_unsupported_open_clip_towers_refuse_in_one_line():
    with pytest.raises(VitlensError, match="attention pooling"):
        adapt(_open_clip_model(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4))


@pytest.mark.parametrize("task", ["pm", "diffmask"])
def test_train_with_classes_from_prompts(tmp_path, task, capsys):
    """``vitlens train pm|diffmask --classes-from-prompts``: the zero-shot head over the data's class names is the
    classifier; the checkpoint loads back as the zero-shot model with those classes."""
    folder, _ = _open_clip_dir(tmp_path, size=64)  # fashion-canvas images are 64 px

    def train(model: str, out) -> tuple[int, str]:
        args = ["train", task, "--model", model, "--classes-from-prompts", "--out", str(out), "--max-steps", "1",
                "--data", "fashion-canvas:train:n=24", "--batch-size", "8", "--warmup-steps", "0"]  # fmt: skip
        if task == "pm":
            args += ["--eval-data", "fashion-canvas:test:n=8"]
        code, _, err = run_cli(args, capsys)
        return code, err

    code, err = train(f"open_clip:{folder}", tmp_path / task)
    assert code == 0, err
    trained = vitlens.load_model(tmp_path / task)
    assert trained.classes[:2] == ["T-shirt/top", "Trouser"] and trained.config["kind"] == task
    assert trained.class_embeddings.shape == (10, 16)
    maps = vitlens.explain(trained, torch.rand(1, 3, 64, 64), method=task).maps
    assert maps.shape == (1, 8, 8) and torch.isfinite(maps).all()
    code, err = train("timm:vit_tiny_patch16_224?pretrained=0&img_size=64", tmp_path / "timm")
    assert code == 2 and "needs an image–text model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("method", sorted(EXPLAINERS))
def test_every_method_explains_a_text_prompt_or_says_why(method):
    """Methods that take a score function explain the prompt's similarity (a map that depends on the prompt);
    the others refuse in one line (their map ignores the target, or they explain classes only)."""
    from test_families import explainer_for

    x = _images(1)
    try:
        explainer = explainer_for(method, _open_clip_model())  # DiffMask with fresh gates, sampling ones quick
        cat = explainer(x, vitlens.TextPrompt("a photo of a cat"))
    except VitlensError as e:
        assert "\n" not in str(e) and ("score function" in str(e) or "b-cos" in str(e).lower()), str(e)
        assert method in ("attention", "rollout", "flow", "pm", "diffmask", "bcos"), f"{method} refused: {e}"
        return
    dog = explainer(x, vitlens.TextPrompt("a photo of a dog"))
    assert cat.maps.shape == (1, 4, 4) and torch.isfinite(cat.maps).all() and not cat.degenerate.any()
    assert not torch.allclose(cat.maps, dog.maps), method


def test_cli_explain_takes_a_prompt_as_target(tmp_path, capsys):
    from PIL import Image

    folder, _ = _open_clip_dir(tmp_path)
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "a.png")
    code, out, err = run_cli(["explain", str(tmp_path / "a.png"), "--model", f"open_clip:{folder}", "--method",
                              "gradcam", "--target", "a photo of a cat", "--out", str(tmp_path / "o"), "--json"],
                             capsys)  # fmt: skip
    assert code == 0, err
    record = json.loads(out)[0]
    assert record["target_class"] == "a photo of a cat"
    assert "predicted" not in record and "probability" not in record  # no classes: nothing is predicted
    args = ["explain", str(tmp_path / "a.png"), "--model", f"open_clip:{folder}", "--method", "inputxgrad"]
    code, out, err = run_cli([*args, "--target", "a photo of a cat", "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and f"{tmp_path / 'a.png'}: a photo of a cat -> " in out, err


def test_zero_shot_leaves_the_users_model_in_its_mode():
    from zoo import tiny_open_clip

    torch.manual_seed(0)
    model = tiny_open_clip().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model.encode_image(x)
        clip = vitlens.zero_shot(model, ["cat", "dog", "car"])
        assert not any(m.training for m in model.modules())
        assert torch.equal(clip(x), clip(x)) and torch.equal(model.encode_image(x), before)
