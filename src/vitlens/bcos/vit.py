"""The B-cos simple ViT and ViT-C (Böhle, Fritz, Schiele, TPAMI 2024), with the official architecture names.

The module follows the official B-cos-v2 ``SimpleViT`` (after lucidrains' simple ViT, Beyer et al. 2022)
parameter for parameter, so an official state dict loads with :func:`vitlens.bcos.official.convert_state_dict`
and gives identical logits. Two differences of packaging, not of computation: the input encoding
``[r, g, b, 1-r, 1-g, 1-b]`` happens inside :meth:`BcosSimpleViT.forward` (users pass 3-channel images in
[0, 1], no mean/std normalisation), and the logit bias ``log(1/(C-1))`` is part of the model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import VitlensError
from .modules import (
    BcosLayerNorm,
    BcosLinear,
    Encoder,
    Patchify,
    PosEmbSinCos2d,
    encode,
    explanation_mode,
)
from .modules import conv_stem as make_conv_stem


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BcosSimpleViT(nn.Module):
    """B-cos ViT: patch tokeniser (B-cos linear, optionally after a B-cos conv stem), fixed 2-D sin-cos
    position embedding, pre-norm blocks, mean over tokens, bias-free norm, B-cos classifier, logit bias.

    ``img_size`` is the input size in pixels (what the preprocessing resizes to); ``patch_size`` the patch
    of the tokeniser after the stem (1 for ViT-C, whose stem strides by 16 at 224 px).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        channels: int = 6,
        conv_stem: Sequence[int] | None = None,
        b: float = 2,
        max_out: int = 1,
        logit_bias: float | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise VitlensError(f"a B-cos classifier needs at least 2 classes, got {num_classes}")
        if dim % heads:
            raise VitlensError(f"dim {dim} is not divisible by {heads} heads")
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.num_classes, self.dim, self.channels = num_classes, dim, channels
        self.logit_bias = math.log(1 / (num_classes - 1)) if logit_bias is None else float(logit_bias)
        stem = {"conv_stem": make_conv_stem(channels, list(conv_stem), b, max_out)} if conv_stem else {}
        patch_dim = (conv_stem[-1] if conv_stem else channels) * self.patch_size[0] * self.patch_size[1]
        self.to_patch_embedding = nn.Sequential(
            OrderedDict(
                **stem, patchify=Patchify(self.patch_size), linear=BcosLinear(patch_dim, dim, b=b, max_out=max_out)
            )
        )
        self.positional_embedding = PosEmbSinCos2d()
        self.transformer = nn.Sequential(
            OrderedDict(
                (f"encoder_{i}", Encoder(dim, heads, dim // heads, mlp_dim, b=b, max_out=max_out)) for i in range(depth)
            )
        )
        self.linear_head = nn.Sequential(
            OrderedDict(norm=BcosLayerNorm(dim), linear=BcosLinear(dim, num_classes, b=b, max_out=max_out))
        )

    def encode(self, images: Tensor) -> Tensor:
        """3-channel images in [0, 1] → the 6-channel B-cos encoding the network reads."""
        if images.ndim != 4 or images.shape[1] * 2 != self.channels:
            raise VitlensError(f"expected images [B, {self.channels // 2}, H, W], got {tuple(images.shape)}")
        return encode(images)

    def classify(self, pooled: Tensor) -> Tensor:
        """Pooled (or per-token) features ``[..., D]`` → logits: bias-free norm, B-cos classifier, logit bias."""
        return self.linear_head(pooled) + self.logit_bias

    def forward_encoded(self, x: Tensor) -> Tensor:
        """Logits for already encoded (6-channel) inputs — the input the dynamic linear weights act on."""
        x = self.to_patch_embedding(x)
        pe = self.positional_embedding(x)
        x = x.flatten(1, 2) + pe
        x = self.transformer(x)
        return self.classify(x.mean(dim=1))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_encoded(self.encode(images))

    def explanation_mode(self, active: bool = True):
        """Context manager: detach the dynamic factors (see :func:`vitlens.bcos.explanation_mode`)."""
        return explanation_mode(self, active)


@dataclass(frozen=True)
class Arch:
    """A named B-cos ViT: constructor arguments, and whether the official release has weights for it."""

    kwargs: dict = field(default_factory=dict)
    description: str = ""
    official: bool = False


def _official(depth: int, dim: int, heads: int, mlp_dim: int, stem: list[int] | None = None) -> dict:
    patch = 1 if stem else 16
    return dict(img_size=224, patch_size=patch, depth=depth, dim=dim, heads=heads, mlp_dim=mlp_dim, conv_stem=stem)


ARCHS: dict[str, Arch] = {
    # the B-cos-v2 release (ImageNet, 224 px); ViT-C: conv stem with total stride 16, one block fewer
    "simple_vit_ti_patch16_224": Arch(_official(12, 192, 3, 768), "B-cos ViT-Ti/16, 224 px", True),
    "simple_vit_s_patch16_224": Arch(_official(12, 384, 6, 1536), "B-cos ViT-S/16, 224 px", True),
    "simple_vit_b_patch16_224": Arch(_official(12, 768, 12, 3072), "B-cos ViT-B/16, 224 px", True),
    "simple_vit_l_patch16_224": Arch(_official(14, 1024, 16, 4096), "B-cos ViT-L/16, 224 px", True),
    "vitc_ti_patch1_14": Arch(_official(11, 192, 3, 768, [24, 48, 96, 192]), "B-cos ViT-C-Ti, 224 px", True),
    "vitc_s_patch1_14": Arch(_official(11, 384, 6, 1536, [48, 96, 192, 384]), "B-cos ViT-C-S, 224 px", True),
    "vitc_b_patch1_14": Arch(
        _official(11, 768, 12, 3072, [64, 128, 128, 256, 256, 512]), "B-cos ViT-C-B, 224 px", True
    ),
    "vitc_l_patch1_14": Arch(
        _official(13, 1024, 16, 4096, [64, 128, 128, 256, 256, 512]), "B-cos ViT-C-L, 224 px", True
    ),
    # small models for the 64×64 fashion canvases: 8×8 tokens like fashion-vit
    "bcos_vit_fashion": Arch(
        dict(img_size=64, patch_size=1, conv_stem=[32, 64, 128], dim=128, depth=4, heads=4, mlp_dim=256),
        "64 px, B-cos conv stem 6→32→64→128 (stride 8), 8×8 tokens, dim 128, depth 4, 4 heads, MLP 256",
    ),
    "bcos_vit_fashion_patch": Arch(
        dict(img_size=64, patch_size=8, dim=128, depth=4, heads=4, mlp_dim=256),
        "64 px, patchify 8×8, 8×8 tokens, dim 128, depth 4, 4 heads, MLP 256 (no stem)",
    ),
}


def build_bcos_vit(name: str, num_classes: int = 1000, **overrides) -> BcosSimpleViT:
    """A randomly initialised B-cos ViT of architecture ``name`` (see :data:`ARCHS`); ``overrides`` replace
    constructor arguments (``img_size``, ``b``, ``max_out``, ``logit_bias``, …)."""
    if name not in ARCHS:
        raise VitlensError(f"unknown B-cos architecture {name!r} (known: {', '.join(ARCHS)})")
    kwargs = {**ARCHS[name].kwargs, **overrides, "num_classes": int(num_classes)}
    try:
        return BcosSimpleViT(**kwargs)
    except TypeError as e:
        raise VitlensError(f"bad option for B-cos architecture {name!r}: {e}") from e
