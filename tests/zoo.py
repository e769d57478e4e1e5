"""A zoo of tiny random-weight models: one entry per supported family and variant (no network).

Every entry builds a small model (32 px inputs, 2–3 blocks) as a user would build it with the family's own
library, then gives its classifier unit-variance weights: a freshly initialised head (std 0.02, or zero)
makes every gradient vanishingly small, and a trained model's is not. ``tests/test_families.py`` runs
every method on every entry, in the manner of timm's ``test_models.py``.
A new family adds its builders here with :func:`entry`. An entry built with a library that vitlens does not
depend on (transformers, open_clip) names it, and a test that builds the entry skips where it is not installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

NUM_CLASSES = 5

#: name → builder of a model in eval mode
ZOO: dict[str, Callable[[], nn.Module]] = {}
#: name → builder of a model without a classifier head (its output is an embedding), in eval mode
HEADLESS: dict[str, Callable[[], nn.Module]] = {}
#: name → the optional library its builder needs
NEEDS: dict[str, str] = {}


def entry(name: str, registry: dict[str, Callable[[], nn.Module]] = ZOO, needs: str | None = None):
    """Register a builder under ``name`` in ``registry`` (seeded, so every build is the same model).

    Args:
        name: the entry's name (a test id).
        registry: :data:`ZOO` or :data:`HEADLESS`.
        needs: the optional library the builder imports; building the entry skips the test without it.
    """
    if needs is not None:
        NEEDS[name] = needs

    def register(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        def seeded() -> nn.Module:
            if needs is not None:
                pytest.importorskip(needs)
            torch.manual_seed(0)
            model = build()
            heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
            if heads:
                nn.init.normal_(heads[-1].weight)
            return model.eval()

        registry[name] = seeded
        return build

    return register


def buildable(name: str) -> bool:
    """Whether the library entry ``name`` needs, if any, is installed."""
    return name not in NEEDS or importlib.util.find_spec(NEEDS[name]) is not None


def _timm(name: str, **kw) -> nn.Module:
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return timm.create_model(name, **args)


@entry("timm-vit")
def _timm_vit():
    return _timm("vit_tiny_patch16_224")


@entry("timm-deit-distilled")
def _timm_deit_distilled():
    return _timm("deit_tiny_distilled_patch16_224")


@entry("timm-vit-registers")
def _timm_registers():
    return _timm("vit_tiny_patch16_224", reg_tokens=4)


@entry("timm-vit-avg-pool")
def _timm_avg():
    return _timm("vit_tiny_patch16_224", class_token=False, global_pool="avg")


@entry("timm-deit3")
def _timm_deit3():
    return _timm("deit3_small_patch16_224", init_values=0.1)  # layer scale, position embedding without the class token


@entry("timm-flexivit")
def _timm_flexivit():
    return _timm("flexivit_small")


@entry("timm-eva02")
def _timm_eva02():
    return _timm("eva02_tiny_patch14_224")  # rotary embedding, packed SwiGLU, fused qkv, average pooling


@entry("timm-eva02-swiglu-norm")
def _timm_eva02_swiglu_norm():
    return _timm("eva02_tiny_patch14_224", scale_mlp=True, qkv_fused=False, init_values=0.1, global_pool="token")


@entry("timm-eva-registers")
def _timm_eva_registers():
    return _timm(
        "eva02_tiny_patch14_224",  # EVA-01 style: absolute position embedding only, GELU MLP
        use_rot_pos_emb=False, swiglu_mlp=False, num_reg_tokens=2, init_values=0.1, global_pool="token",
    )  # fmt: skip


def _random_relative_position_bias(model: nn.Module) -> nn.Module:
    """Relative position bias tables drawn at random (timm initialises them to zero; a trained model's are not)."""
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            nn.init.normal_(p)
    return model


@entry("timm-beit")
def _timm_beit():
    return _random_relative_position_bias(_timm("beit_base_patch16_224"))  # a bias per block, average pooling


@entry("timm-beit-shared-bias")
def _timm_beit_shared():
    model = _timm("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token")
    return _random_relative_position_bias(model)


def _hf_config(config_class, **kw):
    args = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    args.update(kw)
    return config_class(**args)


@entry("hf-vit", needs="transformers")
def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(_hf_config(ViTConfig))


@entry("hf-deit-distilled", needs="transformers")
def _hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig))


@entry("hf-vit-sdpa", needs="transformers")
def _hf_vit_sdpa():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(_hf_config(ViTConfig, attn_implementation="sdpa"))


@entry("hf-deit-sdpa", needs="transformers")
def _hf_deit_sdpa():
    from transformers import DeiTConfig, DeiTForImageClassification

    return DeiTForImageClassification(_hf_config(DeiTConfig, attn_implementation="sdpa"))


def _dinov2_config(config_class, **kw):
    args = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        layerscale_value=0.5, num_labels=5,
    )  # fmt: skip
    args.update(kw)
    return config_class(**args)


@entry("hf-dinov2", needs="transformers")
def _hf_dinov2():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    return Dinov2ForImageClassification(_dinov2_config(Dinov2Config))


@entry("hf-dinov2-registers-swiglu", needs="transformers")
def _hf_dinov2_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    config = _dinov2_config(Dinov2WithRegistersConfig, num_register_tokens=4, use_swiglu_ffn=True)
    return Dinov2WithRegistersForImageClassification(config)


@entry("hf-dinov2-model", HEADLESS, needs="transformers")
def _hf_dinov2_model():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(_dinov2_config(Dinov2Config))


@entry("hf-dinov2-registers-model", HEADLESS, needs="transformers")
def _hf_dinov2_registers_model():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel(_dinov2_config(Dinov2WithRegistersConfig, num_register_tokens=2))


@entry("hf-vit-model", HEADLESS, needs="transformers")
def _hf_vit_model():
    from transformers import ViTConfig, ViTModel

    return ViTModel(_hf_config(ViTConfig))


@entry("timm-vit-no-head", HEADLESS)
def _timm_vit_no_head():
    return _timm("vit_tiny_patch16_224", num_classes=0)


@entry("timm-deit-distilled-no-head", HEADLESS)
def _timm_deit_distilled_no_head():
    return _timm("deit_tiny_distilled_patch16_224", num_classes=0)


@entry("timm-vit-avg-no-head", HEADLESS)
def _timm_vit_avg_no_head():
    return _timm("vit_tiny_patch16_224", num_classes=0, class_token=False, global_pool="avg")


@entry("torchvision-vit")
def _torchvision_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    nn.init.normal_(model.class_token)  # torchvision initialises it to zero
    return model


@entry("vitlens-bcos-vit")
def _bcos_vit():
    from vitlens.bcos.vit import BcosSimpleViT

    return BcosSimpleViT(img_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64)


def _timm_swin_model(name: str) -> nn.Module:
    args = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2))
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **args)


@entry("timm-swin")
def _timm_swin():
    return _timm_swin_model("swin_tiny_patch4_window7_224")


@entry("timm-swinv2")
def _timm_swinv2():
    model = _timm_swin_model("swinv2_tiny_window8_256")
    for stage in model.layers:  # timm zeroes the residual post-norms at init: every block would add nothing
        for block in stage.blocks:
            nn.init.ones_(block.norm1.weight)
            nn.init.ones_(block.norm2.weight)
    return model


def _hf_swin_config(config_class):
    return config_class(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, num_labels=5
    )


@entry("hf-swin", needs="transformers")
def _hf_swin():
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(_hf_swin_config(SwinConfig))


@entry("hf-swinv2", needs="transformers")
def _hf_swinv2():
    from transformers import Swinv2Config, Swinv2ForImageClassification

    return Swinv2ForImageClassification(_hf_swin_config(Swinv2Config))


#: class names of the zero-shot image–text entries (prompts built with the model's own templates)
PROMPT_CLASSES = ["cat", "dog", "car", "tree", "boat"]

_HF_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
_HF_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip


def char_tokenizer(texts: list[str], length: int = 16) -> torch.Tensor:
    """A tokenizer built offline for the tiny Hugging Face text towers: one id per character, then the end
    token (id 1, where CLIP pools), zero padding to ``length``."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    for i, text in enumerate(texts):
        chars = [3 + ord(c) % 120 for c in text][: length - 1]
        ids[i, : len(chars) + 1] = torch.tensor([*chars, 1])
    return ids


def tiny_open_clip(**vision) -> nn.Module:
    open_clip = pytest.importorskip("open_clip")
    vision_cfg = {**dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2), **vision}
    text_cfg = dict(context_length=16, width=32, heads=4, layers=2)  # OpenCLIP's own BPE vocabulary
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)


def tiny_hf_clip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(text_config=_HF_TEXT, vision_config=_HF_VISION, projection_dim=16)
    return transformers.CLIPModel(config)


def tiny_hf_siglip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=_HF_TEXT, vision_config=_HF_VISION))


@entry("open-clip-vit", needs="open_clip")
def _open_clip():
    from vitlens import zero_shot

    return zero_shot(tiny_open_clip().eval(), PROMPT_CLASSES)


@entry("open-clip-vit-avg-pool", needs="open_clip")
def _open_clip_avg():
    from vitlens import zero_shot

    return zero_shot(tiny_open_clip(pool_type="avg", final_ln_after_pool=True).eval(), PROMPT_CLASSES)


@entry("hf-clip", needs="transformers")
def _hf_clip():
    from vitlens import zero_shot

    return zero_shot(tiny_hf_clip().eval(), PROMPT_CLASSES, tokenizer=char_tokenizer)


@entry("hf-siglip", needs="transformers")
def _hf_siglip():
    from vitlens import zero_shot

    return zero_shot(tiny_hf_siglip().eval(), PROMPT_CLASSES, tokenizer=char_tokenizer)
