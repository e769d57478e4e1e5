"""The metric contract: ``update(batch, maps)`` per batch, ``result()`` once at the end.

In the spirit of torchmetrics: a metric keeps its state as float64 *sums* (counts, histograms, sums of
scores) so that the states of several torchrun processes add up to the state of one process over the
whole data set, and per-image values (gathered and put back in data-set order) for the report. A
metric never reaches into a model's internals: it sees images, ground truth, the maps, and — when it
declares so in ``needs`` — the model's logits and the explainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import VitlensError

METRICS: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    """Class decorator adding a metric to the registry under ``cls.name``."""
    METRICS[cls.name] = cls
    return cls


def get_metric(name: str, **options) -> Metric:
    """A fresh metric by name, with options (``vitlens metrics`` lists them); a one-line error for unknown names."""
    if name not in METRICS:
        raise VitlensError(f"unknown metric {name!r} (known: {', '.join(sorted(METRICS))})")
    return METRICS[name](**options)


@dataclass
class Batch:
    """One batch as the metrics see it.

    ``boxes`` holds one ``[K, 4]`` tensor per image (inclusive pixel corners x0, y0, x1, y1; ``K = 0``
    when the image has none); ``masks`` ``[B, H, W]`` bool with ``has_mask`` ``[B]`` telling which are
    real; ``ignore`` ``[B, H, W]`` bool (optional) marks pixels no pixel metric scores (OpenImages' ignore
    regions). ``targets`` is the class every map explains; ``logits`` are the model's on the clean images.
    ``model`` and ``explainer`` are there for the metrics that need them; ``extra`` carries data-set
    specific entries (fashion-grid's ``labels``, ``cells``, ``sources`` and the ``dataset``); ``cache``
    is shared by the metrics of one method on this batch, ``shared`` by all methods on this batch.
    """

    images: Tensor
    labels: Tensor
    targets: Tensor
    index: Tensor
    boxes: list[Tensor] = field(default_factory=list)
    masks: Tensor | None = None
    has_mask: Tensor | None = None
    logits: Tensor | None = None
    model: Callable[[Tensor], Tensor] | None = None
    explainer: Callable[[Tensor, Tensor], Tensor] | None = None
    extra: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    ignore: Tensor | None = None

    def __post_init__(self) -> None:
        b, _, h, w = self.images.shape
        if not self.boxes:
            self.boxes = [torch.zeros(0, 4) for _ in range(b)]
        if self.masks is None:
            self.masks = torch.zeros(b, h, w, dtype=torch.bool)
            self.has_mask = torch.zeros(b, dtype=torch.bool)
        elif self.has_mask is None:
            self.has_mask = torch.ones(b, dtype=torch.bool)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def correct(self) -> Tensor:
        """Top-1 correctness of the clean images ``[B]`` (needs ``logits``)."""
        return self.logits.argmax(1).cpu() == self.labels.cpu()

    def padded_boxes(self) -> tuple[Tensor, Tensor]:
        """Boxes as one float64 tensor ``[B, Kmax, 4]`` and their validity ``[B, Kmax]``."""
        k = max([len(b) for b in self.boxes] + [1])
        out = torch.zeros(len(self.boxes), k, 4, dtype=torch.float64)
        valid = torch.zeros(len(self.boxes), k, dtype=torch.bool)
        for i, b in enumerate(self.boxes):
            out[i, : len(b)] = b.double().cpu()
            valid[i, : len(b)] = True
        return out, valid

    @property
    def has_boxes(self) -> Tensor:
        return torch.tensor([len(b) > 0 for b in self.boxes], dtype=torch.bool)

    @property
    def has_object_mask(self) -> Tensor:
        """Images with a mask that marks at least one pixel."""
        return self.has_mask.cpu() & self.masks.cpu().flatten(1).any(1)


class Metric:
    """Base class: subclasses set ``name``, ``paper``, ``needs`` and implement :meth:`update`, :meth:`result`.

    ``needs`` names what a metric requires beyond maps: ``"boxes"``, ``"mask"``, ``"model"``,
    ``"explainer"``, ``"fashion-grid"`` (its cells and source canvases). Options work as for explainers: ``options()``
    gives names and defaults, ``self.settings`` the merged values. ``protocols`` names the reference
    protocols a metric can follow (its ``protocol`` option; the first is the default), each described in
    the metric's docstring (its protocol card).
    """

    name: str = ""
    paper: str = ""
    needs: tuple[str, ...] = ()
    higher_is_better: bool = True
    protocols: tuple[str, ...] = ()
    in_all: bool = True  # part of ``--metrics all`` (False for the costly ones, run when named)

    def __init__(self, **options):
        unknown = set(options) - set(self.options())
        if unknown:
            known = ", ".join(self.options()) or "none"
            raise VitlensError(f"{self.name}: unknown option(s) {', '.join(sorted(unknown))} (known: {known})")
        self.settings = {**self.options(), **options}
        self.sums: dict[str, Tensor] = {"n": torch.zeros((), dtype=torch.float64)}
        self._index: list[np.ndarray] = []
        self._records: dict[str, list[np.ndarray]] = {}
        self.index = np.zeros(0, dtype=np.int64)
        self.records: dict[str, np.ndarray] = {}

    @classmethod
    def options(cls) -> dict:
        """Option names and their defaults."""
        return {}

    @classmethod
    def applies_to(cls, dataset) -> bool:
        """Whether the metric can run on ``dataset`` at all (``vitlens evaluate --metrics all`` uses this)."""
        return True

    def setup(self, model, dataset) -> None:
        """Called once before the first batch (allocate states whose shape depends on the model)."""

    def update(self, batch: Batch, maps: Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """The metric's values: its own name first, then ``name/detail`` keys."""
        raise NotImplementedError

    def curves(self) -> dict:
        """Curves for the report (mean perturbation curves, accuracy over thresholds, …)."""
        return {}

    def per_image(self) -> dict[str, list]:
        """Per-image values in data-set order, with their data-set ``index``."""
        if not len(self.index):
            return {}
        return {"index": self.index.tolist(), **{k: v.tolist() for k, v in self.records.items()}}

    def statistic(self, weights: np.ndarray) -> dict[str, np.ndarray] | None:
        """The metric's values recomputed with row weights ``[R, rows]`` (rows as :attr:`index`, after
        :meth:`finish`): ``{key: [R]}``, NaN where a replicate has no row. With all weights 1 it equals
        :meth:`result`; the bootstrap passes multinomial counts. ``None``: no per-row form."""
        return None

    def direction(self, key: str) -> int:
        """How ``key`` ranks methods: 1 higher is better, −1 lower is better, 0 not ranked."""
        return 1 if self.higher_is_better else -1

    @property
    def used(self) -> int:
        """How many samples (or grid cells) the metric scored."""
        return int(self.sums["n"].item())

    # --- state ------------------------------------------------------------------------------------

    def add(self, key: str, value: Tensor | float) -> None:
        """Add ``value`` to the float64 sum ``key`` (created on first use; allocate in ``__init__``/``setup``
        when the key may stay unused on some process)."""
        v = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    def record(self, index: Tensor, **values: Tensor | np.ndarray) -> None:
        """Keep per-image values (rows aligned with ``index``) for :meth:`per_image`."""
        self._index.append(np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64).reshape(-1))
        for k, v in values.items():
            arr = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
            self._records.setdefault(k, []).append(arr)

    def finish(self) -> None:
        """Sum the states over torchrun processes and gather the per-image values (in data-set order)."""
        if dist.is_initialized():
            for key in sorted(self.sums):
                t = self.sums[key].clone()
                dist.all_reduce(t)
                self.sums[key] = t
        index = np.concatenate(self._index) if self._index else np.zeros(0, dtype=np.int64)
        records = {k: np.concatenate(v) for k, v in self._records.items()}
        if dist.is_initialized():
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (index, records))
            index = np.concatenate([p[0] for p in parts])
            keys = sorted({k for p in parts for k in p[1]})
            records = {k: np.concatenate([p[1][k] for p in parts if k in p[1]]) for k in keys}
        extra = records.get("cell")
        order = np.lexsort((extra, index)) if extra is not None else np.argsort(index, kind="stable")
        self.index = index[order]
        self.records = {k: v[order] for k, v in records.items()}


def weighted_mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Row-weighted means: ``weights`` ``[R, rows]`` and ``values`` ``[rows, …]`` → ``[R, …]`` (NaN where a
    replicate's weights sum to 0)."""
    values = np.asarray(values, dtype=np.float64)
    total = weights.sum(1).reshape(-1, *([1] * (values.ndim - 1)))
    sums = (weights @ values.reshape(len(values), -1)).reshape(len(weights), *values.shape[1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, sums / np.where(total > 0, total, 1), np.nan)


def check_choice(metric: str, option: str, value, allowed) -> None:
    """One-line error for an option value outside ``allowed``."""
    if value not in allowed:
        raise VitlensError(f"{metric}: {option}={value!r} is not one of {', '.join(map(str, allowed))}")
