"""The backbone layer: :func:`adapt` gives any supported ViT module one view, a :class:`Backbone`.

One adapter per family (timm ViT / EVA / BEiT, Hugging Face, torchvision, vitlens' B-cos ViT), registered in
:data:`ADAPTERS`; loading models by URI or from checkpoints is the layer above (:mod:`vitlens.models`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import VitlensError
from .base import (
    Backbone,
    Preprocessing,
    Trace,
    boxes_to_mask,
    explicit_attention,
    gaussian_blur,
    patch_coverage,
    to_grid,
    upsample,
)
from .bcos_vit import BcosViT, is_bcos_vit
from .hf_clip import HFCLIP, is_hf_clip
from .hf_dinov2 import HFDinov2, is_hf_dinov2
from .hf_siglip import HFSiglip, is_hf_siglip
from .hf_swin import HFSwin, is_hf_swin
from .hf_vit import HFViT, is_hf_vit
from .open_clip_vit import OpenCLIPViT, is_open_clip
from .timm_beit import TimmBeit, is_timm_beit
from .timm_eva import TimmEva, is_timm_eva
from .timm_swin import TimmSwin, is_timm_swin
from .timm_vit import TimmViT, is_timm_vit
from .torchvision_vit import TorchvisionViT, is_torchvision_vit

__all__ = [
    "Backbone",
    "Preprocessing",
    "Trace",
    "adapt",
    "boxes_to_mask",
    "explicit_attention",
    "gaussian_blur",
    "patch_coverage",
    "to_grid",
    "unwrap",
    "upsample",
]

ADAPTERS: list[tuple[Callable[[nn.Module], bool], type[Backbone]]] = [
    (is_timm_vit, TimmViT),
    (is_timm_eva, TimmEva),
    (is_timm_beit, TimmBeit),
    (is_hf_vit, HFViT),
    (is_hf_dinov2, HFDinov2),
    (is_torchvision_vit, TorchvisionViT),
    (is_bcos_vit, BcosViT),
    (is_timm_swin, TimmSwin),
    (is_hf_swin, HFSwin),
    (is_open_clip, OpenCLIPViT),
    (is_hf_clip, HFCLIP),
    (is_hf_siglip, HFSiglip),
]


def unwrap(model: nn.Module) -> tuple[nn.Module, Preprocessing | None]:
    """The ViT inside the wrappers people put around it, and the preprocessing a wrapper declares.

    ``torch.compile`` (``._orig_mod``), ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and
    ``nn.Sequential(Normalize(mean, std), vit)`` (torchvision's ``Normalize``: its mean and std become the
    model's preprocessing) are unwrapped; the explanation runs on the same modules and weights.
    """
    preprocessing = None
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, nn.Sequential) and len(model) >= 2:
            *front, last = list(model)
            preprocessing = _normalize_front(front, last)
            model = last
        else:
            return model, preprocessing


def _normalize_front(front: list[nn.Module], vit: nn.Module) -> Preprocessing:
    """The preprocessing of ``Sequential(Normalize(mean, std), vit)``; anything else in front is refused."""
    from torchvision.transforms import Normalize

    if len(front) != 1 or not isinstance(front[0], Normalize):
        names = ", ".join(type(m).__name__ for m in front)
        raise VitlensError(
            f"nn.Sequential({names}, {type(vit).__name__}): only a torchvision Normalize may stand in front of the "
            "ViT (pass the ViT itself and give images in [0, 1])"
        )
    norm = front[0]
    inner = adapt(vit)
    mean, std = (tuple(float(v) for v in torch.as_tensor(x).reshape(-1).tolist()) for x in (norm.mean, norm.std))
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return Preprocessing(inner.preprocessing.input_size, mean, std, inner.preprocessing.interpolation)


def adapt(model: nn.Module, preprocessing: Preprocessing | None = None, classes=None) -> Backbone:
    """Wrap a plain timm / transformers / torchvision ViT in its adapter (wrappers unwrapped, see :func:`unwrap`)."""
    if isinstance(model, Backbone):
        return model
    model, declared = unwrap(model)
    preprocessing = preprocessing or declared
    if isinstance(model, Backbone):
        return model
    for matches, adapter in ADAPTERS:
        if matches(model):
            return adapter(model, preprocessing, classes)
    raise VitlensError(
        f"{type(model).__name__} is not a supported Vision Transformer "
        "(supported: timm VisionTransformer (ViT, DeiT, DeiT III, FlexiViT), timm Eva (EVA, EVA-02), timm Beit, "
        "timm / transformers Swin, transformers ViT/DeiT and DINOv2 models, torchvision ViT, vitlens B-cos ViT, "
        "OpenCLIP ViTs, transformers CLIPModel / SiglipModel)"
    )
