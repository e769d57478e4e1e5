"""Adapter for Hugging Face ``SiglipModel``: no class token, an attention-pooling head (MAP) reads the tokens.

The image embedding is the model's own attention pooling of the final tokens. Methods that start from a
readout row (rollout, GAE, Chefer's rules) read the mean of the patch tokens instead, the uniform stand-in
for the pooling's image-dependent weights; raw attention (which needs a class token) and Chefer's LRP (no
rules for the pooling head) refuse in one line.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from ..errors import VitlensError
from .base import Preprocessing
from .hf_clip import HFImageText, features
from .image_text import SIGLIP_TEMPLATES
from .parts import UnsupportedParts


def is_hf_siglip(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # no HF model can exist; skip the slow import
        return False
    from transformers import SiglipModel

    return isinstance(model, SiglipModel)


class HFSiglip(HFImageText):
    family = "hf-siglip"
    templates = SIGLIP_TEMPLATES
    # SigLIP's text tower was trained on prompts padded to its full length (the model cards' usage)
    tokenizer_options = {"padding": "max_length", "truncation": True}

    def __init__(self, model: nn.Module, preprocessing: Preprocessing | None = None, classes=None, **kwargs):
        if not is_hf_siglip(model):
            raise VitlensError(f"{type(model).__name__} is not a Hugging Face SiglipModel")
        if not getattr(model.vision_model, "use_head", True):
            raise VitlensError("SigLIP vision towers without their attention-pooling head are not supported")
        super().__init__(model, preprocessing, classes, **kwargs)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    @property
    def logit_bias(self) -> Tensor:
        return self.model.logit_bias

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ()

    @property
    def pooling(self) -> str:
        return "avg"

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        return embeddings + self._position(embeddings, grid)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.vision.post_layernorm(x)

    def image_embedding(self, tokens: Tensor) -> Tensor:
        return self.vision.head(tokens)

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """The pooling head applied to each token alone (attention over one token: its value)."""
        b, t, d = tokens.shape
        return self.vision.head(tokens.reshape(b * t, 1, d)).reshape(b, t, -1)

    def head_linear(self):
        raise UnsupportedParts("SigLIP's attention-pooling head")

    def encode_text(self, inputs: dict[str, Tensor]) -> Tensor:
        return features(self.model.get_text_features(**inputs))
