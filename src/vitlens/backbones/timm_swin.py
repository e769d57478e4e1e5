"""Adapter for timm's Swin Transformer (``SwinTransformer``, ``SwinTransformerV2``) on its last stage's grid."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..errors import VitlensError
from .base import Preprocessing
from .hierarchical import HierarchicalBackbone
from .timm_vit import timm_preprocessing


def _classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformer, SwinTransformerV2


def is_timm_swin(model: nn.Module) -> bool:
    try:
        return isinstance(model, _classes())
    except ImportError:  # pragma: no cover - timm is a dependency
        return False


class TimmSwin(HierarchicalBackbone):
    """timm's Swin: ``patch_embed`` (with its norm) → ``layers`` (stages, NHWC) → ``norm`` → ``head``.

    The head is the model's own ``ClassifierHead`` (average pooling, then ``fc``); PM applies ``head.fc`` to
    every final-normed token of the last stage.
    """

    family = "timm-swin"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None):
        if model.global_pool != "avg":
            raise VitlensError(f"timm Swin with global_pool={model.global_pool!r} is not supported (use 'avg')")
        super().__init__(model, preprocessing or timm_preprocessing(model), classes)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.layers

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        e = self.model.patch_embed(x)  # NHWC
        return e.flatten(1, 2), (e.shape[1], e.shape[2])

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        return embeddings  # no prefix tokens; the patch embedding's norm is part of ``patch_embed``

    def stage(self, index: int, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        out = self.model.layers[index](x.reshape(x.shape[0], *grid, x.shape[-1]))
        return out.flatten(1, 2), (out.shape[1], out.shape[2])

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def head(self, tokens: Tensor) -> Tensor:
        # the head pools NHWC maps over H and W: the tokens as an N×1 map give the same mean
        return self.model.forward_head(tokens[:, :, None, :])

    def token_logits(self, tokens: Tensor) -> Tensor:
        return self.model.head.fc(tokens)

    def last_stage_norm(self) -> nn.Module:
        return self.model.layers[-1].blocks[-1].norm2
