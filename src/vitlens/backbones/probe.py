"""Reading attention probabilities, and their gradients, next to the model's own (fused) attention.

A fused attention kernel (``F.scaled_dot_product_attention``) never writes the attention matrix
``A = softmax(q kᵀ · scale)``. Methods that read it (raw attention, rollout, GAE, attention flow) used to switch
every block to the explicit path instead. An :class:`AttentionProbe` keeps the model's forward as it is and
records, for the blocks a method reads, the queries and keys the block computed; ``A`` is recomputed from
them afterwards, only for the rows the method needs. For gradient methods it also records the values ``V``
and the per-head attention output ``O = A V``: as the score depends on ``A`` only through ``O``,

    ∂score/∂A = (∂score/∂O) · Vᵀ        (per head),

so one backward pass through the fused forward gives the attention gradients of every block.

:meth:`Backbone.probe_attention <vitlens.backbones.Backbone.probe_attention>` returns a probe; families whose
attention can be hooked fill a :class:`RecomputedAttention`, the others fall back to
:class:`RecordedAttention` (the explicit path's matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Rows = slice | Sequence[int] | Tensor | None
_HALF = (torch.float16, torch.bfloat16)


class AttentionProbe:
    """The attention of some blocks during one forward pass run inside ``Backbone.probe_attention``.

    Attributes:
        blocks: the probed block indices, ascending.
    """

    def __init__(self, blocks: Sequence[int], num_blocks: int):
        self.blocks = list(blocks)
        self.num_blocks = num_blocks

    def index(self, block: int) -> int:
        """``block`` (negative counts from the end) as a probed block index, or a ``KeyError``."""
        b = block % self.num_blocks if -self.num_blocks <= block < self.num_blocks else block
        if b not in self.blocks:
            raise KeyError(f"block {block} was not probed (probed: {self.blocks})")
        return b

    def probabilities(self, block: int, rows: Rows = None) -> Tensor:
        """Attention probabilities of ``block`` for the query ``rows``: ``[B, heads, R, T]`` (float32 under autocast).

        Args:
            block: a probed block index.
            rows: query token indices (a slice selects them with no host–device copy); ``None`` for all ``T``.

        Returns:
            The softmax rows, each summing to one.
        """
        raise NotImplementedError

    def backward(self, score: Tensor) -> None:
        """One backward pass from the scalar ``score`` (computed from the probed forward pass); afterwards
        :meth:`gradient` gives ∂score/∂A of every probed block."""
        raise NotImplementedError

    def gradient(self, block: int, rows: Rows = None) -> Tensor:
        """∂score/∂A of ``block`` for the query ``rows``: ``[B, heads, R, T]`` (after :meth:`backward`)."""
        raise NotImplementedError


class RecordedAttention(AttentionProbe):
    """The fallback: every block's full probabilities as the explicit path recorded them (``capture_attention``)."""

    def __init__(self, found: list[Tensor], blocks: Sequence[int], num_blocks: int):
        super().__init__(blocks, num_blocks)
        self.found = found
        self.grads: dict[int, Tensor] = {}

    def _matrix(self, block: int) -> Tensor:
        if len(self.found) < self.num_blocks:
            raise RuntimeError("probe_attention: no forward pass ran inside the with body")
        return self.found[len(self.found) - self.num_blocks + self.index(block)]

    def probabilities(self, block: int, rows: Rows = None) -> Tensor:
        a = self._matrix(block)
        return _wide(a if rows is None else a[:, :, rows])

    def backward(self, score: Tensor) -> None:
        mats = [self._matrix(b) for b in self.blocks]
        self.grads = dict(zip(self.blocks, torch.autograd.grad(score, mats), strict=True))

    def gradient(self, block: int, rows: Rows = None) -> Tensor:
        g = self.grads[self.index(block)]
        return g if rows is None else g[:, :, rows]


@dataclass
class _Block:
    q: Tensor | None = None  # [B, heads, T, d]: after q/k norms (and rotary embeddings), before the scale
    k: Tensor | None = None
    v: Tensor | None = None
    out: Tensor | None = None  # a tensor of the forward graph from which ∂score/∂O follows
    out_heads: Callable[[Tensor], Tensor] | None = None  # ∂score/∂out → ∂score/∂O [B, heads, T, d]
    grad: Tensor | None = None


class RecomputedAttention(AttentionProbe):
    """Queries and keys recorded during a fused forward pass; probabilities recomputed for the rows asked for.

    A family's ``probe_attention`` hooks its attention modules and calls :meth:`record` with what the block
    computed; with ``gradients=True`` it also records the values and a tensor of the forward graph that
    determines the per-head attention output ``O`` (the output itself, or a linear function of it).

    Args:
        blocks: the probed block indices.
        num_blocks: the model's number of blocks.
        scale: the logit scale of each probed block (``{block: scale}``).
        gradients: whether values and outputs are recorded (for :meth:`backward`).
        bias: an additive bias on a block's logits (``{block: [..., T, T]}``), if the family has one.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        num_blocks: int,
        scale: dict[int, float],
        gradients: bool = False,
        bias: dict[int, Tensor] | None = None,
    ):
        super().__init__(blocks, num_blocks)
        self.scale = scale
        self.gradients = gradients
        self.bias = bias or {}
        self.records: dict[int, _Block] = {b: _Block() for b in self.blocks}

    def record(self, block: int, **tensors) -> None:
        """Store what ``block`` computed (``q``, ``k``, ``v``, ``out``, ``out_heads``), replacing an earlier pass's."""
        rec = self.records[block]
        for name, value in tensors.items():
            setattr(rec, name, value)

    def _get(self, block: int, name: str) -> Tensor:
        value = getattr(self.records[self.index(block)], name)
        if value is None:
            raise RuntimeError(f"probe_attention: block {block} recorded no {name} (did a forward pass run inside?)")
        return value

    def probabilities(self, block: int, rows: Rows = None) -> Tensor:
        q, k = self._get(block, "q"), self._get(block, "k")
        if rows is not None:
            q = q[:, :, rows]
        t = k.shape[-2]
        logits = _products(q * self.scale[self.index(block)], k)
        bias = self.bias.get(self.index(block))
        if bias is not None:
            logits[..., :t] += bias if rows is None else bias[..., rows, :]
        logits[..., t:] = float("-inf")  # the padding columns get probability zero
        return logits.softmax(-1, dtype=torch.float32 if logits.dtype in _HALF else logits.dtype)[..., :t]

    def backward(self, score: Tensor) -> None:
        if not self.gradients:
            raise RuntimeError("probe_attention(gradients=True) is needed for backward()")
        outs = [self._get(b, "out") for b in self.blocks]
        for b, g in zip(self.blocks, torch.autograd.grad(score, outs), strict=True):
            self.records[b].grad = self.records[b].out_heads(g)

    def gradient(self, block: int, rows: Rows = None) -> Tensor:
        g, v = self._get(block, "grad"), self._get(block, "v")
        if rows is not None:
            g = g[:, :, rows]
        return _wide(_products(g, v.to(g.dtype))[..., : v.shape[-2]])


def _wide(x: Tensor) -> Tensor:
    """16-bit floats (autocast) as float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in _HALF else x


def _products(a: Tensor, b: Tensor) -> Tensor:
    """``a bᵀ`` for ``a`` ``[B, heads, R, d]`` and ``b`` ``[B, heads, T, d]``: ``[B, heads, R, T']``, with ``T`` padded
    to ``T'``, a multiple of 8 (zeros in the padding columns). 16-bit rows of 197 elements are not 16-byte aligned,
    and a GPU then runs a slow unaligned matrix product kernel."""
    pad = -b.shape[-2] % 8
    return a @ nn.functional.pad(b, (0, 0, 0, pad)).transpose(-2, -1)


def heads_of(x: Tensor, heads: int) -> Tensor:
    """``[B, T, heads·d]`` → ``[B, heads, T, d]`` (heads contiguous in the last dimension)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def block_indices(blocks: Sequence[int] | None, num_blocks: int) -> list[int]:
    """Sorted distinct block indices (negative count from the end); ``None`` → every block."""
    if blocks is None:
        return list(range(num_blocks))
    out = set()
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not -num_blocks <= b < num_blocks:
            raise ValueError(f"block index {b!r} out of range for {num_blocks} blocks")
        out.add(b % num_blocks)
    return sorted(out)
