"""Image–text models as zero-shot classifiers: :func:`zero_shot`."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F

from ..backbones.image_text import ImageTextBackbone, Tokenizer
from ..errors import VitlensError
from . import load_model


def zero_shot(
    model,
    class_names: Sequence[str],
    templates: Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
) -> ImageTextBackbone:
    """An image–text model as a zero-shot classifier over ``class_names``: logits are the model's own
    ``logit_scale · cos(image, class)`` (``+ logit_bias`` for SigLIP).

    Each class embedding is the normalised mean of the normalised text embeddings of the class name in
    every template (CLIP's prompt ensembling). Class targets, :class:`~vitlens.TopK`, PM and DiffMask then
    work as on a classifier; the returned backbone shares the model's modules and weights.

    Args:
        model (object): an OpenCLIP ``CLIP`` model, a Hugging Face ``CLIPModel`` / ``SiglipModel``, their
            backbone, or a URI (``open_clip:NAME/TAG``, ``hf:openai/clip-vit-base-patch32``).
        class_names: the classes, in the order of the logits.
        templates: prompt templates with one ``{}`` for the class name (default: the model's authors' —
            CLIP's seven ImageNet templates, SigLIP's ``"a photo of a {}."``).
        tokenizer: tokenizes the prompts (default: the model's own: OpenCLIP's, or the Hugging Face tokenizer
            loaded with an ``hf:`` URI); a Hugging Face tokenizer or processor, or a function of a list of texts.

    Returns:
        An :class:`ImageTextBackbone` whose ``classes`` are ``class_names``.

    Examples:
        >>> clip = vitlens.zero_shot("open_clip:ViT-B-32/laion2b_s34b_b79k", ["cat", "dog", "car"])
        >>> clip(images).argmax(1)                                    # zero-shot predictions
        >>> e = vitlens.explain(clip, images, method="gae", target="dog")
        >>> hf = vitlens.zero_shot(hf_clip_model, ["cat", "dog"], tokenizer=hf_tokenizer)
    """
    backbone = load_model(model)
    if not isinstance(backbone, ImageTextBackbone):
        raise VitlensError(f"zero_shot needs an image–text model (CLIP, OpenCLIP, SigLIP), not {backbone.family}")
    names = list(class_names) if not isinstance(class_names, str) else None
    if not names or not all(isinstance(c, str) and c.strip() for c in names):
        raise VitlensError("zero_shot: class_names must be a non-empty list of non-empty strings")
    if len(set(names)) != len(names):
        raise VitlensError("zero_shot: class names must be unique")
    templates = list(templates) if templates is not None else list(backbone.templates)
    if isinstance(templates, str) or not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise VitlensError("zero_shot: templates must be a non-empty list of strings with one '{}' for the class")
    texts = [t.format(c) for c in names for t in templates]
    emb = backbone.text_embeddings(texts, tokenizer).view(len(names), len(templates), -1)
    return backbone.with_classes(names, F.normalize(emb.mean(1), dim=-1))
