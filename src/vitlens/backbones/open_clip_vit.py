"""Adapter for OpenCLIP models (``open_clip.CLIP``, ``CustomTextCLIP``) with their own ``VisionTransformer``.

The vision tower: class token, ``ln_pre``, ``transformer.resblocks`` (``nn.MultiheadAttention``), ``ln_post``
and the projection ``proj``; the text tower embeds prompts (see :mod:`.image_text`). Towers built from timm
(``timm_model_name``), ResNet towers and attention-pooling variants are refused in one line.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Preprocessing
from .image_text import ImageTextBackbone, Tokenizer
from .parts import BlockParts, UnsupportedParts, linear_parts
from .torchvision_vit import capture_mha_attention

CLIP_VOCAB = 49408  # OpenCLIP's own BPE vocabulary (bundled with the package)


def is_open_clip(model: nn.Module) -> bool:
    if "open_clip" not in sys.modules:  # no OpenCLIP model can exist; skip the import
        return False
    from open_clip import CLIP, CustomTextCLIP

    return isinstance(model, CLIP | CustomTextCLIP)


def open_clip_preprocessing(model: nn.Module) -> Preprocessing:
    """Input size, mean, std and resize interpolation from the model's preprocessing config (OpenAI's
    mean/std when it has none, as ``open_clip.create_model_and_transforms``)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = visual.image_size
    size = (int(size[0]), int(size[1])) if isinstance(size, Sequence) else (int(size), int(size))
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocessing(
        input_size=size,
        mean=tuple(float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", OPENAI_DATASET_STD)),
        interpolation=interpolation if interpolation in ("nearest", "bilinear", "bicubic") else "bicubic",
    )


def default_tokenizer(model: nn.Module) -> Tokenizer | None:
    """OpenCLIP's bundled BPE tokenizer for models with its vocabulary and text transformer; ``None`` otherwise
    (other text towers need the tokenizer of their model name: ``open_clip.get_tokenizer(name)``)."""
    from open_clip import CLIP
    from open_clip.tokenizer import tokenize

    if isinstance(model, CLIP) and getattr(model, "vocab_size", None) == CLIP_VOCAB:
        return functools.partial(tokenize, context_length=model.context_length)
    return None


class OpenCLIPViT(ImageTextBackbone):
    family = "open_clip"

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing | None = None,
        classes=None,
        *,
        class_embeddings: Tensor | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise VitlensError(
                f"OpenCLIP models with a {type(visual).__name__} vision tower are not supported "
                "(only OpenCLIP's own VisionTransformer)"
            )
        if visual.attn_pool is not None:
            raise VitlensError("OpenCLIP vision towers with attention pooling (CoCa) are not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise VitlensError(f"OpenCLIP vision towers with pool_type={visual.pool_type!r} are not supported")
        if not all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks):
            raise VitlensError("OpenCLIP vision towers with custom blocks (block_type='custom') are not supported")
        if not getattr(visual.transformer, "batch_first", False):
            raise VitlensError("OpenCLIP transformers built sequence-first are not supported (upgrade open-clip-torch)")
        super().__init__(
            model,
            preprocessing or open_clip_preprocessing(model),
            classes,
            class_embeddings=class_embeddings,
            tokenizer=tokenizer if tokenizer is not None else default_tokenizer(model),
        )

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> Tensor | None:
        return getattr(self.model, "logit_bias", None)

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ("cls",)

    @property
    def pooling(self) -> str:
        return "token" if self.visual.pool_type == "tok" else "avg"

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.visual.transformer.resblocks

    @property
    def _grid(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        size = tuple(self.visual.image_size) if isinstance(self.visual.image_size, Sequence) else None
        if size is not None and tuple(x.shape[-2:]) != size:
            raise VitlensError(
                f"OpenCLIP ViTs only take their configured input size {size[0]}x{size[1]}, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        e = self.visual.conv1(x)
        return e.flatten(2).transpose(1, 2), (e.shape[-2], e.shape[-1])

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        if tuple(grid) != self._grid:
            raise VitlensError(f"OpenCLIP ViTs only take their configured grid {self._grid}, got {tuple(grid)}")
        v = self.visual
        cls = v.class_embedding.view(1, 1, -1).expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)
        x = torch.cat([cls, embeddings], dim=1) + v.positional_embedding.to(embeddings.dtype)
        return v.ln_pre(v.patch_dropout(x))

    @property
    def _norm_after_pool(self) -> bool:
        """``final_ln_after_pool`` with average pooling: ``ln_post`` normalises the mean, not each token."""
        return self.visual.final_ln_after_pool and self.visual.pool_type == "avg"

    def final_norm(self, x: Tensor) -> Tensor:
        return x if self._norm_after_pool else self.visual.ln_post(x)

    def _project(self, z: Tensor) -> Tensor:
        return z if self.visual.proj is None else z @ self.visual.proj

    def image_embedding(self, tokens: Tensor) -> Tensor:
        if self.visual.pool_type == "avg":
            pooled = tokens[:, 1:].mean(1)
            return self._project(self.visual.ln_post(pooled) if self._norm_after_pool else pooled)
        return self._project(tokens[:, 0])

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        return self._project(self.visual.ln_post(tokens) if self._norm_after_pool else tokens)

    def head_linear(self) -> tuple[int | None, Callable[[Tensor], Tensor], Tensor]:
        v = self.visual
        if v.proj is None:
            raise UnsupportedParts("OpenCLIP vision towers without a projection")
        norm = v.ln_post if self._norm_after_pool else nn.Identity()
        return (0 if v.pool_type == "tok" else None), norm, v.proj.T

    def encode_text(self, inputs: dict[str, Tensor]) -> Tensor:
        return self.model.encode_text(inputs["input_ids"])

    def attention_norm(self, index: int) -> nn.Module:
        return self.blocks[index].ln_1

    def block_parts(self, block: nn.Module) -> BlockParts:
        from open_clip.transformer import LayerScale

        mha, mlp = block.attn, block.mlp
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim or mha.bias_k is not None:
            raise UnsupportedParts(f"OpenCLIP {type(mha).__name__} attention of this configuration")
        if not all(hasattr(mlp, n) for n in ("c_fc", "gelu", "c_proj")) or len(mlp) != 3:
            raise UnsupportedParts("OpenCLIP MLPs of this layout")

        def gamma(ls: nn.Module) -> Tensor | None:
            if isinstance(ls, LayerScale):
                return ls.gamma
            if isinstance(ls, nn.Identity):
                return None
            raise UnsupportedParts(f"OpenCLIP {type(ls).__name__} layer scale")

        identity = nn.Identity()
        return BlockParts(
            norm1=block.ln_1,
            qkv=(mha.in_proj_weight, mha.in_proj_bias),
            heads=mha.num_heads,
            scale=(mha.embed_dim // mha.num_heads) ** -0.5,
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(mha.out_proj, gamma(block.ls_1)),
            norm2=block.ln_2,
            fc1=linear_parts(mlp.c_fc),
            act=mlp.gelu,
            fc2=linear_parts(mlp.c_proj, gamma(block.ls_2)),
        )

    def capture_attention(self) -> contextlib.AbstractContextManager[list[Tensor]]:
        return capture_mha_attention([block.attn for block in self.blocks])


#: ``open_clip`` model classes a checkpoint may name, built from the model config it records
BUILDERS = ("CLIP", "CustomTextCLIP")


def open_clip_spec(model: nn.Module, config: dict) -> dict | None:
    """How a checkpoint rebuilds ``model`` (its class and OpenCLIP model config); ``None`` for towers that
    :func:`build_open_clip` would refuse."""
    spec = {"source": "open_clip", "name": type(model).__name__, "config": config}
    try:
        check_open_clip_spec(spec, "model")
    except VitlensError:
        return None
    return spec


def check_open_clip_spec(spec: dict, where: str) -> None:
    """A checkpoint's OpenCLIP spec: an allowed class, a config with no tower that loads other weights."""
    config = spec.get("config")
    if spec.get("name") not in BUILDERS or not isinstance(config, dict):
        raise VitlensError(f"{where}: an OpenCLIP model needs 'model.name' in {', '.join(BUILDERS)} and 'model.config'")
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise VitlensError(f"{where}: 'model.config.vision_cfg' and 'text_cfg' must be objects")
    named = [k for k in ("timm_model_name",) if vision.get(k)] + [k for k in ("hf_model_name",) if text.get(k)]
    if named:
        raise VitlensError(f"{where}: OpenCLIP towers built from {named[0]} are not supported in a checkpoint")


def build_open_clip(spec: dict) -> nn.Module:
    """A randomly initialised OpenCLIP model from a checkpoint's spec (class and model config)."""
    import inspect

    import open_clip

    check_open_clip_spec(spec, "checkpoint")
    cls = getattr(open_clip, spec["name"])  # one of BUILDERS
    config = {k: v for k, v in spec["config"].items() if k != "custom_text"}
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "cast_dtype"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise VitlensError(f"checkpoint: unknown OpenCLIP model setting {unknown[0]!r}")
    return cls(**config)
