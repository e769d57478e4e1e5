"""Adapter for Hugging Face ``ViTForImageClassification`` and ``DeiTForImageClassification[WithTeacher]``, and
for ``ViTModel`` / ``DeiTModel`` without a classifier head (their output is an embedding)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import NO_HEAD, Backbone, Preprocessing, check_embedding, pool_embedding
from .parts import BlockParts, HeadParts, UnsupportedParts, embedding_head, linear_parts
from .probe import AttentionProbe, RecomputedAttention, block_indices, heads_of

_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resampling codes


def _classes() -> tuple[type, ...]:
    from transformers import (
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        DeiTModel,
        ViTForImageClassification,
        ViTModel,
    )

    return (ViTForImageClassification, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
            ViTModel, DeiTModel)  # fmt: skip


def is_hf_vit(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # no HF model can exist; skip the slow import
        return False
    return isinstance(model, _classes())


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, Sequence) else (int(v), int(v))


def _interpolation(resample) -> str:
    """An image processor's ``resample`` (PIL code or enum) → ``"nearest" | "bilinear" | "bicubic"``."""
    name = getattr(resample, "name", None) or _RESAMPLE_NAMES.get(resample, "bilinear")
    name = name.lower()
    return name if name in _RESAMPLE_NAMES.values() else "bilinear"


def hf_preprocessing(model: nn.Module, image_processor=None) -> Preprocessing:
    """Input size from the config; mean/std/resampling from ``image_processor`` (else the ViT default 0.5)."""
    size = _pair(model.config.image_size)
    if image_processor is None:
        return Preprocessing(input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    return Preprocessing(
        input_size=size,
        mean=tuple(float(v) for v in image_processor.image_mean),
        std=tuple(float(v) for v in image_processor.image_std),
        interpolation=_interpolation(getattr(image_processor, "resample", None)),
    )


def _default_classes(model: nn.Module) -> list[str] | None:
    """The config's ``id2label`` names, unless they are the ``LABEL_i`` placeholders."""
    labels = [str(model.config.id2label.get(i, i)) for i in range(model.config.num_labels)]
    return None if labels == [f"LABEL_{i}" for i in range(len(labels))] else labels


def _has_head(model: nn.Module) -> bool:
    return any(isinstance(getattr(model, n, None), nn.Linear) for n in ("classifier", "cls_classifier"))


class HFViT(Backbone):
    """Hugging Face ViT / DeiT.

    Args:
        model: a ``ViTForImageClassification``, ``DeiTForImageClassification[WithTeacher]``, ``ViTModel`` or
            ``DeiTModel``.
        preprocessing: input size, mean and std (default: from ``image_processor``, else 0.5 / 0.5).
        classes: class names (default: the config's ``id2label`` unless they are placeholders).
        image_processor: the checkpoint's image processor, read for the preprocessing.
        embedding: for a model without a classifier head, its output: ``"cls"`` (the final-normed class
            token; the default) or ``"mean"`` (the mean of the final-normed patch tokens). ``ViTModel``'s
            pooler (a dense layer and tanh on the class token) is not part of it. Ignored by classifiers.
    """

    family = "hf"

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing | None = None,
        classes=None,
        image_processor=None,
        embedding: str = "cls",
    ):
        if not is_hf_vit(model):
            raise VitlensError(f"{type(model).__name__} is not a Hugging Face ViT / DeiT model")
        self.embedding = check_embedding(embedding)
        if classes is None and _has_head(model):
            classes = _default_classes(model)
        super().__init__(model, preprocessing or hf_preprocessing(model, image_processor), classes)

    @property
    def base(self) -> nn.Module:
        """The ``ViTModel`` / ``DeiTModel`` inside the classifier."""
        return self.model.base_model

    @property
    def distilled(self) -> bool:
        """Two heads (class and distillation token), as in ``DeiTForImageClassificationWithTeacher``."""
        return hasattr(self.model, "distillation_classifier")

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels if _has_head(self.model) else 0

    @property
    def pooling(self) -> str:
        return "avg" if self.headless and self.embedding == "mean" else "token"

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        # every DeiT model carries the distillation token, also the one with a single (class-token) head
        return ("cls", "dist") if hasattr(self.base.embeddings, "distillation_token") else ("cls",)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.base.layers

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.base.embeddings.patch_embeddings
        ph, pw = _pair(pe.patch_size)
        return pe(x), (x.shape[-2] // ph, x.shape[-1] // pw)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.base.embeddings
        prefix = [emb.cls_token]
        if "dist" in self.prefix_kinds:
            prefix.append(emb.distillation_token)
        b = embeddings.shape[0]
        x = torch.cat([p.expand(b, -1, -1) for p in prefix] + [embeddings], dim=1)
        ph, pw = _pair(emb.patch_embeddings.patch_size)
        h, w = _pair(emb.patch_embeddings.image_size)
        if grid == (h // ph, w // pw):
            pos = emb.position_embeddings
        else:
            pos = emb.interpolate_pos_encoding(x, grid[0] * ph, grid[1] * pw)
        return emb.dropout(x + pos)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.base.layernorm(x)

    def head(self, tokens: Tensor) -> Tensor:
        m = self.model
        if self.headless:
            return pool_embedding(tokens, self.embedding, self.num_prefix_tokens)
        if self.distilled:
            return (m.cls_classifier(tokens[:, 0]) + m.distillation_classifier(tokens[:, 1])) / 2
        return m.classifier(tokens[:, 0])

    def token_logits(self, tokens: Tensor) -> Tensor:
        m = self.model
        if self.headless:
            raise VitlensError(NO_HEAD)
        if self.distilled:
            return (m.cls_classifier(tokens) + m.distillation_classifier(tokens)) / 2
        return m.classifier(tokens)

    def readout(self, num_tokens: int) -> Tensor:
        if self.headless and self.embedding == "cls":  # the class token alone, also beside a distillation token
            w = torch.zeros(num_tokens)
            w[0] = 1.0
            return w
        return super().readout(num_tokens)

    def attention_norm(self, index: int) -> nn.Module:
        return self.blocks[index].layernorm_before

    def block_parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = getattr(block, "attention", None), getattr(block, "mlp", None)
        expected = {
            block: ("layernorm_before", "layernorm_after"),
            attn: ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads"),
            mlp: ("fc1", "activation_fn", "fc2"),
        }
        if not all(hasattr(m, n) for m, names in expected.items() for n in names):
            raise UnsupportedParts(f"Hugging Face {type(block).__name__} blocks of this transformers version")
        q, k, v = (linear_parts(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
        bias = None if q[1] is None else torch.cat([q[1], k[1], v[1]])
        identity = nn.Identity()
        return BlockParts(
            norm1=block.layernorm_before,
            qkv=(torch.cat([q[0], k[0], v[0]]), bias),
            heads=attn.num_attention_heads,
            scale=float(attn.scaling),
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(attn.o_proj),
            norm2=block.layernorm_after,
            fc1=linear_parts(mlp.fc1),
            act=mlp.activation_fn,
            fc2=linear_parts(mlp.fc2),
        )

    def head_parts(self) -> HeadParts:
        m = self.model
        if self.headless:
            index = 0 if self.embedding == "cls" else None
            return embedding_head(self.model.config.hidden_size, self.base.layernorm.weight, index)
        if self.distilled:
            return HeadParts([(0, linear_parts(m.cls_classifier)), (1, linear_parts(m.distillation_classifier))],
                             nn.Identity())  # fmt: skip
        return HeadParts([(self.class_token_index, linear_parts(m.classifier))], nn.Identity())

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        found: list[Tensor] = []
        saved = self.model.config._attn_implementation
        handles = []
        record = lambda _m, _i, out: found.append(out[1])  # ViTAttention returns (output, probabilities)
        try:
            self.model.set_attn_implementation("eager")
            for block in self.blocks:
                handles.append(block.attention.register_forward_hook(record))
            yield found
        finally:
            for h in handles:
                h.remove()
            self.model.set_attn_implementation(saved)

    @contextlib.contextmanager
    def probe_attention(
        self, blocks: Sequence[int] | None = None, *, gradients: bool = False
    ) -> Iterator[AttentionProbe]:
        """q, k and v hooked at the outputs of ``q_proj`` / ``k_proj`` / ``v_proj``, the per-head output at the
        input of ``o_proj``; the model's attention implementation (``sdpa`` by default) is left as it is.
        Attention modules of other layouts fall back to the explicit (eager) path."""
        indices = block_indices(blocks, len(self.blocks))
        attns = [getattr(self.blocks[i], "attention", None) for i in indices]
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads")
        if not all(all(hasattr(a, n) for n in names) for a in attns):
            with super().probe_attention(indices, gradients=gradients) as probe:
                yield probe
            return
        scale = {i: float(a.scaling) for i, a in zip(indices, attns, strict=True)}
        probe = RecomputedAttention(indices, len(self.blocks), scale, gradients)

        def record(i: int, name: str, heads: int, _module, _inputs, out: Tensor) -> None:
            probe.record(i, **{name: heads_of(out, heads)})

        def record_out(i: int, heads: int, _module, inputs: tuple) -> None:
            probe.record(i, out=inputs[0], out_heads=partial(heads_of, heads=heads))

        handles = []
        try:
            for i, attn in zip(indices, attns, strict=True):
                heads = attn.num_attention_heads
                wanted = {"q": attn.q_proj, "k": attn.k_proj, **({"v": attn.v_proj} if gradients else {})}
                for name, module in wanted.items():
                    handles.append(module.register_forward_hook(partial(record, i, name, heads)))
                if gradients:
                    handles.append(attn.o_proj.register_forward_pre_hook(partial(record_out, i, heads)))
            yield probe
        finally:
            for h in handles:
                h.remove()
