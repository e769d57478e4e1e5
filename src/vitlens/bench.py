"""``vitlens bench``: the cost of each explanation method as a ratio to one plain forward pass.

The forward pass and every method are timed on the same batch, device and run, interleaved (one warm-up
call each, in which peak memory is measured, then ``repeat`` rounds of one call each), so slow drifts of
a shared machine hit all of them alike and the ratio is comparable across machines even when absolute
times are not. ``seconds`` and ``forward_s`` are medians over the rounds (per batch);
``ratio_to_forward`` is the median over the rounds of the method's time over the forward pass's time in
the same round; ``runs`` lists every round's seconds. ``diffmask`` on a model without DiffMask gates is
timed with seeded, untrained gates (the map's cost does not depend on the gates' values); ``bcos`` needs
a B-cos ViT as the model (``bcos:NAME``), and its ratio is to that model's own forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .backbones import Backbone
from .backbones.base import CheckpointRecord
from .errors import VitlensError
from .explainers import Explainer, get_explainer
from .models import load_model


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so RSS growth measures live memory."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting point while the block runs (MB): CUDA allocator or sampled RSS.

    On the CPU the resident set is sampled every millisecond after freed heap memory has been returned to
    the OS, so the figure is the growth of live memory (Linux; ``None`` where ``/proc`` is missing).
    """

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif not os.path.exists("/proc/self/statm"):
            self._base = None
        else:
            _trim_heap()
            self._base, self._max, self._stop = self._rss(), 0, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._base is None:
            self.peak_mb = None
            return
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.peak_mb = max(0.0, (peak - self._base) / 2**20)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """One call's timings: the seconds of every round, their median, and the peak memory (MB)."""

    runs: list[float]
    peak_mb: float | None

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    def ratio_to(self, base: Timing) -> float:
        """The median over rounds of this call's time over ``base``'s time in the same round."""
        return statistics.median(t / b for t, b in zip(self.runs, base.runs, strict=True))


def time_calls(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    repeat: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """The :class:`Timing` of every call, timed interleaved.

    Each call runs ``warmup`` times first (peak memory is measured in the first of them, so the sampling
    never runs while a call is timed); then ``repeat`` rounds run every call once, in order. ``clock``:
    wall time by default; ``time.process_time`` counts this process's CPU time only (see :func:`bench`).
    """
    peaks: dict[str, float | None] = {}
    for name, fn in calls.items():
        with PeakMemory(device) as mem:
            fn()
        peaks[name] = mem.peak_mb
        for _ in range(warmup - 1):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return {name: Timing(times[name], peaks[name]) for name in calls}


def with_untrained_gates(backbone: Backbone, seed: int = 0) -> Backbone:
    """A view of ``backbone`` (same modules) carrying seeded, untrained DiffMask gates, for timing.

    The gates are the ones ``vitlens train diffmask`` starts from, stored the way its checkpoints store
    them, so the ``diffmask`` explainer loads them through its usual path. The map's cost does not depend
    on the gates' values.
    """
    from .training.diffmask import DiffMaskTask

    flags = [p.requires_grad for p in backbone.parameters()]
    try:
        tensors, extra = DiffMaskTask(backbone, seed=seed).save_extras()
    finally:
        for p, flag in zip(backbone.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    view = copy.copy(backbone)
    config = {**(backbone.config or {}), **extra, "kind": "diffmask"}
    gates = {k: v.to(backbone.mean.device) for k, v in tensors.items() if k.startswith("gates.")}
    view.checkpoint = CheckpointRecord(config, gates)
    return view


def make_explainer(name: str, backbone: Backbone, options: dict | None = None, seed: int = 0) -> Explainer:
    """The explainer ``bench`` times: ``diffmask`` gets untrained gates when the model has none."""
    if name == "diffmask" and (backbone.config or {}).get("kind") != "diffmask":
        backbone = with_untrained_gates(backbone, seed)
    return get_explainer(name, backbone, **(options or {}))


def bench(
    model,
    methods: Sequence[str],
    *,
    batch_size: int = 16,
    image_size: int | None = None,
    device: str = "cpu",
    repeat: int = 5,
    options: dict[str, dict] | None = None,
    seed: int = 0,
    autocast: torch.dtype | None = None,
    warmup: int = 1,
    cpu_time: bool = False,
) -> dict:
    """Time a plain forward and every method on one random batch; returns the ``--json`` record.

    ``options`` maps a method to its options; ``autocast`` (e.g. ``torch.bfloat16``) runs the forward
    pass and every method under ``torch.autocast`` with that dtype. ``seconds`` is per batch.
    ``cpu_time`` measures this process's CPU time instead of wall time (CPU only): on a machine shared
    with higher-priority work, with one thread (``torch.set_num_threads(1)``), it counts the work done
    and not the time spent waiting for a core.
    """
    dev = torch.device(device)
    backbone = load_model(model).to(dev).eval()
    size = (image_size, image_size) if image_size else backbone.preprocessing.input_size
    images = torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dev)
    if image_size:
        try:
            with torch.no_grad():
                backbone(images[:1])
        except (AssertionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise VitlensError(
                f"--image-size {image_size}: the model does not take {image_size} px inputs ({first})"
            ) from e

    explainers = {name: make_explainer(name, backbone, (options or {}).get(name), seed) for name in methods}

    def autocasting() -> contextlib.AbstractContextManager:
        return torch.autocast(dev.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()

    def forward() -> None:
        with torch.no_grad(), autocasting():
            backbone(images)

    def explain(e: Explainer) -> None:
        with autocasting():
            e(images)

    calls = {"forward": forward, **{name: (lambda e=e: explain(e)) for name, e in explainers.items()}}
    if cpu_time and dev.type != "cpu":
        raise VitlensError("cpu_time measures CPU work: use it with device cpu")
    timed = time_calls(calls, dev, repeat, warmup, time.process_time if cpu_time else time.perf_counter)
    fwd = timed.pop("forward")
    results = {
        name: {
            "seconds": t.seconds,
            "seconds_per_image": t.seconds / batch_size,
            "ratio_to_forward": t.ratio_to(fwd),
            "peak_mem_mb": None if t.peak_mb is None else round(t.peak_mb, 1),
            "runs": t.runs,
        }
        for name, t in timed.items()
    }
    return {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "model": os.fspath(model) if isinstance(model, str | os.PathLike) else type(model).__name__,
        "batch_size": batch_size,
        "image_size": list(size),
        "forward_s": fwd.seconds,
        "forward_runs": fwd.runs,
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "clock": "process CPU time" if cpu_time else "wall",
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
        "options": {name: e.settings for name, e in explainers.items() if (options or {}).get(name)},
        "results": results,
    }


def format_bench(record: dict) -> str:
    fwd = record["forward_s"]
    lines = [
        f"{record['model']} on {record['device']}"
        f"{', ' + record['autocast'] + ' autocast' if record.get('autocast') else ''}, batch {record['batch_size']}, "
        f"forward {fwd * 1000:.1f} ms ({fwd / record['batch_size'] * 1000:.2f} ms/image)",
        f"{'method':<14} {'s/image':>10} {'x forward':>10} {'peak MB':>9}",
    ]
    for name, r in record["results"].items():
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        lines.append(f"{name:<14} {r['seconds_per_image']:>10.4f} {r['ratio_to_forward']:>10.2f} {peak:>9}")
    return "\n".join(lines)
