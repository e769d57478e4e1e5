"""The attention family: raw attention and attention rollout (Abnar & Zuidema, ACL 2020)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..backbones import Backbone, Trace
from ..backbones.probe import AttentionProbe
from ..errors import VitlensError
from .base import Explainer, register
from .targets import Target


def readout_rollout(
    readout: Tensor, batch: int, blocks: Sequence[int], matrix_rows: Callable[[int, slice | None], Tensor]
) -> Tensor:
    """``r · N_L ⋯ N_1`` for the readout row ``r`` and per-block matrices N_b, as vector-matrix products from the
    last block down; ``[batch, T]``.

    ``readout`` is the backbone's :meth:`~vitlens.backbones.Backbone.readout` ``[T]`` (on the CPU). ``matrix_rows(b,
    rows)`` gives the rows ``rows`` of N_b ``[B, R, T]`` (all ``T`` for ``None``). Only the first product (the last
    block) reads a subset: the span of rows where the readout is non-zero (the class token's row for a class-token
    model); every later product reads full rows, as the row vector is then dense. The T×T product of the
    matrices is never formed, and nothing waits for the device.
    """
    nonzero = readout.nonzero()[:, 0].tolist()
    first, last = nonzero[0], nonzero[-1] + 1
    rows = None if last - first == len(readout) else slice(first, last)
    row = None
    for b in reversed(blocks):
        n = matrix_rows(b, rows)
        if row is None:
            row = readout[rows or slice(None)].to(n.device, n.dtype, non_blocking=True).expand(batch, -1)
        row = torch.bmm(row[:, None], n)[:, 0]
        rows = None
    return row


def identity_rows(rows: slice | None, t: int, like: Tensor) -> Tensor:
    """Rows ``rows`` of the T×T identity (all of it for ``None``), in ``like``'s dtype and device."""
    eye = torch.eye(t, dtype=like.dtype, device=like.device)
    return eye if rows is None else eye[rows]


def probed_run(backbone: Backbone, images: Tensor, blocks: Sequence[int] | None = None) -> tuple[Trace, AttentionProbe]:
    """One forward pass (the model's own attention kernel) reading the attention of ``blocks``."""
    with backbone.probe_attention(blocks) as probe:
        trace = backbone.run(images)
    return trace, probe


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
    cost = "1 forward + every block's attention recomputed from its queries and keys"
    meaning = "how much each patch feeds the readout token through all attention layers (class-agnostic)"
    class_specific = False

    def __init__(self, model, *, start_layer: int = 0):
        super().__init__(model)
        self.start_layer = block_index(self.name, "start_layer", start_layer, len(self.backbone.blocks))

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        bb = self.backbone
        trace, probe = probed_run(bb, images, range(self.start_layer, len(bb.blocks)))
        t = trace.hidden[0].shape[1]

        def residual(b: int, rows: slice | None) -> Tensor:  # Â = (Ā + I) / rowsum = (Ā + I) / 2, rows of it
            a = probe.probabilities(b, rows).mean(1)
            return a.add_(identity_rows(rows, t, a)).mul_(0.5)  # softmax rows sum to one

        row = readout_rollout(bb.readout(t), len(images), probe.blocks, residual)
        return trace.to_grid(row[:, trace.num_prefix_tokens :]), trace.logits


@register
class Attention(Explainer):
    """Raw attention: the last block's attention from the class token to every patch, heads averaged."""

    name = "attention"
    needs_global_attention = True
    paper = "raw attention: last block, class-token row, heads averaged"
    cost = "1 forward + the last block's class-token row recomputed from its queries and keys"
    meaning = "where the class token looks in the last block (class-agnostic)"
    class_specific = False

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        cls = self.backbone.class_token_index
        if cls is None:
            raise VitlensError("method 'attention' needs a class token; this model has none (try rollout)")
        trace, probe = probed_run(self.backbone, images, [-1])
        row = probe.probabilities(-1, slice(cls, cls + 1)).mean(1)[:, 0]
        return trace.to_grid(row[:, trace.num_prefix_tokens :]), trace.logits


def block_index(method: str, name: str, value, blocks: int) -> int:
    """A block index in ``0 .. blocks - 1`` (negative values count from the end), or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or not -blocks <= value < blocks:
        raise VitlensError(f"{method}: {name} must be a block index in {-blocks}..{blocks - 1}, got {value!r}")
    return value % blocks
