"""Uncertainty of the evaluation: bootstrap intervals over images, paired between methods, and whether the
best method is significantly better than each other one.

Every replicate draws the evaluated images with replacement (multinomial counts, a fixed seed), and every
metric of every method is recomputed from its per-image records with those counts as weights
(:meth:`vitlens.metrics.Metric.statistic`): data-set level metrics (MaxBoxAcc's best threshold, PxAP's
precision-recall curve, mIoU's data-set IoU) are recomputed in full, not averaged per image, and the cells
of a grid image move together with their image. Because all methods see the same replicates, the
difference between two methods is bootstrapped *paired*: the interval of the difference is much tighter
than the two intervals suggest when the methods succeed and fail on the same images. Intervals are
percentile intervals (2.5 % and 97.5 % of the replicates at the default 95 % level).
"""

from __future__ import annotations

import numpy as np

from .base import Metric

REPLICATES = 1000
LEVEL = 0.95
CHUNK = 100  # replicates drawn and evaluated at once


def resample_counts(n: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """How often each of ``n`` images is drawn in each replicate ``[replicates, n]`` (multinomial, seeded;
    the draws :func:`bootstrap` makes, chunk by chunk)."""
    rng = np.random.default_rng(seed)
    chunks = [
        rng.multinomial(n, np.full(n, 1.0 / n), size=min(CHUNK, replicates - s)) for s in range(0, replicates, CHUNK)
    ]
    return np.concatenate(chunks).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def bootstrap(
    metrics: dict[str, dict[str, Metric]], replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL
) -> tuple[dict[str, dict[str, list[float] | None]], dict[str, dict[str, np.ndarray]]]:
    """Percentile intervals ``{method: {key: [lo, hi]}}`` and the replicates ``{method: {key: [R]}}`` of the
    finished ``metrics`` ``{method: {metric name: Metric}}``, all methods on the same replicates."""
    indices = [m.index for per in metrics.values() for m in per.values() if len(m.index)]
    if not indices or replicates < 1:
        return {m: {} for m in metrics}, {m: {} for m in metrics}
    images = np.unique(np.concatenate(indices))
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in metrics}
    for start in range(0, replicates, CHUNK):  # bounded memory: CHUNK × images counts at a time
        counts = rng.multinomial(
            len(images), np.full(len(images), 1.0 / len(images)), size=min(CHUNK, replicates - start)
        )
        counts = counts.astype(np.float64)
        for method, per in metrics.items():
            for metric in per.values():
                if not len(metric.index):
                    continue
                stats = metric.statistic(counts[:, np.searchsorted(images, metric.index)])
                for key, values in (stats or {}).items():
                    parts[method].setdefault(key, []).append(values)
    samples = {m: {k: np.concatenate(v) for k, v in per.items()} for m, per in parts.items()}
    intervals = {m: {k: _interval(v, level) for k, v in per.items()} for m, per in samples.items()}
    return intervals, samples


def best_methods(
    results: dict[str, dict[str, float | None]],
    samples: dict[str, dict[str, np.ndarray]],
    directions: dict[str, int],
    level: float = LEVEL,
) -> dict[str, dict]:
    """For each ranked key: the best method by its value and whether its paired bootstrap difference to every
    other method is significant.

    Returns ``{key: {"best": [methods], "significant": bool, "versus": {method: [lo, hi]}}}``: ``best``
    holds the best method and every method whose paired difference to it is not significant (a tie:
    the interval of the difference, oriented so that positive favours the best, contains 0);
    ``significant`` is true when the best stands alone; ``versus`` gives the interval of the difference
    best − other for each other method. Keys with direction 0 and keys scored for fewer than two methods
    are left out.
    """
    out: dict[str, dict] = {}
    for key, sign in directions.items():
        scored = [m for m in results if results[m].get(key) is not None]
        if not sign or len(scored) < 2:
            continue
        best = max(scored, key=lambda m: sign * results[m][key])
        tied, versus = [best], {}
        for other in scored:
            if other == best:
                continue
            a, b = samples.get(best, {}).get(key), samples.get(other, {}).get(key)
            if a is None or b is None:
                tied.append(other)  # no per-image form: no claim
                continue
            diff = _interval(a - b, level)
            versus[other] = diff
            if diff is None or (diff[0] <= 0 if sign > 0 else diff[1] >= 0):  # the interval reaches 0
                tied.append(other)
        out[key] = {"best": tied, "significant": len(tied) == 1, "versus": versus}
    return out
