"""Image–text models (CLIP, OpenCLIP, SigLIP): the vision tower as a :class:`Backbone`, text prompts as targets.

An image–text backbone explains the model's vision tower. Its output depends on whether classes are set:

- without classes (``vitlens.adapt(clip_model)``): the image embedding ``[B, E]``, exactly the model's own
  ``encode_image`` / ``get_image_features``; explain it for a :class:`TextPrompt` (or any score function);
- with classes (:func:`zero_shot`): the model's own zero-shot logits ``[B, C]``,
  ``logit_scale · cos(image embedding, class embedding)`` (``+ logit_bias`` for SigLIP), where each class
  embedding is the normalised mean of the class name's prompt embeddings over the authors' templates. Every
  class-based method (PM and DiffMask training included) then works as on a classifier.

Each family implements the vision steps of :class:`Backbone` and the few image–text steps below
(:meth:`ImageTextBackbone.image_embedding`, :meth:`~ImageTextBackbone.token_embeddings`,
:meth:`~ImageTextBackbone.encode_text`, the logit scale and bias, the head's linear map).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VitlensError
from .base import Backbone, Preprocessing
from .parts import HeadParts, UnsupportedParts

#: The seven ImageNet prompt templates selected in the CLIP authors' prompt-engineering notebook
#: (openai/CLIP, ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``); OpenCLIP's ``SIMPLE_IMAGENET_TEMPLATES``.
CLIP_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
#: SigLIP's zero-shot prompt (Zhai et al. 2023; the Hugging Face model cards' example).
SIGLIP_TEMPLATES = ("a photo of a {}.",)

Tokenizer = Callable[[list[str]], object]


@contextlib.contextmanager
def _eval_no_grad(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the modules' modes restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def tokenize(tokenizer: Tokenizer, texts: list[str], hf_options: dict | None = None) -> dict[str, Tensor]:
    """``texts`` → ``{"input_ids": [K, L], ...}`` with any tokenizer.

    A Hugging Face tokenizer (or a processor holding one) is called with ``return_tensors="pt"`` and
    ``hf_options`` (padding, truncation); any other callable (OpenCLIP's tokenizers, a function) is called
    with the list of texts and may return the token ids or a mapping with ``input_ids``.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor → its tokenizer
    if hasattr(tok, "model_input_names") and hasattr(tok, "pad"):
        out = tok(texts, return_tensors="pt", **(hf_options or {}))
    else:
        out = tok(texts)
    if torch.is_tensor(out):
        out = {"input_ids": out}
    if not isinstance(out, Mapping) or not torch.is_tensor(out.get("input_ids")):
        raise VitlensError(f"the tokenizer returned a {type(out).__name__}; expected token ids or a dict of them")
    ids = out["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != len(texts) or ids.is_floating_point():
        raise VitlensError(f"the tokenizer gave token ids of shape {tuple(ids.shape)} for {len(texts)} texts")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask") and torch.is_tensor(v)}


class ImageTextBackbone(Backbone):
    """The vision tower of an image–text model; see the module docs for what its output is.

    Args:
        model: the whole image–text model (both towers: prompts are embedded with its text tower).
        preprocessing: the model's input size, mean and std.
        classes: class names, one per row of ``class_embeddings``.
        class_embeddings: ``[C, E]`` text embeddings of the classes (normalised here); ``None`` for the
            image-embedding output.
        tokenizer: turns prompts into the text tower's token ids (see :func:`tokenize`); ``None`` when unknown.
    """

    #: the prompt templates of the model's authors (see :func:`zero_shot`)
    templates: tuple[str, ...] = CLIP_TEMPLATES
    #: keyword arguments for a Hugging Face tokenizer
    tokenizer_options: dict = {"padding": True, "truncation": True}

    def __init__(
        self,
        model: nn.Module,
        preprocessing: Preprocessing,
        classes: Sequence[str] | None = None,
        *,
        class_embeddings: Tensor | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        super().__init__(model, preprocessing, None)
        self.tokenizer = tokenizer
        if class_embeddings is None:
            self.register_parameter("class_embeddings", None)
            if classes is not None and len(classes) != self.embed_dim:
                raise VitlensError(
                    f"{len(classes)} class names for an image–text model without class embeddings; "
                    "use vitlens.zero_shot(model, class_names)"
                )
        else:
            emb = torch.as_tensor(class_embeddings).detach()
            if emb.ndim != 2 or emb.shape[1] != self.embed_dim or not emb.is_floating_point():
                raise VitlensError(
                    f"class embeddings must be a float [C, {self.embed_dim}] tensor, got {tuple(emb.shape)}"
                )
            if classes is None or len(classes) != emb.shape[0]:
                raise VitlensError(f"{emb.shape[0]} class embeddings need as many class names")
            ref = self.logit_scale
            self.class_embeddings = nn.Parameter(F.normalize(emb.to(ref.device, ref.dtype), dim=-1))
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]

    # --- family-specific steps -----------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        """Dimension ``E`` of the image and text embeddings."""
        raise NotImplementedError

    @property
    def logit_scale(self) -> Tensor:
        """The model's temperature, ``exp`` of its learned log-scale (a 0-d or 1-element tensor)."""
        raise NotImplementedError

    @property
    def logit_bias(self) -> Tensor | None:
        """SigLIP's learned bias on the logits; ``None`` for CLIP."""
        return None

    def image_embedding(self, tokens: Tensor) -> Tensor:
        """Final-normed tokens ``[B, T, D]`` → the model's image embedding ``[B, E]`` (pooling and projection)."""
        raise NotImplementedError

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """Each final-normed token through the model's pooling-free path to the embedding: ``[B, T, E]``."""
        raise NotImplementedError

    def encode_text(self, inputs: dict[str, Tensor]) -> Tensor:
        """Tokenized prompts (:func:`tokenize`) → the model's text embeddings ``[K, E]`` (not normalised)."""
        raise NotImplementedError

    def head_linear(self) -> tuple[int | None, Callable[[Tensor], Tensor], Tensor]:
        """The head up to the embedding as one linear map: (token read or ``None`` for the patch mean, the norm
        between pooling and projection, the projection ``[E, D]``); :class:`UnsupportedParts` when it is not."""
        raise UnsupportedParts(f"{self.family} image–text heads")

    # --- shared --------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        head = getattr(self, "class_embeddings", None)
        return self.embed_dim if head is None else head.shape[0]

    @property
    def has_classes(self) -> bool:
        """Whether the output is zero-shot logits over classes (else: the image embedding)."""
        return self.class_embeddings is not None

    def similarity_logits(self, embeddings: Tensor) -> Tensor:
        """Image embeddings ``[..., E]`` → the zero-shot logits ``[..., C]`` the model itself computes."""
        z = F.normalize(embeddings, dim=-1) @ F.normalize(self.class_embeddings, dim=-1).T
        z = self.logit_scale * z
        bias = self.logit_bias
        return z if bias is None else z + bias

    def head(self, tokens: Tensor) -> Tensor:
        emb = self.image_embedding(tokens)
        return self.similarity_logits(emb) if self.has_classes else emb

    def token_logits(self, tokens: Tensor) -> Tensor:
        emb = self.token_embeddings(tokens)
        return self.similarity_logits(emb) if self.has_classes else emb

    def head_parts(self) -> HeadParts:
        """The head as one linear map on the read token: with classes, the (per-image) L2 normalisation and
        the logit scale sit in ``pre`` (a norm, passing relevance unchanged) and the class embeddings times
        the projection are the weight."""
        index, norm, proj = self.head_linear()
        if not self.has_classes:
            return HeadParts([(index, (proj, None))], norm)
        weight = F.normalize(self.class_embeddings, dim=-1) @ proj
        scale = self.logit_scale.reshape(())

        def pre(z: Tensor) -> Tensor:
            z = norm(z)
            return z * (scale / (z @ proj.T).norm(dim=-1, keepdim=True))

        bias = self.logit_bias
        return HeadParts([(index, (weight, None if bias is None else bias.reshape(1).expand(weight.shape[0])))], pre)

    def text_embeddings(self, texts: Sequence[str], tokenizer: Tokenizer | None = None) -> Tensor:
        """Normalised text embeddings ``[K, E]`` of ``texts`` (the model's text tower, eval mode, no grad).

        Args:
            texts: the prompts.
            tokenizer: overrides the model's own tokenizer (:attr:`tokenizer`).
        """
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise VitlensError(
                f"this {self.family} model has no tokenizer: pass tokenizer= (its Hugging Face tokenizer or "
                "processor, or a function of a list of texts), or give a text embedding"
            )
        texts = [str(t) for t in texts]
        inputs = {k: v.to(self.mean.device) for k, v in tokenize(tokenizer, texts, self.tokenizer_options).items()}
        with _eval_no_grad(self.model):
            try:
                emb = self.encode_text(inputs)
            except (IndexError, RuntimeError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise VitlensError(
                    f"the text tower cannot read these token ids (wrong tokenizer?): {first[:160]}"
                ) from e
        return F.normalize(emb.float(), dim=-1)

    def with_classes(self, classes: Sequence[str], class_embeddings: Tensor) -> ImageTextBackbone:
        """The same model (shared modules and weights) with zero-shot classes: logits instead of embeddings."""
        other = type(self)(self.model, self.preprocessing, list(classes), class_embeddings=class_embeddings,
                           tokenizer=self.tokenizer)  # fmt: skip
        other.spec, other.checkpoint = self.spec, self.checkpoint
        return other.train(self.training)

    def checkpoint_extras(self) -> tuple[dict[str, Tensor], dict]:
        """What a checkpoint stores beside the model: the class embeddings (extra tensors, config entry)."""
        if not self.has_classes:
            return {}, {}
        return {"class_embeddings": self.class_embeddings}, {"zero_shot": {"embed_dim": self.embed_dim}}

    def check_target(self, target: object) -> object:
        """A model without classes explains prompts: a plain string becomes a :class:`TextPrompt`; class
        targets are refused in one line."""
        if self.has_classes:
            return target
        if isinstance(target, str):
            return TextPrompt(target).bind(self)
        if callable(target) or (isinstance(target, list | tuple) and target and all(map(callable, target))):
            return target
        raise VitlensError(
            "this image–text model has no classes: give a text prompt as the target (vitlens.TextPrompt(...)) "
            "or give it classes with vitlens.zero_shot(model, class_names)"
        )


class TextPrompt:
    """A target for image–text models: the cosine similarity of the image and text embeddings.

    The score of an image is ``cos(image embedding, text embedding)``: the model's own logit for the prompt
    divided by its logit scale (less SigLIP's logit bias), so its gradient is the logit's up to that constant.
    Every method that takes a score function explains it (gradients, Grad-CAM, GAE, Chefer, IG,
    SmoothGrad, RISE, occlusion); class-agnostic methods do not depend on a target. It needs the model's
    image-embedding output (``vitlens.adapt(model)`` or a URI), not a :func:`zero_shot` model, whose
    targets are its class names.

    Args:
        text: a prompt, several prompts (their normalised embeddings averaged: a prompt ensemble) or a text
            embedding ``[E]`` (one for every image) or ``[B, E]`` (one per image).
        tokenizer: tokenizes the prompts (default: the model's own; see
            :meth:`ImageTextBackbone.text_embeddings`).

    Examples:
        >>> clip = vitlens.load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")
        >>> cat = vitlens.explain(clip, images, method="gradients", target=vitlens.TextPrompt("a photo of a cat"))
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
        from ..explainers.targets import EmbeddingSimilarity

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
    """``target`` as the explainers read it on ``backbone``: text prompts bound to the model (also inside a
    list), then the model's own check (:meth:`ImageTextBackbone.check_target`)."""
    if isinstance(target, TextPrompt):
        target = target.bind(backbone)
    elif isinstance(target, list | tuple) and any(isinstance(t, TextPrompt) for t in target):
        target = [t.bind(backbone) if isinstance(t, TextPrompt) else t for t in target]
    check = getattr(backbone, "check_target", None)
    return check(target) if check is not None else target


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
    from ..models import load_model

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
