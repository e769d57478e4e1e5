"""Adapter for timm's ``Beit`` (BEiT, BEiT v2).

BEiT adds a relative position bias to the attention logits, each block's own or one shared by all blocks
(computed by the model and passed to every block), and layer scale; it pools by the class token or by the
mean of the patch tokens with a norm after pooling (``fc_norm``). The bias covers one token grid, so the
model takes only its built input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import BoundBlock
from .parts import BlockParts, UnsupportedParts, linear_parts
from .timm_eva import mlp_parts, qkv_parts
from .timm_vit import TimmViT


def is_timm_beit(model: nn.Module) -> bool:
    try:
        from timm.models.beit import Beit
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, Beit)


class TimmBeit(TimmViT):
    """timm ``Beit``: one class token, absolute and/or relative position bias, token or average pooling."""

    family = "timm-beit"

    @property
    def blocks(self) -> Sequence[nn.Module]:
        if self.model.rel_pos_bias is None:
            return self.model.blocks
        return [BoundBlock(block, i, self._shared_bias) for i, block in enumerate(self.model.blocks)]

    def _shared_bias(self, _index: int, _x: Tensor) -> dict:
        return {"shared_rel_pos_bias": self.model.rel_pos_bias()}

    def _check(self, size: tuple[int, int], built: tuple[int, int], what: str) -> None:
        if tuple(size) != tuple(built):
            raise VitlensError(
                f"timm BEiT models take only their {what} {built[0]}x{built[1]} (the relative position bias "
                f"covers one token grid), got {size[0]}x{size[1]}"
            )

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.model.patch_embed
        self._check(tuple(x.shape[-2:]), tuple(pe.img_size), "input size")
        return pe(x), tuple(pe.grid_size)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        m = self.model
        self._check(tuple(grid), tuple(m.patch_embed.grid_size), "grid")
        x = torch.cat([m.cls_token.expand(embeddings.shape[0], -1, -1), embeddings], dim=1)
        if m.pos_embed is not None:
            x = x + m.pos_embed
        return m.pos_drop(x)

    def block_parts(self, block: nn.Module) -> BlockParts:
        from timm.models.beit import Block

        block = block.block if isinstance(block, BoundBlock) else block
        if type(block) is not Block:
            raise UnsupportedParts(f"timm {type(block).__name__} blocks")
        attn, shared = block.attn, self.model.rel_pos_bias
        mlp = mlp_parts(block.mlp)
        attn_bias = None
        if attn.relative_position_bias_table is not None or shared is not None:

            def attn_bias(t: int) -> Tensor:
                bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else 0
                bias = bias + shared() if shared is not None else bias
                if bias.shape[-1] != t:
                    raise VitlensError(f"the relative position bias covers {bias.shape[-1]} tokens, not {t}")
                return bias

        identity = nn.Identity()
        return BlockParts(
            norm1=block.norm1,
            qkv=qkv_parts(attn),
            heads=attn.num_heads,
            scale=float(attn.scale),
            q_norm=identity,
            k_norm=identity,
            out_norm=identity,
            proj=linear_parts(attn.proj, block.gamma_1),
            norm2=block.norm2,
            fc1=mlp["fc1"],
            act=mlp["act"],
            fc2=linear_parts(mlp["fc2"], block.gamma_2),
            attn_bias=attn_bias,
            gate=mlp["gate"],
            mlp_norm=mlp["mlp_norm"],
        )
