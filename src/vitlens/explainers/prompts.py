"""Text prompts as targets of image–text models (CLIP, OpenCLIP, SigLIP): :class:`TextPrompt`.

An image–text model without classes outputs its image embedding (see :mod:`vitlens.backbones.image_text`);
a prompt's score is the cosine similarity of that embedding to the prompt's text embedding. Explainers bind
prompts to their model with :func:`bind_target` before reading the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backbones import Backbone
from ..backbones.image_text import ImageTextBackbone, Tokenizer
from ..errors import VitlensError
from .targets import EmbeddingSimilarity


class TextPrompt:
    """A target for image–text models: the cosine similarity of the image and text embeddings.

    The score of an image is ``cos(image embedding, text embedding)``: the model's own logit for the prompt
    divided by its logit scale (less SigLIP's logit bias), so its gradient is the logit's up to that constant.
    Every method that takes a score function explains it (Input×Gradient, Grad-CAM, GAE, Chefer, IG,
    SmoothGrad, RISE, occlusion); the others refuse in one line (class-agnostic maps, or classes only: PM).
    It needs the model's image-embedding output (the model itself or its URI), not a
    :func:`vitlens.zero_shot` model, whose targets are its class names.

    Args:
        text: a prompt, several prompts (their normalised embeddings averaged: a prompt ensemble) or a text
            embedding ``[E]`` (one for every image) or ``[B, E]`` (one per image).
        tokenizer: tokenizes the prompts (default: the model's own; see
            :meth:`ImageTextBackbone.text_embeddings`).

    Examples:
        >>> clip = vitlens.load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")
        >>> cat = vitlens.explain(clip, images, method="gradcam", target=vitlens.TextPrompt("a photo of a cat"))
        >>> dog = vitlens.explain(clip, images, method="gae", target=vitlens.TextPrompt(["a dog", "a puppy"]))
    """

    def __init__(self, text: str | Sequence[str] | Tensor, tokenizer: Tokenizer | None = None):
        if torch.is_tensor(text):
            if text.ndim not in (1, 2) or not text.is_floating_point():
                raise VitlensError("TextPrompt: a text embedding must be a float tensor [E] or [B, E]")
            self.embedding, self.texts = text.detach(), None
        else:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise VitlensError("TextPrompt: give a non-empty prompt, a list of them or a text embedding")
            self.embedding, self.texts = None, texts
        self.tokenizer = tokenizer

    @property
    def name(self) -> str:
        if self.texts is None:
            return "text embedding"
        return self.texts[0] if len(self.texts) == 1 else " | ".join(self.texts)

    def bind(self, backbone: Backbone):
        """The score function of this prompt on ``backbone``'s image embeddings (an ``EmbeddingSimilarity``)."""
        if not isinstance(backbone, ImageTextBackbone):
            raise VitlensError(f"TextPrompt needs an image–text model (CLIP, OpenCLIP, SigLIP), not {backbone.family}")
        if backbone.has_classes:
            raise VitlensError(
                "TextPrompt explains the image embedding; this model gives zero-shot logits: give one of its "
                "class names as the target, or explain the model without vitlens.zero_shot"
            )
        if self.embedding is not None:
            if self.embedding.shape[-1] != backbone.embed_dim:
                raise VitlensError(
                    f"TextPrompt: the text embedding has {self.embedding.shape[-1]} dimensions, the model's "
                    f"{backbone.embed_dim}"
                )
            reference = self.embedding
        else:
            reference = F.normalize(backbone.text_embeddings(self.texts, self.tokenizer).mean(0), dim=-1)
        fn = EmbeddingSimilarity(reference)
        fn.__name__ = self.name
        return fn

    def __repr__(self) -> str:
        return f"TextPrompt({self.name!r})"


def bind_target(target: object, backbone: Backbone) -> object:
    """``target`` as the explainers read it on ``backbone``.

    Text prompts are bound to the model (also inside a list). An image–text model without classes explains
    prompts only: a plain string becomes a :class:`TextPrompt`, class targets (``None``, indices, names,
    ``TopK``) are refused in one line. Other models' targets pass unchanged.
    """
    if isinstance(target, TextPrompt):
        target = target.bind(backbone)
    elif isinstance(target, list | tuple) and any(isinstance(t, TextPrompt) for t in target):
        target = [t.bind(backbone) if isinstance(t, TextPrompt) else t for t in target]
    if not isinstance(backbone, ImageTextBackbone) or backbone.has_classes:
        return target
    if isinstance(target, str):
        return TextPrompt(target).bind(backbone)
    if callable(target) or (isinstance(target, list | tuple) and target and all(map(callable, target))):
        return target
    raise VitlensError(
        "this image–text model has no classes: give a text prompt as the target (vitlens.TextPrompt(...)) "
        "or give it classes with vitlens.zero_shot(model, class_names)"
    )
