"""The one result object every explainer returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import VitlensError

#: How a method's values map to colours. ``minmax``: relative evidence, min-max scaled per map;
#: ``signed``: positive and negative evidence, a diverging colour map centred at 0; ``probability``:
#: absolute probabilities in [0, 1]; ``positive``: the positive part relative to the largest value.
SCALES = ("minmax", "signed", "probability", "positive")


@dataclass(eq=False)
class Explanation:
    """Maps of one method for a batch of images, with what they explain.

    Attributes:
        maps: float32 ``[B, gh, gw]`` on the patch grid (``[B, K, gh, gw]`` for ``K`` targets per image).
            Higher means more evidence for the target.
        method: the method's registry name (``"gae"``, ``"pm"``, …).
        scale: how the values are meant to be read and drawn (see :data:`SCALES`).
        targets: class indices ``[B]`` (or ``[B, K]``) the maps explain; ``None`` for a score function.
        class_names: the targets' class names, per image (a list, or a list of lists for ``K`` targets).
        logits: the model's output ``[B, C]`` for the unmodified images (``None`` if not computed).
        images: the images explained, ``[B, 3, H, W]`` in [0, 1] (used by :meth:`overlay` and :meth:`show`).
        class_specific: ``False`` for methods whose map ignores the target (attention, rollout, DiffMask).
        classes: the model's class names (index → name).
        extras: method-specific tensors (B-cos: ``"colour"`` ``[B, H, W, 4]`` and ``"contributions"``).

    Examples:
        >>> e = vitlens.explain(model, images, method="gae", target="Trouser")
        >>> e.maps.shape, e.class_names[0], e.degenerate.any()
        >>> pixels = e.upsample()                      # [B, H, W] at the images' size
        >>> fig, axes = e.show()                       # a matplotlib grid (needs vitlens[viz])
    """

    maps: Tensor
    method: str
    scale: str = "minmax"
    targets: Tensor | None = None
    class_names: list | None = None
    logits: Tensor | None = None
    images: Tensor | None = None
    class_specific: bool = True
    classes: list[str] | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, index: int | slice) -> Explanation:
        """The explanation of image ``index`` (or a slice of images), as a batch of its own."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)

        def pick(value):
            return value[index] if torch.is_tensor(value) else value

        return replace(
            self,
            maps=self.maps[index],
            targets=pick(self.targets),
            class_names=self.class_names[index] if self.class_names is not None else None,
            logits=pick(self.logits),
            images=pick(self.images),
            extras={k: v[index] for k, v in self.extras.items()},
        )

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(gh, gw)``."""
        return tuple(self.maps.shape[-2:])

    @property
    def multi_target(self) -> bool:
        """Whether there are several maps per image (``[B, K, gh, gw]``)."""
        return self.maps.ndim == 4

    @property
    def probabilities(self) -> Tensor | None:
        """Softmax of :attr:`logits` ``[B, C]``."""
        return None if self.logits is None else self.logits.float().softmax(-1)

    @property
    def predicted(self) -> Tensor | None:
        """The predicted class of each image ``[B]``."""
        if self.logits is None or self.classes == []:  # no classes: a model whose output is an embedding
            return None
        return self.logits.argmax(-1)

    @property
    def predicted_names(self) -> list[str] | None:
        """The predicted class name of each image."""
        if self.logits is None or not self.classes:  # no classes: a model whose output is an embedding
            return None
        return [self.classes[i] for i in self.predicted.tolist()]

    @property
    def degenerate(self) -> Tensor:
        """``True`` for constant maps (all values equal, e.g. an all-zero Grad-CAM): they carry no evidence.

        Shape ``[B]`` (``[B, K]`` for several targets). Such maps are labelled, never drawn as answers.
        """
        flat = self.maps.flatten(-2)
        lo, hi = flat.amin(-1), flat.amax(-1)
        return (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)

    def upsample(self, size: tuple[int, int] | None = None, mode: str = "bilinear") -> Tensor:
        """Maps at pixel resolution: ``[B, H, W]`` (or ``[B, K, H, W]``); default size: the images'.

        Args:
            size: ``(H, W)``; default: the size of :attr:`images`.
            mode: ``"bilinear"`` (default), ``"bicubic"`` or ``"nearest"`` (each patch a flat square).
        """
        if size is None:
            if self.images is None:
                raise ValueError("upsample() needs a size: this explanation keeps no images")
            size = tuple(self.images.shape[-2:])
        maps = self.maps.float()
        lead = maps.shape[:-2]
        flat = maps.reshape(-1, 1, *maps.shape[-2:])
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        return F.interpolate(flat, size=tuple(size), mode=mode, **kwargs).reshape(*lead, *size)

    def numpy(self):
        """The maps as a NumPy array (float32, on the CPU)."""
        return self.maps.detach().float().cpu().numpy()

    def overlay(self, images: Tensor | None = None, *, size: int | None = None, title: bool = True) -> list:
        """One PIL picture per map: the map over its image, coloured by :attr:`scale`.

        Args:
            images: ``[B, 3, H, W]`` in [0, 1], at any resolution (default: the images explained).
                Overlays are drawn at that resolution, aspect kept.
            size: the longer side of each picture in pixels (default: the image's own size, at least 256).
            title: add a caption (method, class, constant-map label).

        Returns:
            A list of ``B`` pictures (``B × K`` for several targets per image, image-major).
        """
        from ..viz.overlay import explanation_overlays

        images = self.images if images is None else images
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[:2] != (len(self.maps), 3):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise VitlensError(f"overlay: images must be a tensor [{len(self.maps)}, 3, H, W] in [0, 1], got {got}")
        return explanation_overlays(self, images, size=size, title=title)

    def show(self, images: Tensor | None = None, **kwargs):
        """A matplotlib grid of the overlays (rows: images; columns: targets). See :func:`vitlens.show`."""
        from ..viz.show import show

        return show(self.images if images is None else images, self, **kwargs)

    def to(self, device) -> Explanation:
        """The explanation with every tensor on ``device``."""

        def move(v):
            return v.to(device) if torch.is_tensor(v) else v

        return replace(
            self,
            maps=self.maps.to(device),
            targets=move(self.targets),
            logits=move(self.logits),
            images=move(self.images),
            extras={k: move(v) for k, v in self.extras.items()},
        )

    def __repr__(self) -> str:
        return (
            f"Explanation(method={self.method!r}, maps={list(self.maps.shape)}, scale={self.scale!r}, "
            f"constant={int(self.degenerate.sum())})"
        )
