"""The attention family: raw attention and attention rollout (Abnar & Zuidema, ACL 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import VitlensError
from .base import Explainer, register


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
    name = "rollout"
    paper = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"
    cost = "1 forward (explicit attention)"

    @torch.no_grad()
    def explain(self, images: Tensor, target) -> Tensor:
        trace = self.backbone.run(images, attention=True)
        t = trace.attentions[0].shape[-1]
        start = self.backbone.readout(t).expand(len(images), t)
        row = rollout_rows(trace.attentions, start)
        return trace.to_grid(row[:, trace.num_prefix_tokens :])


@register
class Attention(Explainer):
    name = "attention"
    paper = "raw attention: last block, class-token row, heads averaged"
    cost = "1 forward (explicit attention)"

    @torch.no_grad()
    def explain(self, images: Tensor, target) -> Tensor:
        cls = self.backbone.class_token_index
        if cls is None:
            raise VitlensError("method 'attention' needs a class token; this model has none (try rollout)")
        trace = self.backbone.run(images, attention=True)
        row = trace.attentions[-1].mean(1)[:, cls]
        return trace.to_grid(row[:, trace.num_prefix_tokens :])
