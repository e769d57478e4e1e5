"""Adapter for Hugging Face DINOv2: ``Dinov2Model``, ``Dinov2ForImageClassification`` and their
``Dinov2WithRegisters…`` variants (register tokens after the class token, layer scale, optional SwiGLU MLP).

The classifier of ``…ForImageClassification`` reads the concatenation of the class token and the mean of
the patch tokens (registers left out). ``Dinov2Model`` has no classifier: its output is an embedding, the
class token or the mean of the patch tokens (``embedding``), explained through a score function such as
:class:`~vitlens.EmbeddingSimilarity`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import NO_HEAD, Backbone, Preprocessing, check_embedding, pool_embedding
from .hf_vit import _default_classes, _interpolation, _pair
from .parts import BlockParts, HeadParts, UnsupportedParts, embedding_head, linear_parts


def _classes() -> tuple[type, ...]:
    from transformers import (
        Dinov2ForImageClassification,
        Dinov2Model,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersModel,
    )

    return (Dinov2Model, Dinov2ForImageClassification,
            Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification)  # fmt: skip


def is_hf_dinov2(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # no HF model can exist; skip the slow import
        return False
    return isinstance(model, _classes())


def _has_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "classifier", None), nn.Linear)


def dinov2_preprocessing(model: nn.Module, image_processor=None) -> Preprocessing:
    """Input size: the processor's centre crop (DINOv2 checkpoints: 224, their config says 518), else the
    config's image size; mean/std/resampling from the processor, else ImageNet's with bicubic resampling."""
    if image_processor is None:
        return Preprocessing(input_size=_pair(model.config.image_size), interpolation="bicubic")
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    side = (lambda k: crop.get(k)) if isinstance(crop, dict) else (lambda k: getattr(crop, k, None))  # or a SizeDict
    if crop is not None and side("height") and side("width"):
        size = (int(side("height")), int(side("width")))
    else:
        size = _pair(model.config.image_size)
    return Preprocessing(
        input_size=size,
        mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std),
        interpolation=_interpolation(getattr(image_processor, "resample", None)),
    )


class HFDinov2(Backbone):
    """DINOv2 (with or without registers) from Hugging Face transformers.

    Args:
        model: a ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` or
            ``Dinov2WithRegistersForImageClassification``.
        preprocessing: input size, mean and std (default: from ``image_processor``, else the config's size
            with ImageNet's mean and std).
        classes: class names (default: the config's ``id2label`` unless they are placeholders).
        image_processor: the checkpoint's image processor, read for the preprocessing.
        embedding: for a model without a classifier head, its output: ``"cls"`` (the final-normed class
            token, the ``pooler_output`` of ``Dinov2Model``; the default) or ``"mean"`` (the mean of the
            final-normed patch tokens, registers left out). Ignored by the classifiers.

    Examples:
        >>> from transformers import Dinov2Model
        >>> backbone = HFDinov2(Dinov2Model.from_pretrained("facebook/dinov2-small"), embedding="mean")
        >>> target = vitlens.EmbeddingSimilarity.of_image(backbone, reference_image)
        >>> vitlens.explain(backbone, images, method="gradcam", target=target)
    """

    family = "hf-dinov2"

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing | None = None,
        classes=None,
        image_processor=None,
        embedding: str = "cls",
    ):
        if not is_hf_dinov2(model):
            raise VitlensError(f"{type(model).__name__} is not a Hugging Face DINOv2 model")
        self.embedding = check_embedding(embedding)
        if classes is None and _has_head(model):
            classes = _default_classes(model)
        super().__init__(model, preprocessing or dinov2_preprocessing(model, image_processor), classes)

    @property
    def base(self) -> nn.Module:
        """The ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (the model itself when it has no head)."""
        return self.model.base_model

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels if _has_head(self.model) else 0

    @property
    def num_registers(self) -> int:
        tokens = getattr(self.base.embeddings, "register_tokens", None)
        return 0 if tokens is None else tokens.shape[1]

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ("cls",) + ("reg",) * self.num_registers

    @property
    def pooling(self) -> str:
        return "avg" if self.headless and self.embedding == "mean" else "token"

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.base.encoder.layer

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.base.embeddings.patch_embeddings
        ph, pw = _pair(pe.patch_size)
        return pe(x), (x.shape[-2] // ph, x.shape[-1] // pw)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.base.embeddings
        b = embeddings.shape[0]
        x = torch.cat([emb.cls_token.expand(b, -1, -1), embeddings], dim=1)
        ph, pw = _pair(emb.patch_embeddings.patch_size)
        x = x + emb.interpolate_pos_encoding(x, grid[0] * ph, grid[1] * pw)  # the position table as it is, or resized
        if self.num_registers:  # registers go after the class token and carry no position embedding
            x = torch.cat([x[:, :1], emb.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return emb.dropout(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.base.layernorm(x)

    def head(self, tokens: Tensor) -> Tensor:
        if self.headless:
            return pool_embedding(tokens, self.embedding, self.num_prefix_tokens)
        pooled = torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens :].mean(1)], dim=-1)
        return self.model.classifier(pooled)

    def token_logits(self, tokens: Tensor) -> Tensor:
        """The classifier applied to each token as if it were every token of the image: the head's input is
        ``concat(token, token)`` (class token and patch mean alike)."""
        if self.headless:
            raise VitlensError(NO_HEAD)
        return self.model.classifier(torch.cat([tokens, tokens], dim=-1))

    def readout(self, num_tokens: int) -> Tensor:
        """The classifier reads the class token and the patch mean alike: ½ on the class token, ½ spread over
        the patches (registers 0). Without a head: the embedding's token(s)."""
        if self.headless:
            return super().readout(num_tokens)
        p = self.num_prefix_tokens
        w = torch.zeros(num_tokens)
        w[0] = 0.5
        w[p:] = 0.5 / (num_tokens - p)
        return w

    def attention_norm(self, index: int) -> nn.Module:
        return self.blocks[index].norm1

    def block_parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = getattr(block, "attention", None), getattr(block, "mlp", None)
        expected = {
            block: ("norm1", "norm2", "layer_scale1", "layer_scale2"),
            attn: ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads"),
        }
        if not all(hasattr(m, n) for m, names in expected.items() for n in names):
            raise UnsupportedParts(f"Hugging Face {type(block).__name__} blocks of this transformers version")
        q, k, v = (linear_parts(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
        bias = None if q[1] is None else torch.cat([q[1], k[1], v[1]])
        gamma1, gamma2 = block.layer_scale1.lambda1, block.layer_scale2.lambda1
        if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):  # SwiGLU
            fc1, act, gate, fc2 = mlp.gate_proj, mlp.act_fn, linear_parts(mlp.up_proj), mlp.down_proj
        elif all(hasattr(mlp, n) for n in ("fc1", "activation_fn", "fc2")):
            fc1, act, gate, fc2 = mlp.fc1, mlp.activation_fn, None, mlp.fc2
        else:
            raise UnsupportedParts(f"Hugging Face {type(mlp).__name__} MLPs")
        identity = nn.Identity()
        return BlockParts(
            norm1=block.norm1,
            qkv=(torch.cat([q[0], k[0], v[0]]), bias),
            heads=attn.num_attention_heads,
            scale=float(attn.scaling),
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(attn.o_proj, gamma1),
            norm2=block.norm2,
            fc1=linear_parts(fc1),
            act=act,
            fc2=linear_parts(fc2, gamma2),
            gate=gate,
        )

    def head_parts(self) -> HeadParts:
        """Without a head: the identity on the embedding. With one: the classifier's two halves, one on the
        class token and one on the patch mean, each doubled (the logits are the heads' mean)."""
        if self.headless:
            index = 0 if self.embedding == "cls" else None
            return embedding_head(self.model.config.hidden_size, self.base.layernorm.weight, index)
        w, b = linear_parts(self.model.classifier)
        d = w.shape[1] // 2
        return HeadParts([(0, (2 * w[:, :d], b)), (None, (2 * w[:, d:], b))], nn.Identity())

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        with eager_attention(self.model, [block.attention for block in self.blocks]) as found:
            yield found


@contextlib.contextmanager
def eager_attention(model: nn.Module, modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """A transformers model switched to its eager attention (explicit probabilities) for the duration, the
    probabilities each of ``modules`` returns (``(output, probabilities)``) collected in order.

    ``config._attn_implementation`` (``"sdpa"``, ``"flash_attention_2"``, …) is restored afterwards, also
    on error, so the model's plain forward keeps its fused kernel.
    """
    found: list[Tensor] = []
    saved = model.config._attn_implementation
    handles = []

    def record(module, _inputs, out):
        if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
            raise VitlensError(f"{type(module).__name__} returned no attention probabilities in eager mode")
        found.append(out[1])

    try:
        model.set_attn_implementation("eager")
        if model.config._attn_implementation != "eager":
            raise VitlensError(f"{type(model).__name__}: cannot switch to eager attention to read its probabilities")
        handles = [m.register_forward_hook(record) for m in modules]
        yield found
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(saved)
