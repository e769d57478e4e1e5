"""Adapter for vitlens' own B-cos ViT: no prefix tokens, mean-pooled readout.

The B-cos head normalises *after* pooling (``norm(mean(tokens))``), so the trace's "final-normed" tokens
are the last block's output itself (``final_norm`` is the identity) and :meth:`BcosViT.head` /
:meth:`BcosViT.token_logits` apply the bias-free norm, the B-cos classifier and the logit bias. The model
encodes its 3-channel input to 6 channels itself, so the preprocessing has mean 0 and std 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from ..bcos.modules import sincos_2d
from ..bcos.vit import ARCHS, BcosSimpleViT, build_bcos_vit
from ..errors import VitlensError
from .base import Backbone, Preprocessing


def is_bcos_vit(model: nn.Module) -> bool:
    return isinstance(model, BcosSimpleViT)


def bcos_preprocessing(model: BcosSimpleViT) -> Preprocessing:
    """No mean/std normalisation: the network reads ``[r, g, b, 1-r, 1-g, 1-b]`` of the image in [0, 1]."""
    return Preprocessing(input_size=model.img_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")


class BcosViT(Backbone):
    family = "bcos"

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None):
        super().__init__(model, preprocessing or bcos_preprocessing(model), classes)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ()

    @property
    def pooling(self) -> str:
        return "avg"

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self.model.transformer)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        e = self.model.to_patch_embedding(self.model.encode(x))  # [B, h, w, D]
        return e.flatten(1, 2), (e.shape[1], e.shape[2])

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        pe = sincos_2d(*grid, embeddings.shape[-1], self.model.positional_embedding.temperature,
                       embeddings.device, embeddings.dtype)  # fmt: skip
        return embeddings + pe

    def final_norm(self, x: Tensor) -> Tensor:
        return x

    def head(self, tokens: Tensor) -> Tensor:
        return self.model.classify(tokens.mean(dim=1))

    def token_logits(self, tokens: Tensor) -> Tensor:
        return self.model.classify(tokens)

    def attention_norm(self, index: int) -> nn.Module:
        return self.model.transformer[index].attn.norm

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        found: list[Tensor] = []
        handles = [
            block.attn.attend.register_forward_hook(lambda _m, _i, out: found.append(out)) for block in self.blocks
        ]
        try:
            yield found
        finally:
            for h in handles:
                h.remove()


def load_bcos(name: str, **kwargs) -> BcosViT:
    """``bcos:NAME[?weights=PATH&pretrained=1&num_classes=...]`` → a :class:`BcosViT`.

    ``weights`` loads a state dict saved from the official B-cos-v2 code (or from vitlens); ``pretrained``
    (the default for the official architectures when no ``weights`` are given) downloads the official
    release. Other options (``num_classes``, ``img_size``, ``b``, ``max_out``, ``logit_bias``) go to the
    constructor.
    """
    from ..bcos import official

    if name not in ARCHS:
        raise VitlensError(f"unknown B-cos architecture {name!r} (known: {', '.join(ARCHS)})")
    weights = kwargs.pop("weights", None)
    pretrained = bool(kwargs.pop("pretrained", weights is None and ARCHS[name].official))
    if weights is not None and pretrained:
        raise VitlensError("give either weights=PATH or pretrained=1, not both")
    kwargs.setdefault("num_classes", 1000)
    model = build_bcos_vit(name, **kwargs)
    if weights is not None:
        official.load_state_dict(model, official.read_weights(str(weights)), f"weights {weights}")
    elif pretrained:
        official.load_state_dict(model, official.download_weights(name), f"official weights of {name}")
    backbone = BcosViT(model)
    backbone.spec = {"source": "bcos", "name": name, "kwargs": kwargs}
    return backbone


def build_bcos(name: str, **kwargs) -> tuple[nn.Module, Preprocessing]:
    """A checkpoint's ``{"source": "bcos", ...}`` spec → a fresh module and its preprocessing."""
    model = build_bcos_vit(name, **kwargs)
    return model, bcos_preprocessing(model)
