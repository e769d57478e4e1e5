"""The backbone contract: one view of any Vision Transformer.

Every explainer, metric and trainer talks to a :class:`Backbone`, never to a timm / Hugging Face /
torchvision module directly. A backbone takes images in ``[0, 1]`` at the model's input size; the
mean/std normalisation of the model's preprocessing is applied inside, so pixel-space operations
(baselines, perturbations, blurring) are the same for every family.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import VitlensError
from .parts import BlockParts, HeadParts, UnsupportedParts
from .probe import AttentionProbe, RecordedAttention, block_indices


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: input size (H, W), per-channel mean/std, resize interpolation."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
        )


@dataclass
class Trace:
    """Everything one forward pass exposes.

    ``hidden`` holds the token sequence entering every block plus the output of the last block
    (``L + 1`` tensors ``[B, T, D]``). ``attentions`` holds each block's attention probabilities
    ``[B, heads, T, T]`` when they were asked for. All tensors stay in the autograd graph, so gradient
    methods can differentiate the logits with respect to any of them. For hierarchical models (Swin) the
    blocks are stages, ``T`` and ``D`` change between them and ``grid`` is the last stage's
    (:mod:`.hierarchical`).
    """

    logits: Tensor
    embeddings: Tensor
    hidden: list[Tensor]
    tokens: Tensor
    grid: tuple[int, int]
    num_prefix_tokens: int
    attentions: list[Tensor] = field(default_factory=list)

    @property
    def patch_tokens(self) -> Tensor:
        """Final-normed patch tokens ``[B, N, D]`` (prefix tokens dropped)."""
        return self.tokens[:, self.num_prefix_tokens :]

    def to_grid(self, values: Tensor) -> Tensor:
        """Patch values ``[B, N]`` → ``[B, gh, gw]``."""
        return to_grid(values, self.grid)


def to_grid(values: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reshape per-patch values ``[B, N, ...]`` (row-major patch order) to ``[B, gh, gw, ...]``."""
    gh, gw = grid
    if values.shape[1] != gh * gw:
        raise ValueError(f"expected {gh * gw} patch values for a {gh}x{gw} grid, got {values.shape[1]}")
    return values.reshape(values.shape[0], gh, gw, *values.shape[2:])


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Patch-grid maps ``[B, gh, gw]`` → pixel maps ``[B, H, W]`` (bilinear, the one shared helper)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(images: Tensor, sigma: float, radius: int | None = None) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (radius ``ceil(3σ)`` unless given, reflected borders);
    σ ≤ 0 → unchanged. The one blur of the package: baselines, fills and perturbation metrics."""
    if sigma <= 0:
        return images
    if radius is not None and radius < 1:
        raise ValueError(f"gaussian_blur: radius must be at least 1, got {radius}")
    h, w = images.shape[-2:]
    r = min(math.ceil(3 * sigma) if radius is None else radius, h - 1, w - 1)
    x = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (r, r, r, r), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def patch_coverage(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixel masks ``[B, H, W]`` → fraction of each patch they cover ``[B, gh, gw]`` (in [0, 1])."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]


def boxes_to_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Inclusive pixel boxes ``[K, 4]`` (x0, y0, x1, y1) → their union as a bool mask ``[H, W]``."""
    h, w = size
    ys = torch.arange(h, device=boxes.device)[:, None, None]
    xs = torch.arange(w, device=boxes.device)[None, :, None]
    x0, y0, x1, y1 = boxes.round().long().T
    return ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).any(-1)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ · scale) v for ``[B, heads, T, d]`` inputs; returns (output, probabilities)."""
    probs = (q * scale) @ k.transpose(-2, -1)
    probs = probs.softmax(dim=-1)
    return probs @ v, probs


class BoundBlock(nn.Module):
    """A block that its model calls with more than the tokens (EVA's rotary embedding, BEiT's shared relative
    position bias), callable as ``block(x)`` like any other.

    ``extra(index, x)`` gives the keyword arguments for block ``index`` on tokens ``x``. The wrapper is not
    registered in the backbone; it shares the block's parameters.
    """

    def __init__(self, block: nn.Module, index: int, extra):
        super().__init__()
        self.block = block
        self.index = index
        self.extra = extra

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, **self.extra(self.index, x))


#: How a model without a classifier head turns its final tokens into its output embedding.
EMBEDDINGS = {
    "cls": "the final-normed class token",
    "mean": "the mean of the final-normed patch tokens (prefix tokens left out)",
}

NO_HEAD = "this model has no classifier head: pass target=EmbeddingSimilarity(...)"


def check_embedding(embedding: str) -> str:
    """``embedding`` if it is one of :data:`EMBEDDINGS`, else a one-line error."""
    if embedding not in EMBEDDINGS:
        raise VitlensError(f"embedding={embedding!r}: expected one of {', '.join(map(repr, EMBEDDINGS))}")
    return embedding


def pool_embedding(tokens: Tensor, embedding: str, num_prefix: int) -> Tensor:
    """Final-normed tokens ``[B, T, D]`` → the embedding ``[B, D]`` (class token at index 0, or patch mean)."""
    return tokens[:, 0] if embedding == "cls" else tokens[:, num_prefix:].mean(1)


@dataclass(frozen=True)
class CheckpointRecord:
    """What a vitlens checkpoint records beside a model's weights.

    Attributes:
        config: its ``config.json`` (kind, classes, preprocessing, training provenance, a method's settings).
        tensors: the tensors a trainable method stores with the model (DiffMask's gates: ``gates.*``).
        path: the checkpoint directory.
    """

    config: dict
    tensors: dict[str, Tensor] = field(default_factory=dict)
    path: str | None = None


class Backbone(nn.Module):
    """One view of a ViT, whatever library built it.

    Subclasses (one file per family) implement the family-specific steps; the forward pass itself,
    the trace and the bookkeeping live here once.
    """

    family: str = "?"
    #: How to rebuild the architecture (a checkpoint's ``model`` entry); ``None`` when unknown.
    spec: dict | None = None
    #: The checkpoint the model was loaded from (``None`` for a module or a URI).
    checkpoint: CheckpointRecord | None = None
    #: Whether every block attends over all tokens of the image (``False`` for Swin's windowed attention:
    #: the methods that read attention over the image refuse such models).
    global_attention: bool = True

    @property
    def config(self) -> dict | None:
        """The ``config.json`` of the checkpoint the model was loaded from, ``None`` otherwise."""
        return None if self.checkpoint is None else self.checkpoint.config

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, classes: Sequence[str] | None = None):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        n = self.num_classes
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, -1, 1, 1), persistent=False)

    # --- family-specific steps -------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Class, distillation and register tokens in front of the patch tokens (one per :attr:`prefix_kinds`)."""
        return len(self.prefix_kinds)

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        """Kind of each prefix token, in order: ``"cls"``, ``"dist"`` or ``"reg"``."""
        raise NotImplementedError

    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Normalised images → patch embeddings ``[B, N, D]`` (before position embeddings) and grid."""
        raise NotImplementedError

    def add_prefix_and_position(self, embeddings: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch embeddings → the token sequence entering the first block."""
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, tokens: Tensor) -> Tensor:
        """Final-normed tokens ``[B, T, D]`` → logits ``[B, C]`` (the model's own pooling and head)."""
        raise NotImplementedError

    def token_logits(self, tokens: Tensor) -> Tensor:
        """The model's classifier applied to every final-normed token: ``[B, T, D]`` → ``[B, T, C]``."""
        raise NotImplementedError

    def attention_norm(self, index: int) -> nn.Module:
        """The layer norm in front of block ``index``'s attention (pytorch-grad-cam's ViT target layer)."""
        raise NotImplementedError

    def block_parts(self, block: nn.Module) -> BlockParts:
        """One block as the relevance rules read it (:mod:`.parts`); families that can describe it override."""
        raise UnsupportedParts(f"{self.family} models")

    def head_parts(self) -> HeadParts:
        """The classifier as the relevance rules read it (:mod:`.parts`)."""
        raise UnsupportedParts(f"{self.family} models")

    @contextlib.contextmanager
    def unfused_attention(self) -> Iterator[None]:
        """Compute attention as explicit softmax(QKᵀ)V instead of a fused kernel; restore on exit.

        Families without a fused path keep their attention as it is.
        """
        yield

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        """Switch every block to explicit attention and collect its probabilities; restore on exit."""
        raise NotImplementedError
        yield []  # pragma: no cover

    @contextlib.contextmanager
    def probe_attention(
        self, blocks: Sequence[int] | None = None, *, gradients: bool = False
    ) -> Iterator[AttentionProbe]:
        """Read the attention of ``blocks`` during the one forward pass run in the ``with`` body.

        Families that can hook their queries and keys keep the model's own (fused) attention and recompute
        the probabilities afterwards, only for the rows asked for (:mod:`.probe`). This default switches every
        block to the explicit path (:meth:`capture_attention`) and reads its matrices.

        Args:
            blocks: block indices to read (negative count from the end); ``None`` for every block.
            gradients: also make ∂score/∂A available (:meth:`AttentionProbe.backward`); the forward pass must
                then run with gradients enabled.

        Returns:
            The :class:`~vitlens.backbones.probe.AttentionProbe`, filled once the forward pass has run.
        """
        indices = block_indices(blocks, len(self.blocks))
        with self.capture_attention() as found:
            yield RecordedAttention(found, indices, len(self.blocks))

    @contextlib.contextmanager
    def capture_outputs(self, modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
        """Record the output of each named submodule during the ``with`` body (tensors stay in the graph)."""
        found: dict[str, Tensor] = {}
        handles = []
        try:
            for name, module in modules.items():
                handles.append(
                    module.register_forward_hook(lambda _m, _i, out, name=name: found.__setitem__(name, out))
                )
            yield found
        finally:
            for h in handles:
                h.remove()

    def readout(self, num_tokens: int) -> Tensor:
        """How the head reads the final tokens: weights ``[T]`` summing to one, on the CPU.

        The class token (one-hot), class and distillation token (½ each) or the mean of the patch
        tokens for average-pooled models. Rollout-style methods start from this row; it is known before any
        image is, so reading it never waits for the device.
        """
        kinds = self.prefix_kinds
        w = torch.zeros(num_tokens)
        heads = [i for i, k in enumerate(kinds) if k in ("cls", "dist")] if self.pooling == "token" else []
        if heads:
            w[heads] = 1.0 / len(heads)
        else:
            w[len(kinds) :] = 1.0 / (num_tokens - len(kinds))
        return w

    @property
    def pooling(self) -> str:
        """``"token"`` (class / distillation token) or ``"avg"`` (mean of the patch tokens)."""
        return "token"

    @property
    def headless(self) -> bool:
        """No classifier head: the output is an embedding ``[B, D]``, not logits.

        Explain such a model with a score function of the embedding, e.g.
        :class:`~vitlens.EmbeddingSimilarity`; methods that need classes refuse.
        """
        return self.num_classes == 0

    # --- shared --------------------------------------------------------------------------------

    @property
    def class_token_index(self) -> int | None:
        """Index of the class token, ``None`` for models without one."""
        kinds = self.prefix_kinds
        return kinds.index("cls") if "cls" in kinds else None

    @property
    def patch_size(self) -> tuple[int, int]:
        """Pixels per token (for convolutional stems: the stem's total stride)."""
        h, w = self.preprocessing.input_size
        gh, gw = self.grid_for((h, w))
        return h // gh, w // gw

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid of an input of ``size`` (H, W); runs the patch embedding in eval mode (no side effects)."""
        modes = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                x = torch.zeros(1, 3, *size, device=self.mean.device, dtype=self.mean.dtype)
                return self.embed(self.normalize(x))[1]
        finally:
            for m, mode in modes:
                m.training = mode

    def normalize(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → the model's input (mean/std from its preprocessing)."""
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """Plain logits for images in [0, 1] (fused attention where the model has it)."""
        return self.run(images).logits

    def run(
        self,
        images: Tensor | None = None,
        *,
        embeddings: Tensor | None = None,
        grid: tuple[int, int] | None = None,
        attention: bool = False,
        grad_from: int | None = None,
    ) -> Trace:
        """One forward pass returning the full :class:`Trace`.

        Pass ``images`` (in [0, 1]) or, to run from the patch embeddings on (DiffMask), ``embeddings``
        ``[B, N, D]`` with their ``grid``. ``attention=True`` records each block's attention
        probabilities (switching fused attention to the explicit path for this call only).
        ``grad_from=k`` makes ``hidden[k]`` (the input of block ``k``; ``L`` = the last block's output)
        a leaf that requires grad, so gradient methods build no graph below the layer they read.
        """
        if embeddings is None:
            if images is None:
                raise ValueError("run() needs images or embeddings")
            embeddings, grid = self.embed(self.normalize(images))
        elif grid is None:
            raise ValueError("run(embeddings=...) needs the grid")
        x = self.add_prefix_and_position(embeddings, grid)
        if grad_from == 0:
            x = x.detach().requires_grad_(True)
        hidden = [x]
        stack = contextlib.ExitStack()
        with stack:
            attentions = stack.enter_context(self.capture_attention()) if attention else []
            token_grid = tuple(grid)
            for i in range(len(self.blocks)):
                x, token_grid = self.stage(i, x, token_grid)
                if grad_from == i + 1:
                    x = x.detach().requires_grad_(True)
                hidden.append(x)
        tokens = self.final_norm(x)
        return Trace(
            logits=self.head(tokens),
            embeddings=embeddings,
            hidden=hidden,
            tokens=tokens,
            grid=token_grid,
            num_prefix_tokens=self.num_prefix_tokens,
            attentions=list(attentions),
        )

    def stage(self, index: int, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Block ``index`` on tokens ``[B, T, D]`` on ``grid`` → its output and their grid (the same for a flat
        ViT; hierarchical models merge tokens between stages)."""
        return self.blocks[index](x), grid

    def describe(self) -> dict:
        """Facts about the layout, for error messages, ``vitlens info`` and tests."""
        return {
            "family": self.family,
            "input_size": list(self.preprocessing.input_size),
            "patch_size": list(self.patch_size),
            "grid": list(self.grid_for(self.preprocessing.input_size)),
            "prefix_tokens": list(self.prefix_kinds),
            "blocks": len(self.blocks),
            "classes": self.num_classes,
        }
