"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT incl. distilled, registers, avg pool)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

from torch import Tensor, nn

from ..errors import VitlensError
from .base import NO_HEAD, Backbone, Preprocessing
from .parts import BlockParts, HeadParts, UnsupportedParts, embedding_head, linear_parts
from .probe import AttentionProbe, RecomputedAttention, block_indices, heads_of


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer)


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Preprocessing(
        input_size=tuple(int(s) for s in model.patch_embed.img_size),  # the built size, not the pretrained one
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


class TimmViT(Backbone):
    family = "timm"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None):
        if getattr(model, "attn_pool", None) is not None:
            raise VitlensError("timm models with attention pooling (global_pool='map') are not supported")
        super().__init__(model, preprocessing or timm_preprocessing(model), classes)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def distilled(self) -> bool:
        return getattr(self.model, "dist_token", None) is not None

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        m = self.model
        kinds = ["cls"] if m.cls_token is not None else []
        if self.distilled:
            kinds.append("dist")
        kinds += ["reg"] * (m.num_prefix_tokens - len(kinds))
        return tuple(kinds)

    @property
    def pooling(self) -> str:
        pool = self.model.global_pool
        if pool == "token":
            return "token"
        if pool == "avg" and not getattr(self.model, "pool_include_prefix", False):
            return "avg"
        raise VitlensError(f"timm global_pool={pool!r} is not supported (use 'token' or 'avg')")

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.model.blocks

    @contextlib.contextmanager
    def _any_size(self, needed: bool) -> Iterator[None]:
        """timm's ``dynamic_img_size`` switched on for the call (position embeddings interpolated), as if the
        model had been created with it; restored afterwards."""
        m, pe = self.model, self.model.patch_embed
        names = {"strict_img_size": False, "flatten": False, "output_fmt": "NHWC"}
        if not needed or m.dynamic_img_size or not all(hasattr(pe, k) for k in names):
            yield
            return
        from timm.layers import Format

        saved = {k: getattr(pe, k) for k in names}
        try:
            m.dynamic_img_size = True
            pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format.NHWC
            yield
        finally:
            m.dynamic_img_size = False
            for k, v in saved.items():
                setattr(pe, k, v)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.model.patch_embed
        built = tuple(pe.img_size) if getattr(pe, "img_size", None) is not None else None
        with self._any_size(built is not None and tuple(x.shape[-2:]) != built):
            e = pe(x)
        if e.ndim == 4:  # NHWC (dynamic_img_size)
            grid = (e.shape[1], e.shape[2])
            return e.flatten(1, 2), grid
        return e, tuple(pe.grid_size)

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        m = self.model
        with self._any_size(tuple(grid) != tuple(m.patch_embed.grid_size)):
            if m.dynamic_img_size:
                embeddings = embeddings.reshape(embeddings.shape[0], *grid, embeddings.shape[-1])
            x = m._pos_embed(embeddings)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def head(self, tokens: Tensor) -> Tensor:
        return self.model.forward_head(tokens)

    def token_logits(self, tokens: Tensor) -> Tensor:
        m = self.model
        if self.headless:
            raise VitlensError(NO_HEAD)
        z = m.fc_norm(tokens)
        logits = m.head(z)
        if self.distilled:
            logits = (logits + m.head_dist(z)) / 2
        return logits

    def attention_norm(self, index: int) -> nn.Module:
        return self.model.blocks[index].norm1

    def block_parts(self, block: nn.Module) -> BlockParts:
        from timm.layers import Attention, LayerScale, Mlp
        from timm.models import vision_transformer
        from timm.models.vision_transformer import Block

        # older timm (1.0.20) builds its ViT blocks with vision_transformer's own LayerScale, not timm.layers'
        layer_scales = (LayerScale, vision_transformer.LayerScale)

        if type(block) is not Block:
            raise UnsupportedParts(f"timm {type(block).__name__} blocks")
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention:
            raise UnsupportedParts(f"timm {type(attn).__name__} attention")
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedParts("timm attention with an output gate")
        if type(mlp) is not Mlp:
            raise UnsupportedParts(f"timm {type(mlp).__name__} MLPs")

        def gamma(ls: nn.Module) -> Tensor | None:
            if isinstance(ls, layer_scales):
                return ls.gamma
            if isinstance(ls, nn.Identity):
                return None
            raise UnsupportedParts(f"timm {type(ls).__name__} layer scale")

        return BlockParts(
            norm1=block.norm1,
            qkv=linear_parts(attn.qkv),
            heads=attn.num_heads,
            scale=float(attn.scale),
            q_norm=attn.q_norm,
            k_norm=attn.k_norm,
            out_norm=attn.norm,
            proj=linear_parts(attn.proj, gamma(block.ls1)),
            norm2=block.norm2,
            fc1=linear_parts(mlp.fc1),
            act=mlp.act,
            fc2=linear_parts(mlp.fc2, gamma(block.ls2)),
            mlp_norm=mlp.norm,
        )

    def head_parts(self) -> HeadParts:
        m = self.model
        if self.headless:  # num_classes=0: the pooled embedding (global_pool chooses it), after fc_norm
            readers = [0, 1] if self.distilled else [None if self.pooling == "avg" else self.class_token_index]
            heads = [embedding_head(m.num_features, m.patch_embed.proj.weight, i).heads[0] for i in readers]
            return HeadParts(heads, nn.Identity() if self.distilled else m.fc_norm)
        if self.distilled:
            return HeadParts([(0, linear_parts(m.head)), (1, linear_parts(m.head_dist))], nn.Identity())
        return HeadParts([(None if self.pooling == "avg" else self.class_token_index, linear_parts(m.head))], m.fc_norm)

    def _attention_modules(self) -> list[nn.Module]:
        modules = [getattr(block, "attn", None) for block in self.model.blocks]
        for attn in modules:
            if attn is None or not hasattr(attn, "attn_drop") or not hasattr(attn, "fused_attn"):
                raise VitlensError(
                    f"cannot unfuse the attention of {type(attn).__name__} blocks in {type(self.model).__name__}"
                )
        return modules

    @contextlib.contextmanager
    def unfused_attention(self) -> Iterator[None]:
        saved = [(attn, attn.fused_attn) for attn in self._attention_modules()]
        try:
            for attn, _ in saved:
                attn.fused_attn = False
            yield
        finally:
            for attn, fused in saved:
                attn.fused_attn = fused

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        found: list[Tensor] = []
        with self.unfused_attention():
            handles = [a.attn_drop.register_forward_hook(lambda _m, _i, out: found.append(out))
                       for a in self._attention_modules()]  # fmt: skip
            try:
                yield found
            finally:
                for h in handles:
                    h.remove()

    @contextlib.contextmanager
    def probe_attention(
        self, blocks: Sequence[int] | None = None, *, gradients: bool = False
    ) -> Iterator[AttentionProbe]:
        """timm's ``Attention``: q and k hooked at the outputs of ``q_norm`` / ``k_norm``, v at the output of
        ``qkv``, the per-head output at the input of ``attn.norm``; ``fused_attn`` is left as it is. Other
        attention modules fall back to the explicit path."""
        from timm.layers import Attention

        indices = block_indices(blocks, len(self.blocks))
        attns = [getattr(self.blocks[i], "attn", None) for i in indices]
        if not all(type(a) is Attention and hasattr(a, "norm") for a in attns):
            with super().probe_attention(indices, gradients=gradients) as probe:
                yield probe
            return
        scale = {i: float(a.scale) for i, a in zip(indices, attns, strict=True)}
        probe = RecomputedAttention(indices, len(self.blocks), scale, gradients)

        def record(i: int, name: str, _module, _inputs, out: Tensor) -> None:
            probe.record(i, **{name: out})

        def record_v(i: int, heads: int, _module, _inputs, qkv: Tensor) -> None:
            probe.record(i, v=qkv.unflatten(-1, (3, heads, -1))[:, :, 2].transpose(1, 2))

        def record_out(i: int, heads: int, _module, inputs: tuple) -> None:
            probe.record(i, out=inputs[0], out_heads=partial(heads_of, heads=heads))

        handles = []
        try:
            for i, attn in zip(indices, attns, strict=True):
                handles.append(attn.q_norm.register_forward_hook(partial(record, i, "q")))
                handles.append(attn.k_norm.register_forward_hook(partial(record, i, "k")))
                if gradients:
                    handles.append(attn.qkv.register_forward_hook(partial(record_v, i, attn.num_heads)))
                    handles.append(attn.norm.register_forward_pre_hook(partial(record_out, i, attn.num_heads)))
            yield probe
        finally:
            for h in handles:
                h.remove()
