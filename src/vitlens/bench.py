"""``vitlens bench``: the cost of each explanation method as a ratio to one plain forward pass.

Both are timed on the same batch, device and run (warm-up, then the median of ``repeat`` runs), so the
ratio is comparable across machines even when absolute times are not.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .backbones import load_model
from .explainers import get_explainer


class PeakMemory:
    """Peak memory above the starting point while the block runs (MB): CUDA allocator or sampled RSS."""

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
        else:
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
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max, self._rss())
        self.peak_mb = max(0.0, (peak - self._base) / 2**20)


def time_call(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak MB) of ``fn`` over ``repeat`` runs after ``warmup`` runs."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak_mb


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
) -> dict:
    """Time a plain forward and every method on one random batch; returns the ``--json`` record."""
    dev = torch.device(device)
    backbone = load_model(model).to(dev).eval()
    size = (image_size, image_size) if image_size else backbone.preprocessing.input_size
    images = torch.rand(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dev)

    def forward() -> None:
        with torch.no_grad():
            backbone(images)

    forward_s, _ = time_call(forward, dev, repeat)
    results = {}
    for name in methods:
        explainer = get_explainer(name, backbone, **(options or {}).get(name, {}))
        seconds, peak = time_call(lambda e=explainer: e(images), dev, repeat)
        results[name] = {
            "seconds": seconds,
            "seconds_per_image": seconds / batch_size,
            "ratio_to_forward": seconds / forward_s,
            "peak_mem_mb": round(peak, 1),
        }
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "model": str(model),
        "batch_size": batch_size,
        "image_size": list(size),
        "forward_s": forward_s,
        "threads": torch.get_num_threads(),
        "results": results,
    }


def format_bench(record: dict) -> str:
    fwd = record["forward_s"]
    lines = [
        f"{record['model']} on {record['device']}, batch {record['batch_size']}, "
        f"forward {fwd * 1000:.1f} ms ({fwd / record['batch_size'] * 1000:.2f} ms/image)",
        f"{'method':<14} {'s/image':>10} {'x forward':>10} {'peak MB':>9}",
    ]
    for name, r in record["results"].items():
        lines.append(
            f"{name:<14} {r['seconds_per_image']:>10.4f} {r['ratio_to_forward']:>10.2f} {r['peak_mem_mb']:>9.1f}"
        )
    return "\n".join(lines)
