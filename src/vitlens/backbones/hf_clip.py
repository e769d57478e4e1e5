"""Adapter for Hugging Face ``CLIPModel``: its vision tower, with the text tower for prompts (:mod:`.image_text`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Preprocessing
from .hf_vit import _interpolation, _pair
from .image_text import ImageTextBackbone, Tokenizer
from .parts import BlockParts, UnsupportedParts, linear_parts


def is_hf_clip(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # no HF model can exist; skip the slow import
        return False
    from transformers import CLIPModel

    return isinstance(model, CLIPModel)


def hf_image_text_preprocessing(model: nn.Module, image_processor=None) -> Preprocessing:
    """Input size from the vision config; mean/std/resampling from ``image_processor`` (else CLIP's / 0.5)."""
    size = _pair(model.config.vision_config.image_size)
    if image_processor is not None:
        return Preprocessing(
            input_size=size,
            mean=tuple(float(v) for v in image_processor.image_mean),
            std=tuple(float(v) for v in image_processor.image_std),
            interpolation=_interpolation(getattr(image_processor, "resample", None)),
        )
    if model.config.model_type == "siglip":  # SiglipImageProcessor's defaults
        return Preprocessing(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return Preprocessing(input_size=size, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD),
                         interpolation="bicubic")  # fmt: skip


def features(out) -> Tensor:
    """``get_image_features`` / ``get_text_features`` output → the embedding tensor (transformers 4 returns
    it, 5 a model output whose ``pooler_output`` it is)."""
    return out if torch.is_tensor(out) else out.pooler_output


class _Layer(nn.Module):
    """An encoder layer called as ``layer(x)`` (Hugging Face's take the attention mask as a second argument)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x, None)
        return out[0] if isinstance(out, tuple) else out


class HFImageText(ImageTextBackbone):
    """Shared steps of the Hugging Face image–text adapters (vision encoder layers and attention capture)."""

    family = "hf-image-text"

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing | None = None,
        classes=None,
        *,
        class_embeddings: Tensor | None = None,
        tokenizer: Tokenizer | None = None,
        image_processor=None,
    ):
        layers = [_Layer(layer) for layer in model.vision_model.encoder.layers]
        super().__init__(
            model,
            preprocessing or hf_image_text_preprocessing(model, image_processor),
            classes,
            class_embeddings=class_embeddings,
            tokenizer=tokenizer,
        )
        self.__dict__["_layers"] = layers  # views of the model's layers, not modules of their own

    @property
    def vision(self) -> nn.Module:
        return self.model.vision_model

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.__dict__["_layers"]

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        e = self.vision.embeddings.patch_embedding(x.to(self.vision.embeddings.patch_embedding.weight.dtype))
        return e.flatten(2).transpose(1, 2), (e.shape[-2], e.shape[-1])

    def _position(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.vision.embeddings
        p = emb.patch_size
        if grid == (emb.image_size // p, emb.image_size // p):
            return emb.position_embedding(emb.position_ids)
        return emb.interpolate_pos_encoding(x, grid[0] * p, grid[1] * p)

    def attention_norm(self, index: int) -> nn.Module:
        return self.blocks[index].layer.layer_norm1

    def block_parts(self, block: nn.Module) -> BlockParts:
        layer = block.layer
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        expected = {
            layer: ("layer_norm1", "layer_norm2"),
            attn: ("q_proj", "k_proj", "v_proj", "out_proj", "scale", "num_heads"),
            mlp: ("fc1", "activation_fn", "fc2"),
        }
        if not all(hasattr(m, n) for m, names in expected.items() for n in names):
            raise UnsupportedParts(f"Hugging Face {type(layer).__name__} blocks of this transformers version")
        q, k, v = (linear_parts(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
        bias = None if q[1] is None else torch.cat([q[1], k[1], v[1]])
        identity = nn.Identity()
        return BlockParts(
            norm1=layer.layer_norm1,
            qkv=(torch.cat([q[0], k[0], v[0]]), bias),
            heads=attn.num_heads,
            scale=float(attn.scale),
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(attn.out_proj),
            norm2=layer.layer_norm2,
            fc1=linear_parts(mlp.fc1),
            act=mlp.activation_fn,
            fc2=linear_parts(mlp.fc2),
        )

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        found: list[Tensor] = []
        vision = self.vision
        saved = vision.config._attn_implementation
        handles = []
        record = lambda _m, _i, out: found.append(out[1])  # the attention returns (output, probabilities)
        try:
            vision.set_attn_implementation("eager")
            for block in self.blocks:
                handles.append(block.layer.self_attn.register_forward_hook(record))
            yield found
        finally:
            for h in handles:
                h.remove()
            vision.set_attn_implementation(saved)


class HFCLIP(HFImageText):
    family = "hf-clip"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None, **kwargs):
        if not is_hf_clip(model):
            raise VitlensError(f"{type(model).__name__} is not a Hugging Face CLIPModel")
        super().__init__(model, preprocessing, classes, **kwargs)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ("cls",)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.vision.embeddings
        cls = emb.class_embedding.view(1, 1, -1).expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)
        x = torch.cat([cls, embeddings], dim=1)
        return self.vision.pre_layrnorm(x + self._position(x, grid))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.vision.post_layernorm(x)

    def image_embedding(self, tokens: Tensor) -> Tensor:
        return self.model.visual_projection(tokens[:, 0])

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        return self.model.visual_projection(tokens)

    def head_linear(self) -> tuple[int | None, Callable[[Tensor], Tensor], Tensor]:
        proj = self.model.visual_projection
        if proj.bias is not None:
            raise UnsupportedParts("CLIP projections with a bias")
        return 0, nn.Identity(), proj.weight

    def encode_text(self, inputs: dict[str, Tensor]) -> Tensor:
        return features(self.model.get_text_features(**inputs))
