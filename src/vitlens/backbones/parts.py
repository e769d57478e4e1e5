"""A ViT's blocks and classifier as linear maps and callables: what the relevance (LRP) rules of Chefer,
Gur, Wolf (CVPR 2021) read. Each adapter describes its own layout (``Backbone.block_parts``,
``Backbone.head_parts``); a layout it cannot describe raises :class:`UnsupportedParts` naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import VitlensError

Affine = tuple[Tensor, Tensor | None]  # (weight [out, in], bias [out] or None)


class UnsupportedParts(VitlensError):
    """A block or classifier layout the adapter cannot describe; ``what`` names it."""

    def __init__(self, what: str):
        super().__init__(f"no relevance rules for {what}")
        self.what = what


@dataclass
class BlockParts:
    """One pre-norm transformer block, in the order of its forward pass.

    ``x → norm1 → qkv → (q_norm, k_norm, rope) → softmax(q kᵀ·scale + attn_bias) v → out_norm → proj → + x``
    then ``→ norm2 → fc1 → act (· gate) → mlp_norm → fc2 → +``. Norms and the activation pass relevance
    unchanged (the reference's LayerNorm / GELU rule), so they are kept as callables; layer scale is folded
    into proj / fc2. The last four fields describe the variants of newer families and default to the plain
    ViT block.

    Attributes:
        attn_bias: ``T →`` an additive bias on the attention logits, broadcastable to ``[B, heads, T, T]``
            (BEiT's relative position bias); ``None`` for none.
        rope: ``(q or k [B, heads, T, d], grid) →`` the same rotated (EVA's rotary position embedding;
            prefix tokens untouched); ``None`` for none.
        gate: a gated MLP (SwiGLU): the hidden layer is ``act(fc1(h)) * gate(h)`` instead of ``act(fc1(h))``.
        mlp_norm: applied to the hidden layer before ``fc2`` (timm's ``mlp.norm``, EVA's scale-MLP norm).
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: Affine  # q, k, v stacked along the output, heads contiguous inside each
    heads: int
    scale: float
    q_norm: Callable[[Tensor], Tensor]
    k_norm: Callable[[Tensor], Tensor]
    out_norm: Callable[[Tensor], Tensor]
    proj: Affine
    norm2: Callable[[Tensor], Tensor]
    fc1: Affine
    act: Callable[[Tensor], Tensor]
    fc2: Affine
    attn_bias: Callable[[int], Tensor] | None = None
    rope: Callable[[Tensor, tuple[int, int]], Tensor] | None = None
    gate: Affine | None = None
    mlp_norm: Callable[[Tensor], Tensor] = nn.Identity()


@dataclass
class HeadParts:
    """The classifier: linear heads, each reading one token (index) or the patch mean (``None``).

    The logits are the mean of the heads' outputs (two heads for distilled models); ``pre`` is the norm
    between pooling and the linear layer (timm's ``fc_norm``).

    Attributes:
        pre_constant_scale: ``pre`` with every normalising scale it computes treated as a constant (LRP's
            identity rule for norms), for a ``pre`` that is a function rather than a norm module (an image–text
            model's L2 normalisation and logit scale); ``None`` otherwise.
    """

    heads: list[tuple[int | None, Affine]]
    pre: Callable[[Tensor], Tensor]
    pre_constant_scale: Callable[[Tensor], Tensor] | None = None


def linear_parts(m: nn.Module, gamma: Tensor | None = None) -> Affine:
    """A Linear's (weight, bias), with an optional per-output scale (layer scale) folded in."""
    if not isinstance(m, nn.Linear):
        raise UnsupportedParts(f"a {type(m).__name__} where a Linear layer was expected")
    if gamma is None:
        return m.weight, m.bias
    return gamma[:, None] * m.weight, None if m.bias is None else gamma * m.bias


def embedding_head(dim: int, like: Tensor, index: int | None) -> HeadParts:
    """A model without a classifier head, read as one: the identity on its embedding ``[B, D]``.

    Args:
        dim: the embedding's dimension ``D``.
        like: a weight of the model (the device and dtype of the identity).
        index: the token that is the embedding (the class token), or ``None`` for the patch mean.
    """
    eye = torch.eye(dim, device=like.device, dtype=like.dtype)
    return HeadParts([(index, (eye, None))], nn.Identity())
