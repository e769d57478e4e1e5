"""A zoo of tiny random-weight models: one entry per supported family and variant (no network).

Every entry builds a small model (32 px inputs, 2–3 blocks) as a user would build it with the family's own
library, then gives its classifier unit-variance weights: a freshly initialised head (std 0.02, or zero)
makes every gradient vanishingly small, and a trained model's is not. ``tests/test_families.py`` runs
every method on every entry, in the manner of timm's ``test_models.py``.
A new family adds its builders here with :func:`entry`.
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import nn

NUM_CLASSES = 5

#: name → builder of a model in eval mode
ZOO: dict[str, Callable[[], nn.Module]] = {}


def entry(name: str):
    """Register a builder under ``name`` (seeded, so every build is the same model)."""

    def register(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        def seeded() -> nn.Module:
            torch.manual_seed(0)
            model = build()
            heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
            if heads:
                nn.init.normal_(heads[-1].weight)
            return model.eval()

        ZOO[name] = seeded
        return build

    return register


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


def _hf_config(config_class, **kw):
    args = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    args.update(kw)
    return config_class(**args)


@entry("hf-vit")
def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(_hf_config(ViTConfig))


@entry("hf-deit-distilled")
def _hf_deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(_hf_config(DeiTConfig))


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
    import open_clip

    vision_cfg = {**dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2), **vision}
    text_cfg = dict(context_length=16, width=32, heads=4, layers=2)  # OpenCLIP's own BPE vocabulary
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)


def tiny_hf_clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(text_config=_HF_TEXT, vision_config=_HF_VISION, projection_dim=16))


def tiny_hf_siglip() -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    return SiglipModel(SiglipConfig(text_config=_HF_TEXT, vision_config=_HF_VISION))


@entry("open-clip-vit")
def _open_clip():
    from vitlens import zero_shot

    return zero_shot(tiny_open_clip().eval(), PROMPT_CLASSES)


@entry("open-clip-vit-avg-pool")
def _open_clip_avg():
    from vitlens import zero_shot

    return zero_shot(tiny_open_clip(pool_type="avg", final_ln_after_pool=True).eval(), PROMPT_CLASSES)


@entry("hf-clip")
def _hf_clip():
    from vitlens import zero_shot

    return zero_shot(tiny_hf_clip().eval(), PROMPT_CLASSES, tokenizer=char_tokenizer)


@entry("hf-siglip")
def _hf_siglip():
    from vitlens import zero_shot

    return zero_shot(tiny_hf_siglip().eval(), PROMPT_CLASSES, tokenizer=char_tokenizer)
