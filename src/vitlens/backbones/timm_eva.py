"""Adapter for timm's ``Eva`` (EVA, EVA-02 and the other ViTs timm builds on it).

EVA-02 adds rotary position embeddings (computed once per forward pass for the token grid and passed to
every block), SwiGLU MLPs with an optional norm before ``fc2``, separate or fused q/k/v projections, layer
scale and register tokens to the plain ViT; :class:`TimmEva` reproduces ``Eva.forward`` step by step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import VitlensError
from .base import BoundBlock, Preprocessing
from .parts import Affine, BlockParts, UnsupportedParts, linear_parts
from .timm_vit import TimmViT


def is_timm_eva(model: nn.Module) -> bool:
    try:
        from timm.models.eva import Eva
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, Eva)


def qkv_parts(attn: nn.Module) -> Affine:
    """q, k, v stacked as one affine map, from timm's fused ``qkv`` (with its separate ``q_bias`` / ``v_bias``)
    or from separate ``q_proj`` / ``k_proj`` / ``v_proj`` layers (EVA, BEiT)."""
    if getattr(attn, "qkv", None) is not None:
        weight, bias = linear_parts(attn.qkv)
        if getattr(attn, "q_bias", None) is not None:
            extra = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
            bias = extra if bias is None else bias + extra
        return weight, bias
    q, k, v = (linear_parts(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj"))
    if all(b is None for _, b in (q, k, v)):
        return torch.cat([q[0], k[0], v[0]]), None
    biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in (q, k, v)]
    return torch.cat([q[0], k[0], v[0]]), torch.cat(biases)


def mlp_parts(mlp: nn.Module) -> dict:
    """timm's ``Mlp``, ``SwiGLU`` or ``GluMlp`` as the :class:`BlockParts` MLP fields (``fc2`` as the Linear,
    for layer scale to be folded in by the caller)."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        return {"fc1": linear_parts(mlp.fc1), "act": mlp.act, "gate": None, "mlp_norm": mlp.norm, "fc2": mlp.fc2}
    if type(mlp) is SwiGLU:  # act(fc1_g(h)) * fc1_x(h)
        gate = linear_parts(mlp.fc1_x)
        return {"fc1": linear_parts(mlp.fc1_g), "act": mlp.act, "gate": gate, "mlp_norm": mlp.norm, "fc2": mlp.fc2}
    if type(mlp) is GluMlp and mlp.chunk_dim == -1:  # fc1's two halves: act(first) * second, or the other way
        weight, bias = linear_parts(mlp.fc1)
        n = weight.shape[0] // 2
        halves = [(weight[:n], None if bias is None else bias[:n]), (weight[n:], None if bias is None else bias[n:])]
        act_half, gate_half = halves[::-1] if mlp.gate_last else halves
        return {"fc1": act_half, "act": mlp.act, "gate": gate_half, "mlp_norm": mlp.norm, "fc2": mlp.fc2}
    raise UnsupportedParts(f"timm {type(mlp).__name__} MLPs")


class TimmEva(TimmViT):
    """timm ``Eva``: class / register tokens, absolute and rotary position embeddings, token or average pooling.

    The rotary embedding of a forward pass is computed by :meth:`add_prefix_and_position` (as in
    ``Eva.forward_features``) and handed to the blocks, which :attr:`blocks` wraps so that ``block(x)`` runs.
    Other input sizes need a model created with ``dynamic_img_size=True`` (timm then resamples the absolute
    and rotary position embeddings itself).
    """

    family = "timm-eva"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None):
        super().__init__(model, preprocessing, classes)
        self._rope: tuple[tuple[int, int], Tensor | None] | None = None  # (grid, rope) of the last forward

    @property
    def blocks(self) -> Sequence[nn.Module]:
        if self.model.rope is None:
            return self.model.blocks
        return [BoundBlock(block, i, self._block_rope) for i, block in enumerate(self.model.blocks)]

    def _block_rope(self, index: int, _x: Tensor | None = None) -> dict:
        if self._rope is None:
            raise VitlensError("timm Eva blocks need the rotary embedding of add_prefix_and_position(); call it first")
        rope = self._rope[1]
        return {"rope": rope[index] if getattr(self.model, "rope_mixed", False) else rope}

    def _check_size(self, size: tuple[int, int], what: str) -> None:
        built = getattr(self.model.patch_embed, "img_size" if what == "input size" else "grid_size", None)
        if self.model.dynamic_img_size or built is None or tuple(size) == tuple(built):
            return
        raise VitlensError(
            f"this timm Eva model takes only its {what} {built[0]}x{built[1]}, got {size[0]}x{size[1]} "
            "(create it with dynamic_img_size=True for other sizes)"
        )

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.model.patch_embed
        self._check_size(tuple(x.shape[-2:]), "input size")
        e = pe(x)
        if e.ndim == 4:  # NHWC (dynamic_img_size)
            return e.flatten(1, 2), (e.shape[1], e.shape[2])
        return e, tuple(pe.grid_size)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        m = self.model
        grid = (int(grid[0]), int(grid[1]))
        self._check_size(grid, "grid")
        if m.dynamic_img_size:
            embeddings = embeddings.reshape(embeddings.shape[0], *grid, embeddings.shape[-1])
        x, rope = m._pos_embed(embeddings)
        self._rope = (grid, rope)
        norm_pre = getattr(m, "norm_pre", None)  # newer timm versions
        return x if norm_pre is None else norm_pre(x)

    def _rope_for(self, grid: tuple[int, int], index: int) -> Tensor:
        """The rotary embedding block ``index`` applies on ``grid`` (the last forward's, else computed)."""
        grid = (int(grid[0]), int(grid[1]))
        if self._rope is None or self._rope[0] != grid:
            p = self.model.patch_embed.proj.weight
            with torch.no_grad():
                self.add_prefix_and_position(p.new_zeros(1, grid[0] * grid[1], self.model.embed_dim), grid)
        return self._block_rope(index)["rope"]

    def block_parts(self, block: nn.Module) -> BlockParts:
        from timm.models.eva import EvaBlock

        block = block.block if isinstance(block, BoundBlock) else block
        if type(block) is not EvaBlock:
            raise UnsupportedParts(f"timm {type(block).__name__} blocks")
        attn = block.attn
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedParts("timm attention with an output gate")
        if getattr(attn, "num_kv_groups", 1) != 1:
            raise UnsupportedParts("timm grouped-query attention")
        mlp = mlp_parts(block.mlp)
        rope = None
        if self.model.rope is not None:
            from timm.layers import apply_rot_embed_cat

            index = next(i for i, b in enumerate(self.model.blocks) if b is block)
            npt = attn.num_prefix_tokens
            half = {"half": True} if getattr(attn, "rotate_half", False) else {}  # newer timm versions

            def rope(t: Tensor, grid: tuple[int, int]) -> Tensor:
                rotated = apply_rot_embed_cat(t[:, :, npt:], self._rope_for(grid, index), **half)
                return torch.cat([t[:, :, :npt], rotated.type_as(t)], dim=2)

        identity = nn.Identity()
        return BlockParts(
            norm1=block.norm1,
            qkv=qkv_parts(attn),
            heads=attn.num_heads,
            scale=float(attn.scale),
            q_norm=getattr(attn, "q_norm", identity),  # newer timm versions
            k_norm=getattr(attn, "k_norm", identity),
            out_norm=attn.norm,
            proj=linear_parts(attn.proj, block.gamma_1),
            norm2=block.norm2,
            fc1=mlp["fc1"],
            act=mlp["act"],
            fc2=linear_parts(mlp["fc2"], block.gamma_2),
            rope=rope,
            gate=mlp["gate"],
            mlp_norm=mlp["mlp_norm"],
        )
