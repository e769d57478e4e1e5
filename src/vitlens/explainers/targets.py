"""What an explanation explains: a class, one class per image, several per image, or a score function.

Every explainer reads its ``target`` through :func:`parse_target`, so every method accepts the same forms:

- ``None``: the predicted class of each image;
- an ``int`` or a class name (``"Trouser"``): that class for every image;
- a list (or 1-D tensor) with one class index or name per image;
- a list of lists (or a ``[B, K]`` tensor): ``K`` classes per image, giving maps ``[B, K, gh, gw]``;
- :class:`TopK`: the ``k`` highest-scoring classes of each image, best first;
- a callable on the model's output ``[B, C]`` returning one score per image ``[B]`` (multi-label,
  regression, similarity to an embedding — like pytorch-grad-cam's ``model_targets``), or a list of
  ``B`` callables each taking one image's output ``[C]`` and returning a scalar.

Methods that run copies of the images (IG, SmoothGrad, RISE, occlusion) call a score function on batches
of copies, so a batch function must treat each row on its own; a function that holds per-image data (a
reference per image) defines ``subset(index)`` returning the function for the images ``index``, as
:class:`EmbeddingSimilarity` and lists of per-image callables do.

A model without a classifier head (its output is an embedding: DINOv2's ``Dinov2Model``, ``ViTModel``, a
timm ViT with ``num_classes=0``) has no classes to explain: give it a score function of the embedding,
:class:`EmbeddingSimilarity` to a reference embedding, image (:meth:`EmbeddingSimilarity.of_image`) or patch
(:meth:`EmbeddingSimilarity.of_patch`).

A float that is not a whole number, a bool, a class name the model does not have or an index out of
range is refused with a one-line :class:`~vitlens.VitlensError`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import VitlensError

ScoreFunction = Callable[[Tensor], Tensor]


class TopK:
    """The ``k`` highest-scoring classes of each image, best first: maps ``[B, k, gh, gw]``.

    Args:
        k: how many classes per image (at least 1, at most the number of classes).

    Examples:
        >>> explanation = vitlens.explain(model, images, method="gae", target=vitlens.TopK(3))
        >>> explanation.maps.shape  # [B, 3, gh, gw]
    """

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise VitlensError(f"TopK: k must be a positive integer, got {k!r}")
        self.k = int(k)

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class EmbeddingSimilarity:
    """A score function: cosine similarity of the model's output to a reference embedding.

    The target for a model without a classifier head (DINOv2's ``Dinov2Model``, Hugging Face ``ViTModel``, a
    timm ViT with ``num_classes=0``), whose output is an embedding: the explanation shows which patches make
    the image's embedding point where the reference does. On a classifier it compares logit vectors (which
    patches make the logits look like those of a reference image). Pass it as ``target``.

    Build the reference from an embedding you have, from a reference image (:meth:`of_image`: embedded with
    the same model) or from one patch of a reference image (:meth:`of_patch`: that patch's final token).

    Args:
        reference: ``[D]`` (one reference for every image) or ``[B, D]`` (one per image).

    Examples:
        >>> model = vitlens.load_model("hf:facebook/dinov2-small")           # no head: outputs embeddings
        >>> target = EmbeddingSimilarity.of_image(model, reference_image)   # [3, H, W] in [0, 1]
        >>> vitlens.explain(model, images, method="gradcam", target=target)
        >>> target = EmbeddingSimilarity.of_patch(model, reference_image, row=3, col=5)
        >>> vitlens.explain(model, images, method="inputxgrad", target=target)
        >>> vitlens.explain(model, images, method="ig", target=EmbeddingSimilarity(text_or_other_embedding))
    """

    def __init__(self, reference: Tensor):
        if not torch.is_tensor(reference) or reference.ndim not in (1, 2) or not reference.is_floating_point():
            raise VitlensError("EmbeddingSimilarity: reference must be a float tensor [D] or [B, D]")
        self.reference = reference.detach()

    @classmethod
    def of_image(cls, model, image: Tensor, *, normalized: bool = False) -> EmbeddingSimilarity:
        """The similarity to a reference image's embedding, computed by ``model`` itself.

        Args:
            model (object): the model that will be explained (anything :func:`vitlens.load_model` accepts).
            image: one image ``[3, H, W]`` (or ``[1, 3, H, W]``: one reference for every explained image), or
                ``[B, 3, H, W]`` (one reference per explained image); float in [0, 1] or uint8.
            normalized: the image is already normalised with the model's mean/std.

        Returns:
            An :class:`EmbeddingSimilarity` whose reference is the model's output for ``image``.

        Examples:
            >>> target = EmbeddingSimilarity.of_image(model, images[0])
            >>> target(model(images))  # 1.0 for the first image
        """
        with _reference(model, image, normalized) as (backbone, images):
            output = backbone(images)
        return cls(output[0] if len(images) == 1 else output)

    @classmethod
    def of_patch(cls, model, image: Tensor, row: int, col: int, *, normalized: bool = False) -> EmbeddingSimilarity:
        """The similarity to one patch of a reference image: its final (normed) patch token.

        For a model without a classifier head the explained images' embeddings (class token or mean of the
        patch tokens) are compared with that token: which patches make an image look like this part of the
        reference. On a classifier the reference is the classifier applied to that patch token
        (``Backbone.token_logits``).

        Args:
            model (object): the model that will be explained (anything :func:`vitlens.load_model` accepts).
            image: one reference image ``[3, H, W]`` or ``[1, 3, H, W]``, float in [0, 1] or uint8.
            row: the patch's row on the model's patch grid (0 = top).
            col: the patch's column (0 = left).
            normalized: the image is already normalised with the model's mean/std.

        Returns:
            An :class:`EmbeddingSimilarity` whose reference is that patch's token ``[D]``.

        Examples:
            >>> target = EmbeddingSimilarity.of_patch(model, reference_image, row=2, col=7)
            >>> vitlens.explain(model, images, method="gradcam", target=target)
        """
        with _reference(model, image, normalized) as (backbone, images):
            if len(images) != 1:
                raise VitlensError(f"EmbeddingSimilarity.of_patch: give one reference image, got {len(images)}")
            trace = backbone.run(images)
            gh, gw = trace.grid
            for name, value, n in (("row", row, gh), ("col", col, gw)):
                if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < n:
                    raise VitlensError(
                        f"EmbeddingSimilarity.of_patch: {name}={value!r} is not on the {gh}x{gw} patch grid"
                    )
            token = trace.to_grid(trace.patch_tokens)[:, int(row), int(col)]
            if not backbone.headless:
                token = backbone.token_logits(token[:, None])[:, 0]
        return cls(token[0])

    def __call__(self, output: Tensor) -> Tensor:
        ref = self.reference.to(output)
        if ref.shape[-1] != output.shape[-1]:
            raise VitlensError(
                f"EmbeddingSimilarity: reference has {ref.shape[-1]} dimensions, the model's output {output.shape[-1]}"
            )
        if ref.ndim == 2 and len(ref) != len(output):
            raise VitlensError(
                f"EmbeddingSimilarity: {len(ref)} references (one per image) for {len(output)} images; "
                "give one reference [D] for all, or one per image"
            )
        return F.cosine_similarity(output, ref.expand_as(output), dim=-1)

    def subset(self, index: Tensor) -> EmbeddingSimilarity:
        """The function for the images ``index`` (a per-image reference follows them)."""
        return self if self.reference.ndim == 1 else EmbeddingSimilarity(self.reference[index.cpu()])

    def __repr__(self) -> str:
        return f"EmbeddingSimilarity(dim={self.reference.shape[-1]})"


@contextlib.contextmanager
def _reference(model, image: Tensor, normalized: bool) -> Iterator[tuple]:
    """The backbone of ``model`` (eval mode, float32, no gradients; restored afterwards) and ``image`` checked
    as a batch: the setting an explanation runs in, for computing its reference."""
    from ..models import load_model
    from .base import check_size, frozen_eval, prepare_images

    backbone = load_model(model)
    images = prepare_images(image, backbone, normalized)
    with frozen_eval(backbone, float32=True), torch.no_grad():
        check_size(backbone, tuple(images.shape[-2:]))
        yield backbone, images


class Target:
    """One target per image for one explanation pass: class indices, a rank among the model's scores
    (``rank=0``: the predicted class) or a score function.

    Methods read it through :meth:`score` (a differentiable score per image), :meth:`probability` (what
    perturbation methods watch) and :meth:`indices` (for methods that need a class); a rank is resolved
    on the clean logits by :meth:`fixed`.
    """

    def __init__(self, classes: Tensor | None = None, fn: ScoreFunction | None = None, name: str = "", rank: int = 0):
        self.classes, self.fn, self.name, self.rank = classes, fn, name, rank

    @property
    def is_function(self) -> bool:
        return self.fn is not None

    def fixed(self, logits: Tensor) -> Target:
        """This target with a rank resolved to classes on the clean ``logits`` (no-op otherwise)."""
        if self.fn is None and self.classes is None:
            return Target(self.indices(logits), name=self.name)
        return self

    def indices(self, logits: Tensor) -> Tensor:
        """Class indices ``[B]`` (for a rank: the class at that rank of ``logits``, 0 = the highest)."""
        if self.fn is not None:
            raise VitlensError("this method needs class targets, not a score function")
        if self.classes is None:
            scores = logits.detach()
            return scores.argmax(1) if self.rank == 0 else scores.topk(self.rank + 1, dim=1).indices[:, self.rank]
        return self.classes.to(logits.device)

    def score(self, output: Tensor) -> Tensor:
        """The differentiable score ``[B]``: the target class's logit, or the score function's value."""
        if self.fn is None:
            return output.gather(1, self.indices(output)[:, None])[:, 0]
        value = self.fn(output)
        if not torch.is_tensor(value) or value.shape != (output.shape[0],):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise VitlensError(
                f"target function {self.name or 'callable'} must return one score per image "
                f"(shape [{output.shape[0]}]), got {shape}"
            )
        return value

    def probability(self, output: Tensor) -> Tensor:
        """What perturbation methods watch: the target's softmax probability, or the score function's value."""
        if self.fn is None:
            return output.softmax(1).gather(1, self.indices(output)[:, None])[:, 0]
        return self.score(output)

    def subset(self, index: Tensor) -> Target:
        """The target of the images ``index`` (repeats allowed: copies of images run together)."""
        if self.fn is not None:
            subset = getattr(self.fn, "subset", None)
            return self if subset is None else Target(fn=subset(index), name=self.name)
        if self.classes is None:
            return self
        return Target(self.classes[index.to(self.classes.device)], name=self.name)


def class_index(value: object, classes: Sequence[str]) -> int:
    """One class index from an int, a whole float, a 0-d tensor or a class name; one-line errors otherwise."""
    n = len(classes)
    if torch.is_tensor(value) and value.ndim == 0:
        value = value.item()
    if isinstance(value, str):
        if value in classes:
            return list(classes).index(value)
        folded = [i for i, c in enumerate(classes) if c.casefold() == value.casefold()]
        if len(folded) == 1:
            return folded[0]
        shown = ", ".join(classes[:12]) + (", …" if n > 12 else "")
        raise VitlensError(f"target {value!r} is not a class of this model (classes: {shown})")
    if isinstance(value, bool | np.bool_):
        raise VitlensError(f"target {value!r} is a bool; give a class index or name")
    if isinstance(value, float | np.floating):
        if not math.isfinite(value) or not float(value).is_integer():
            raise VitlensError(f"target {value!r} is not a class index (a whole number or a class name)")
        value = int(value)
    if not isinstance(value, int | np.integer):
        raise VitlensError(f"target {value!r} is not a class index, a class name or a score function")
    if not 0 <= value < n:
        raise VitlensError(f"target {value} out of range: the model has {n} classes (0..{n - 1})")
    return int(value)


class PerImageFunctions:
    """``B`` callables, one per image, each mapping that image's output ``[C]`` to a scalar (pytorch-grad-cam's
    ``model_targets``), as one score function."""

    def __init__(self, fns: Sequence[Callable]):
        self.fns = list(fns)

    def __call__(self, output: Tensor) -> Tensor:
        if len(self.fns) != len(output):
            raise VitlensError(f"got {len(self.fns)} target functions for {len(output)} images")
        return torch.stack([torch.as_tensor(f(o)).reshape(()) for f, o in zip(self.fns, output, strict=True)])

    def subset(self, index: Tensor) -> PerImageFunctions:
        return PerImageFunctions([self.fns[i] for i in index.tolist()])


def is_score_function(target: object) -> bool:
    """Whether ``target`` is a score function (or a list of per-image ones) rather than classes."""
    if callable(target) and not isinstance(target, type):
        return True
    items = target if isinstance(target, list | tuple) else None
    return bool(items) and all(callable(t) and not isinstance(t, str | type) for t in items)


def _is_scalar(v: object) -> bool:
    return isinstance(v, str | int | float | np.integer | np.floating) or (torch.is_tensor(v) and v.ndim == 0)


def parse_target(target: object, batch: int, classes: Sequence[str]) -> list[Target]:
    """Any accepted ``target`` (see the module docs) → one :class:`Target` per map per image.

    A list of ``K`` targets means ``K`` maps per image; a single-target form gives a one-element list.
    """
    if target is None:
        return [Target()]
    if isinstance(target, TopK):
        if target.k > len(classes):
            raise VitlensError(f"TopK({target.k}): the model has only {len(classes)} classes")
        return [Target(rank=k) for k in range(target.k)]
    if callable(target) and not isinstance(target, type):
        return [Target(fn=target, name=getattr(target, "__name__", type(target).__name__))]
    if _is_scalar(target):
        return [Target(torch.full((batch,), class_index(target, classes), dtype=torch.long))]
    if torch.is_tensor(target) or isinstance(target, np.ndarray):
        target = target.tolist()
    if not isinstance(target, Sequence):
        raise VitlensError(f"target of type {type(target).__name__} is not supported (see help(vitlens.explain))")
    if len(target) != batch:
        hint = f"; for several classes per image give a list per image, e.g. [{list(target)!r}] * {batch}"
        raise VitlensError(f"got {len(target)} targets for {batch} images" + (hint if batch > 1 else ""))
    if all(callable(t) and not isinstance(t, str) for t in target):
        return [Target(fn=PerImageFunctions(target), name="per-image functions")]
    if all(_is_scalar(t) for t in target):
        return [Target(torch.tensor([class_index(t, classes) for t in target], dtype=torch.long))]
    if all(isinstance(t, Sequence) and not isinstance(t, str) for t in target):
        sizes = {len(t) for t in target}
        if len(sizes) != 1 or 0 in sizes:
            raise VitlensError("several targets per image: every image needs the same number (at least one)")
        rows = [[class_index(v, classes) for v in t] for t in target]
        cols = torch.tensor(rows, dtype=torch.long).T
        return [Target(col) for col in cols]
    raise VitlensError("target list mixes kinds: give class indices/names, lists of them, or functions")
