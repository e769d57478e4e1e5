"""The attention family: raw attention and attention rollout (Abnar & Zuidema, ACL 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import VitlensError
from .base import Explainer, register
from .targets import Target


def rollout_rows(attentions: list[Tensor], start: Tensor, residual: bool = True) -> Tensor:
    """Propagate the readout row ``start`` [B, T] down through the blocks, last to first.

    Each block's matrix is the head-mean attention, with the identity added for the residual path
    and rows renormalised: Â = (A + I) / rowsum. The result is ``start · Â_L ⋯ Â_1`` [B, T],
    computed as vector-matrix products (never forming the T×T rollout product).
    """
    row = start
    for a in reversed(attentions):
        a = a.mean(1)
        if residual:
            a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = a / a.sum(-1, keepdim=True)
        row = torch.bmm(row[:, None], a)[:, 0]
    return row


@register
class Rollout(Explainer):
    """Attention rollout: the head-mean attention of every block, with the identity added for the residual
    path and rows renormalised, multiplied from the last block down and read at the model's readout row.

    Args:
        start_layer: the first block rolled out (0: all blocks; Chefer et al.'s evaluation uses 1).
    """

    name = "rollout"
    needs_global_attention = True
    paper = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"
    cost = "1 forward (explicit attention)"
    meaning = "how much each patch feeds the readout token through all attention layers (class-agnostic)"
    class_specific = False

    def __init__(self, model, *, start_layer: int = 0):
        super().__init__(model)
        self.start_layer = block_index(self.name, "start_layer", start_layer, len(self.backbone.blocks))

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        trace = self.backbone.run(images, attention=True)
        t = trace.attentions[0].shape[-1]
        start = self.backbone.readout(t).expand(len(images), t)
        row = rollout_rows(trace.attentions[self.start_layer :], start)
        return trace.to_grid(row[:, trace.num_prefix_tokens :]), trace.logits


@register
class Attention(Explainer):
    """Raw attention: the last block's attention from the class token to every patch, heads averaged."""

    name = "attention"
    needs_global_attention = True
    paper = "raw attention: last block, class-token row, heads averaged"
    cost = "1 forward (explicit attention)"
    meaning = "where the class token looks in the last block (class-agnostic)"
    class_specific = False

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        cls = self.backbone.class_token_index
        if cls is None:
            raise VitlensError("method 'attention' needs a class token; this model has none (try rollout)")
        trace = self.backbone.run(images, attention=True)
        row = trace.attentions[-1].mean(1)[:, cls]
        return trace.to_grid(row[:, trace.num_prefix_tokens :]), trace.logits


def block_index(method: str, name: str, value, blocks: int) -> int:
    """A block index in ``0 .. blocks - 1`` (negative values count from the end), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or not -blocks <= value < blocks:
        raise VitlensError(f"{method}: {name} must be a block index in {-blocks}..{blocks - 1}, got {value!r}")
    return value % blocks
