"""Adapter for torchvision's ``VisionTransformer`` (``vit_b_16`` and friends)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Backbone, Preprocessing, explicit_attention
from .parts import BlockParts, HeadParts, UnsupportedParts, linear_parts
from .probe import AttentionProbe, RecomputedAttention, block_indices, heads_of


def is_torchvision_vit(model: nn.Module) -> bool:
    from torchvision.models import VisionTransformer

    return isinstance(model, VisionTransformer)


def torchvision_preprocessing(model: nn.Module) -> Preprocessing:
    return Preprocessing(input_size=(model.image_size, model.image_size), interpolation="bilinear")


def _explicit_forward(mha: nn.MultiheadAttention, found: list[Tensor]) -> Callable:
    """A stand-in for ``mha.forward`` (batch-first self-attention) that records its probabilities."""

    def forward(query: Tensor, key: Tensor, value: Tensor, **_) -> tuple[Tensor, None]:
        b, t, d = query.shape
        heads = mha.num_heads
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        out, probs = explicit_attention(q, k, v, (d // heads) ** -0.5)
        found.append(probs)
        if mha.training and mha.dropout > 0:
            out = F.dropout(probs, mha.dropout) @ v
        return mha.out_proj(out.transpose(1, 2).reshape(b, t, d)), None

    return forward


def _plain_mha(mha: nn.Module) -> bool:
    """A batch-first ``nn.MultiheadAttention`` with one packed q/k/v projection and no extra key/value rows."""
    return (
        isinstance(mha, nn.MultiheadAttention)
        and mha._qkv_same_embed_dim
        and mha.bias_k is None
        and not mha.add_zero_attn
        and mha.batch_first
    )


@contextlib.contextmanager
def capture_mha_attention(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Every ``nn.MultiheadAttention`` of ``modules`` computes explicitly and records its probabilities
    (torchvision's and OpenCLIP's blocks); the modules' own forward is restored on exit, even on error."""
    found: list[Tensor] = []
    patched = []
    try:
        for mha in modules:
            if not _plain_mha(mha):
                raise VitlensError(f"cannot capture attention of this {type(mha).__name__} configuration")
            mha.forward = _explicit_forward(mha, found)
            patched.append(mha)
        yield found
    finally:
        for mha in patched:
            del mha.forward


class TorchvisionViT(Backbone):
    family = "torchvision"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None):
        super().__init__(model, preprocessing or torchvision_preprocessing(model), classes)

    @property
    def num_classes(self) -> int:
        return self.model.heads.head.out_features

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ("cls",)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.encoder.layers

    @property
    def _grid(self) -> tuple[int, int]:
        n = self.model.image_size // self.model.patch_size
        return n, n

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        size = self.model.image_size
        if tuple(x.shape[-2:]) != (size, size):
            raise VitlensError(
                f"torchvision ViTs only take their configured input size {size}x{size}, got {x.shape[-2]}x{x.shape[-1]}"
            )
        return self.model.conv_proj(x).flatten(2).transpose(1, 2), self._grid

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        if tuple(grid) != self._grid:
            raise VitlensError(f"torchvision ViTs only take their configured grid {self._grid}, got {tuple(grid)}")
        m = self.model
        x = torch.cat([m.class_token.expand(embeddings.shape[0], -1, -1), embeddings], dim=1)
        return m.encoder.dropout(x + m.encoder.pos_embedding)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.encoder.ln(x)

    def head(self, tokens: Tensor) -> Tensor:
        return self.model.heads(tokens[:, 0])

    def token_logits(self, tokens: Tensor) -> Tensor:
        return self.model.heads(tokens)

    def attention_norm(self, index: int) -> nn.Module:
        return self.blocks[index].ln_1

    def block_parts(self, block: nn.Module) -> BlockParts:
        mha, mlp = block.self_attention, block.mlp
        if len(mlp) != 5 or not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[3], nn.Linear):
            raise UnsupportedParts(f"torchvision {type(mlp).__name__} MLPs of this layout")
        identity = nn.Identity()
        return BlockParts(
            norm1=block.ln_1,
            qkv=(mha.in_proj_weight, mha.in_proj_bias),
            heads=mha.num_heads,
            scale=(mha.embed_dim // mha.num_heads) ** -0.5,
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(mha.out_proj),
            norm2=block.ln_2,
            fc1=linear_parts(mlp[0]),
            act=mlp[1],
            fc2=linear_parts(mlp[3]),
        )

    def head_parts(self) -> HeadParts:
        if len(self.model.heads) != 1:
            raise UnsupportedParts("torchvision heads with a pre-logits layer")
        return HeadParts([(self.class_token_index, linear_parts(self.model.heads.head))], nn.Identity())

    def capture_attention(self) -> contextlib.AbstractContextManager[list[Tensor]]:
        return capture_mha_attention([block.self_attention for block in self.blocks])

    @contextlib.contextmanager
    def probe_attention(
        self, blocks: Sequence[int] | None = None, *, gradients: bool = False
    ) -> Iterator[AttentionProbe]:
        """``nn.MultiheadAttention`` computes q, k, v inside one fused call: a pre-hook recomputes them from the
        block's input with ``in_proj`` (no graph), and a hook on its output y = O·W_oᵀ + b gives
        ∂score/∂O = ∂score/∂y · W_o. The module's own (fused) forward runs unchanged."""
        indices = block_indices(blocks, len(self.blocks))
        mhas = [self.blocks[i].self_attention for i in indices]
        if not all(_plain_mha(m) for m in mhas):
            with super().probe_attention(indices, gradients=gradients) as probe:
                yield probe
            return
        scale = {i: (m.embed_dim // m.num_heads) ** -0.5 for i, m in zip(indices, mhas, strict=True)}
        probe = RecomputedAttention(indices, len(self.blocks), scale, gradients)

        def record_qkv(i: int, mha: nn.MultiheadAttention, _module, inputs: tuple) -> None:
            d = mha.embed_dim
            with torch.no_grad():
                w, b = mha.in_proj_weight, mha.in_proj_bias
                n = 3 * d if gradients else 2 * d  # v only for gradients
                qkv = F.linear(inputs[0], w[:n], None if b is None else b[:n])
                q, k, *v = (heads_of(t, mha.num_heads) for t in qkv.split(d, dim=-1))
            probe.record(i, q=q, k=k, **({"v": v[0]} if v else {}))

        def out_heads(mha: nn.MultiheadAttention, grad: Tensor) -> Tensor:
            return heads_of(grad @ mha.out_proj.weight.to(grad.dtype), mha.num_heads)

        def record_out(i: int, mha: nn.MultiheadAttention, _module, _inputs, out: tuple) -> None:
            probe.record(i, out=out[0], out_heads=partial(out_heads, mha))

        handles = []
        try:
            for i, mha in zip(indices, mhas, strict=True):
                handles.append(mha.register_forward_pre_hook(partial(record_qkv, i, mha)))
                if gradients:
                    handles.append(mha.register_forward_hook(partial(record_out, i, mha)))
            yield probe
        finally:
            for h in handles:
                h.remove()
