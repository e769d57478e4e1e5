"""Image–text models (CLIP, OpenCLIP, SigLIP): the vision tower as a :class:`Backbone`, text prompts as targets.

An image–text backbone explains the model's vision tower. Its output depends on whether classes are set:

- without classes (``vitlens.load_model(clip_model)``): the image embedding ``[B, E]``, exactly the model's own
  ``encode_image`` / ``get_image_features``; explain it for a :class:`vitlens.TextPrompt` (or any score function);
- with classes (:func:`vitlens.zero_shot`): the model's own zero-shot logits ``[B, C]``,
  ``logit_scale · cos(image embedding, class embedding)`` (``+ logit_bias`` for SigLIP), where each class
  embedding is the normalised mean of the class name's prompt embeddings over the authors' templates. Every
  class-based method (PM and DiffMask training included) then works as on a classifier.

Each family implements the vision steps of :class:`Backbone` and the few image–text steps below
(:meth:`ImageTextBackbone.image_embedding`, :meth:`~ImageTextBackbone.token_embeddings`,
:meth:`~ImageTextBackbone.encode_text`, the logit scale and bias, the head's linear map).
"""

from __future__ import annotations

import contextlib
import functools
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

    #: the prompt templates of the model's authors (see :func:`vitlens.zero_shot`)
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

    def describe(self) -> dict:
        """As :meth:`Backbone.describe`, with the image embedding's size; ``classes`` is 0 while the output is
        that embedding (no zero-shot classes set)."""
        return {**super().describe(), "classes": self.num_classes if self.has_classes else 0,
                "embedding": self.embed_dim}  # fmt: skip

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

        def pre(z: Tensor, constant_scale: bool = False) -> Tensor:
            z = norm(z)
            length = (z @ proj.T).norm(dim=-1, keepdim=True)
            return z * (scale / (length.detach() if constant_scale else length))

        bias = self.logit_bias
        heads = [(index, (weight, None if bias is None else bias.reshape(1).expand(weight.shape[0])))]
        return HeadParts(heads, pre, pre_constant_scale=functools.partial(pre, constant_scale=True))

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
        other.training = self.training  # the flag only: the shared modules keep their own mode
        return other

    def checkpoint_extras(self) -> tuple[dict[str, Tensor], dict]:
        """What a checkpoint stores beside the model: the class embeddings (extra tensors, config entry)."""
        if not self.has_classes:
            return {}, {}
        return {"class_embeddings": self.class_embeddings}, {"zero_shot": {"embed_dim": self.embed_dim}}
