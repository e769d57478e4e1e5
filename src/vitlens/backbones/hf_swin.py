"""Adapter for Hugging Face Swin and Swin V2 (``Swin[v2]ForImageClassification`` and the headless
``Swin[v2]Model``), on the last stage's grid."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Preprocessing
from .hf_vit import _default_classes, _pair, hf_preprocessing
from .hierarchical import HierarchicalBackbone


def _classes() -> tuple[type, ...]:
    from transformers import SwinForImageClassification, SwinModel, Swinv2ForImageClassification, Swinv2Model

    return SwinForImageClassification, SwinModel, Swinv2ForImageClassification, Swinv2Model


def is_hf_swin(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # no HF model can exist; skip the slow import
        return False
    return isinstance(model, _classes())


class HFSwin(HierarchicalBackbone):
    """Hugging Face Swin / Swin V2: ``embeddings`` → ``encoder.layers`` (stages, each ending with its patch
    merging) → ``layernorm`` → ``pooler`` (mean) → ``classifier``.

    A ``Swin[v2]Model`` without a classifier gives its pooled embedding as the output (``num_classes`` 0):
    explain it with a score function such as :class:`~vitlens.EmbeddingSimilarity`.
    """

    family = "hf-swin"

    def __init__(
        self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None, image_processor=None
    ):
        if not is_hf_swin(model):
            raise VitlensError(f"{type(model).__name__} is not a Hugging Face Swin / Swin V2 model")
        super().__init__(
            model,
            preprocessing or hf_preprocessing(model, image_processor),
            classes if classes is not None or not self._has_head(model) else _default_classes(model),
        )

    @staticmethod
    def _has_head(model: nn.Module) -> bool:
        return isinstance(getattr(model, "classifier", None), nn.Linear)

    @property
    def base(self) -> nn.Module:
        """The ``Swin[v2]Model`` (the model itself when it has no classifier)."""
        return self.model.base_model

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels if self._has_head(self.model) else 0

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.base.encoder.layers

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        e, grid = self.base.embeddings.patch_embeddings(x)  # pads the image to whole patches, as the model does
        return e, (int(grid[0]), int(grid[1]))

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.base.embeddings
        x = emb.norm(embeddings)
        if emb.position_embeddings is not None:
            if tuple(grid) == tuple(emb.patch_grid):
                x = x + emb.position_embeddings
            else:
                ph, pw = _pair(emb.patch_size)
                x = x + emb.interpolate_pos_encoding(x, grid[0] * ph, grid[1] * pw)
        return emb.dropout(x)

    def stage(self, index: int, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        stage = self.blocks[index]
        out = stage(x, grid)[0]
        if stage.downsample is not None:
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        return out, grid

    def final_norm(self, x: Tensor) -> Tensor:
        return self.base.layernorm(x)

    def head(self, tokens: Tensor) -> Tensor:
        pooler = self.base.pooler
        pooled = tokens.mean(1) if pooler is None else torch.flatten(pooler(tokens.transpose(1, 2)), 1)
        return self.model.classifier(pooled) if self._has_head(self.model) else pooled

    def token_logits(self, tokens: Tensor) -> Tensor:
        return self.model.classifier(tokens) if self._has_head(self.model) else tokens

    def last_stage_norm(self) -> nn.Module:
        return self.blocks[-1].blocks[-1].layernorm_after
