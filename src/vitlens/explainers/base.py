"""The explainer contract: ``Explainer(model, **options)(images, target) -> Explanation``.

One small base class in the spirit of pytorch-grad-cam's ``BaseCAM`` and captum's ``Attribution``: input
checks, target parsing, the model's state (eval mode, frozen parameters, float32 compute — all restored)
and the registry live here; a method file holds only what is specific to its method. A method describes
itself with class attributes (``name``, ``paper``, ``cost``, ``scale``, ``meaning``) and takes its options as
typed keyword-only parameters of ``__init__`` documented in the class docstring's ``Args:`` section;
``vitlens methods``, the overlays and the report read them from there.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..backbones import Backbone
from ..backbones.base import NO_HEAD
from ..errors import VitlensError
from ..models import load_model
from .explanation import SCALES, Explanation
from .prompts import bind_target
from .targets import Target, TopK, class_index, is_score_function, parse_target  # noqa: F401  (re-exported)

EXPLAINERS: dict[str, type[Explainer]] = {}


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → checks it has passed


def verify_once(backbone: Backbone, key: str, check: Callable[[], None]) -> None:
    """Run ``check`` (it raises when the model fails it) the first time ``key`` meets the model inside
    ``backbone``: checks of the architecture (a method's recomputation reproduces the model) then cost nothing
    on later calls, also through new explainers such as every :func:`explain` call builds."""
    done = _VERIFIED.setdefault(backbone.model, set())
    if key not in done:
        check()
        done.add(key)


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator adding an explainer to the registry :data:`EXPLAINERS` under ``cls.name``.

    Args:
        cls: an :class:`Explainer` subclass with ``name``, ``paper``, ``cost``, ``scale`` and ``meaning`` set.

    Returns:
        ``cls`` itself.
    """
    if cls.scale not in SCALES:
        raise ValueError(f"{cls.__name__}.scale must be one of {SCALES}")
    EXPLAINERS[cls.name] = cls
    return cls


def module_tree(module: torch.nn.Module) -> tuple[list[torch.nn.Module], list[Tensor], list[Tensor]]:
    """Every submodule (``module`` first), parameter and buffer of ``module``, each once, from one walk.

    The same as ``modules()``, ``parameters()`` and ``buffers()`` (in another order) at a tenth of their Python
    work, which is a visible share of a fast GPU forward pass when it runs at every explanation.
    """
    modules, seen = [module], {id(module)}
    for m in modules:  # breadth first; the list grows while it is read
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                modules.append(child)
    params: dict[int, Tensor] = {}
    buffers: dict[int, Tensor] = {}
    for m in modules:
        for p in m._parameters.values():
            if p is not None:
                params[id(p)] = p
        for b in m._buffers.values():
            if b is not None:
                buffers[id(b)] = b
    return modules, list(params.values()), list(buffers.values())


@contextlib.contextmanager
def frozen_eval(module: torch.nn.Module, *, float32: bool = False) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; both restored afterwards, even on error.

    Only modes and flags that change are set (for a model already in eval mode no module is touched: that
    Python work is a visible share of a fast GPU forward pass).

    Args:
        module: the model.
        float32: also compute half / bfloat16 weights and buffers in float32 (gradients and softmax products
            in 16 bits give wrong maps), restored to their dtype afterwards; float32 and float64 models are
            untouched.
    """
    modules, params, buffers = module_tree(module)
    modes = [(m, m.training) for m in modules]
    grads = [(p, p.requires_grad) for p in params]
    low = [(t, t.dtype) for t in (*params, *buffers) if float32 and t.dtype in (torch.float16, torch.bfloat16)]
    try:
        for t, _ in low:
            t.data = t.data.float()
        if any(mode for _, mode in modes):
            module.eval()
        for p, flag in grads:
            if flag:
                p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            if m.training != mode:
                m.training = mode
        for p, flag in grads:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for t, dtype in low:
            t.data = t.data.to(dtype)


def prepare_images(images: object, backbone: Backbone, normalized: bool = False) -> Tensor:
    """Check and convert the user's images to float32 ``[B, 3, H, W]`` in [0, 1] on the model's device.

    uint8 tensors are read as 0–255 images; a single ``[3, H, W]`` image becomes a batch of one. With
    ``normalized=True`` the tensor is taken as already normalised with the model's mean and std and
    brought back to [0, 1]. A float tensor outside [0, 1] is refused: explaining it would silently give
    a wrong map.
    """
    if not torch.is_tensor(images):
        raise VitlensError(f"images must be a [B, 3, H, W] tensor, got a {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise VitlensError(f"images must be a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise VitlensError("got an empty batch")
    device = backbone.mean.device
    dtype = torch.float64 if backbone.mean.dtype == torch.float64 else torch.float32
    if images.dtype == torch.uint8:
        return images.to(device, dtype).div_(255)
    if not images.is_floating_point():
        raise VitlensError(f"images must be float in [0, 1] or uint8 in 0..255, got {images.dtype}")
    images = images.detach().to(device, dtype)
    lo, hi = torch.stack(torch.aminmax(images)).tolist()  # NaN and ±Inf show in the extremes: one pass, one sync
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise VitlensError("images contain NaN or Inf values")
    if normalized:
        return images * backbone.std.to(dtype) + backbone.mean.to(dtype)
    if lo < -1e-3 or hi > 1 + 1e-3:
        guess = "0–255 values" if hi > 2 else "already normalised values"
        raise VitlensError(
            f"images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]: {guess}?); vitlens applies the "
            "model's mean/std itself — pass normalized=True for normalised tensors, images / 255 or a uint8 "
            "tensor for 0–255 values"
        )
    return images.clamp_(0, 1)


def check_size(backbone: Backbone, size: tuple[int, int]) -> None:
    """A one-line error when the model cannot take images of ``size`` (its own size always works)."""
    if size == tuple(backbone.preprocessing.input_size):
        return
    try:
        backbone.grid_for(size)
    except (AssertionError, RuntimeError, ValueError, VitlensError) as e:
        h, w = backbone.preprocessing.input_size
        ph, pw = backbone.patch_size
        any_size = backbone.family == "timm" or bool(getattr(backbone.model, "dynamic_img_size", False))
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VitlensError(
            f"this model cannot take {size[0]}x{size[1]} images ({why}); give {h}x{w} images"
            + (f" or sides that are multiples of {ph}x{pw}" if any_size else "")
        ) from None


def require_global_attention(backbone: Backbone, method: str) -> None:
    """A one-line refusal of ``method`` for a model without attention over the whole image (Swin)."""
    if not backbone.global_attention:
        raise VitlensError(
            f"method {method!r} reads attention over the whole image; this {backbone.family} model has hierarchical "
            "windowed attention, with no token-to-token attention over the image (use a gradient, perturbation or "
            "pm method)"
        )


def option_docs(cls: type) -> dict[str, str]:
    """``{option: description}`` from the ``Args:`` section of ``cls``' docstring (continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, flags=re.M)
    docs: dict[str, str] = {}
    name = None
    for line in (match.group(1) if match else "").splitlines():
        head = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if head:
            name = head.group(1)
            docs[name] = head.group(2).strip()
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


class Explainer:
    """Base class of every method.

    Subclasses set the class attributes below, take their options as keyword-only parameters of
    ``__init__`` (documented under ``Args:`` in the class docstring) and implement :meth:`explain`.

    Attributes:
        name: registry name (``vitlens.explain(..., method=name)``).
        paper: the publication the method comes from.
        cost: forward / backward passes per image, for ``vitlens methods``.
        scale: how its values read (see :data:`vitlens.explainers.explanation.SCALES`).
        meaning: one sentence on what its map means, for overlays and the report.
        class_specific: ``False`` when the map ignores the target (computed once for several targets).
        accepts_functions: whether a score function can be the target.
        needs_global_attention: the method reads attention between all tokens of the image (or one flat token
            sequence through every block); models without it (Swin) are refused in one line.
        needs_head: whether the method reads a classifier (refused on a model without one).
    """

    name: str = ""
    paper: str = ""
    cost: str = ""
    scale: str = "minmax"
    meaning: str = ""
    class_specific: bool = True
    accepts_functions: bool = True
    needs_global_attention: bool = False
    needs_head: bool = False

    def __init__(self, model):
        self.backbone: Backbone = load_model(model)
        if self.needs_global_attention:
            require_global_attention(self.backbone, self.name)
        if self.needs_head and self.backbone.headless:
            raise VitlensError(f"method {self.name!r} needs a classifier head; this model outputs an embedding")

    @classmethod
    def options(cls) -> dict[str, object]:
        """Option names and their defaults (the keyword-only parameters of ``__init__``)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @classmethod
    def option_types(cls) -> dict[str, str]:
        """Option names and their annotated types, as written."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: str(p.annotation) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def settings(self) -> dict[str, object]:
        """The options this explainer was built with."""
        return {k: getattr(self, k) for k in self.options()}

    def __call__(self, images: Tensor, target: object = None, *, normalized: bool = False) -> Explanation:
        """Explain ``images`` for ``target``.

        Args:
            images: ``[B, 3, H, W]`` (or one ``[3, H, W]``) float in [0, 1] or uint8 in 0..255.
            target: what to explain (see :mod:`vitlens.explainers.targets`): ``None`` (the predicted class),
                a class index or name, one per image, a list per image, :class:`TopK`, a score function, or for
                an image–text model without classes a :class:`~vitlens.TextPrompt` (or a prompt string).
            normalized: the images are already normalised with the model's mean/std.

        Returns:
            An :class:`Explanation` (maps ``[B, gh, gw]``, or ``[B, K, gh, gw]`` for ``K`` targets per image).
        """
        target = bind_target(target, self.backbone)  # text prompts of image–text models
        if self.backbone.headless and self.class_specific and not is_score_function(target):
            raise VitlensError(NO_HEAD)
        with frozen_eval(self.backbone, float32=True):
            # the image check reads two numbers back from the device: last, so the GPU idles least
            images = prepare_images(images, self.backbone, normalized)
            plan = parse_target(target, len(images), self.backbone.classes)
            check_size(self.backbone, tuple(images.shape[-2:]))
            if any(t.is_function for t in plan) and not (self.accepts_functions and self.class_specific):
                why = "its map does not depend on the target" if not self.class_specific else "it explains classes"
                raise VitlensError(f"method {self.name!r} cannot explain a score function: {why}")
            with torch.enable_grad():  # gradient methods work under an outer no_grad too
                maps, logits, extras = self.explain_targets(images, plan)
            if logits is None:
                with torch.no_grad():
                    logits = self.backbone(images)
        return self._result(images, plan, maps, logits.detach(), extras, multi=len(plan) > 1)

    def explain_targets(self, images: Tensor, targets: list[Target]) -> tuple[Tensor, Tensor | None, dict]:
        """Maps ``[B, gh, gw]`` (one target) or ``[B, K, gh, gw]``, the clean logits if known, and extras.

        Calls :meth:`explain` once per target (once in all for class-agnostic methods); methods that get
        every class from one pass (PM) override it.
        """
        outs: list[tuple] = []
        for t in targets:
            outs.append(outs[0] if outs and not self.class_specific else _as_triple(self.explain(images, t)))
        if len(outs) == 1:
            return outs[0]
        extras = {k: torch.stack([o[2][k] for o in outs], 1) for k in outs[0][2]}
        return torch.stack([o[0] for o in outs], 1), outs[0][1], extras

    def explain(self, images: Tensor, target: Target) -> Tensor | tuple:
        """One target per image → maps ``[B, gh, gw]``, or ``(maps, logits)``, or ``(maps, logits, extras)``.

        ``images`` are float32 in [0, 1] on the model's device; the model is in eval mode with frozen
        parameters. Return the clean logits when the method's pass computed them (saves a forward).
        """
        raise NotImplementedError

    def _result(self, images, plan, maps, logits, extras, multi: bool) -> Explanation:
        classes = self.backbone.classes
        if any(t.is_function for t in plan) or self.backbone.headless:
            targets, names = None, [[t.name or "score function"] * len(images) for t in plan]
        else:
            targets = torch.stack([t.indices(logits) for t in plan], 1).to(logits.device)
            names = [[classes[int(i)] for i in row] for row in targets.T.tolist()]
        names = [list(col) for col in zip(*names, strict=True)]  # per image
        if not multi:
            targets = targets[:, 0] if targets is not None else None
            names = [n[0] for n in names]
        return Explanation(
            maps=maps.detach().to(torch.float64 if maps.dtype == torch.float64 else torch.float32),
            method=self.name,
            scale=self.scale,
            targets=targets,
            class_names=names,
            logits=logits,
            images=images,
            class_specific=self.class_specific,
            classes=list(classes),
            extras={k: v.detach() for k, v in extras.items()},
        )


def _as_triple(out) -> tuple[Tensor, Tensor | None, dict]:
    if torch.is_tensor(out):
        return out, None, {}
    maps, logits, *rest = out
    return maps, (logits.detach() if logits is not None else None), (rest[0] if rest else {})


def check_options(cls: type[Explainer], options: dict) -> None:
    """A one-line error for option names the method does not have."""
    unknown = set(options) - set(cls.options())
    if unknown:
        known = ", ".join(cls.options()) or "none"
        raise VitlensError(f"{cls.name}: unknown option(s) {', '.join(sorted(unknown))} (known: {known})")


def get_explainer(method: str, model, **options) -> Explainer:
    """The explainer ``method`` for ``model`` with ``options`` (see ``vitlens methods``).

    Build it once to explain several batches with the same settings.

    Args:
        method: a registered method name.
        model (object): anything :func:`vitlens.load_model` accepts.
        **options (object): the method's options; unknown names are refused in one line.

    Returns:
        The :class:`Explainer`; call it as ``explainer(images, target)``.

    Examples:
        >>> ig = get_explainer("ig", model, steps=16)
        >>> for images in batches:
        ...     e = ig(images, target=vitlens.TopK(2))
    """
    if method not in EXPLAINERS:
        raise VitlensError(f"unknown method {method!r} (known: {', '.join(sorted(EXPLAINERS))})")
    cls = EXPLAINERS[method]
    check_options(cls, options)
    return cls(model, **options)


def explain(
    model, images: Tensor, method: str = "rollout", target: object = None, *, normalized: bool = False, **options
) -> Explanation:
    """Explain ``images`` with ``method``: ``vitlens.explain(model, images, method="gae", target="Trouser")``.

    Args:
        model (Backbone | nn.Module | str | PathLike): a :class:`~vitlens.Backbone`, a timm / Hugging Face /
            torchvision ViT module (also compiled, ``DataParallel``-wrapped, ``Sequential(normalize, vit)`` or
            half precision), a model URI (``timm:NAME``, ``hf:NAME``, ``torchvision:NAME``, ``vitlens:NAME``)
            or a checkpoint directory.
        images: ``[B, 3, H, W]`` float in [0, 1] or uint8 in 0..255; one ``[3, H, W]`` image is a batch of one.
        method: a registered method (``vitlens methods`` lists them with their options).
        target: ``None`` (the predicted class), a class index or name, one per image, a list per image,
            ``vitlens.TopK(k)``, a score function of the model's output ``[B, C] → [B]``, or for an image–text
            model without classes a ``vitlens.TextPrompt`` (or a prompt string).
        normalized: the images are already normalised with the model's mean/std.
        **options (object): the method's options (``steps=64`` for ``ig``, …).

    Returns:
        An :class:`Explanation`: ``.maps`` ``[B, gh, gw]`` (``[B, K, gh, gw]`` for several targets per
        image), ``.targets``, ``.class_names``, ``.logits``, ``.degenerate``, ``.upsample()``,
        ``.overlay()``, ``.show()``, ``.numpy()``.

    Examples:
        >>> import torch, vitlens
        >>> model = vitlens.load_model("vitlens:fashion-vit")
        >>> e = vitlens.explain(model, torch.rand(2, 3, 64, 64), method="gae", target="Trouser")
        >>> e.maps.shape
        torch.Size([2, 8, 8])
    """
    return get_explainer(method, model, **options)(images, target, normalized=normalized)


__all__ = [
    "EXPLAINERS",
    "Explainer",
    "Explanation",
    "Target",
    "TopK",
    "class_index",
    "explain",
    "frozen_eval",
    "get_explainer",
    "register",
]
