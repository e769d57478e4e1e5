"""B-cos ViTs (Böhle, Fritz, Schiele, TPAMI 2024): inherently interpretable Vision Transformers.

``vitlens.load_model("bcos:simple_vit_ti_patch16_224")`` loads the official release (``weights=PATH`` loads
a state dict saved from the official code); ``vitlens.explain(model, images, method="bcos")`` gives the
contribution map on the patch grid, :func:`vitlens.explainers.bcos.explain_bcos` the dynamic linear
weights, pixel contributions and colour explanation; ``vitlens train bcos`` trains one.
"""

from .modules import (
    Attention,
    BcosConv2d,
    BcosLayerNorm,
    BcosLayerNorm2d,
    BcosLinear,
    Detachable,
    FeedForward,
    encode,
    explanation_mode,
    sincos_2d,
)
from .vit import ARCHS, BcosSimpleViT, build_bcos_vit

__all__ = [
    "ARCHS",
    "Attention",
    "BcosConv2d",
    "BcosLayerNorm",
    "BcosLayerNorm2d",
    "BcosLinear",
    "BcosSimpleViT",
    "Detachable",
    "FeedForward",
    "build_bcos_vit",
    "encode",
    "explanation_mode",
    "sincos_2d",
]
