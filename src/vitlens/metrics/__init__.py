"""Evaluation metrics by name and the ``vitlens evaluate`` driver.

``vitlens.metrics.evaluate(model, methods, metrics, data)`` scores explanation methods; each metric is
also usable on its own: ``m = METRICS["deletion"](fill="blur"); m.update(Batch(...), maps); m.finish();
m.result()``.
"""

from . import grid, localisation, perturbation, sanity  # noqa: F401  (registers the metrics)
from .base import METRICS, Batch, Metric, get_metric, register
from .evaluate import evaluate, format_table, parse_options
from .localisation import boxes_from_map

__all__ = [
    "METRICS",
    "Batch",
    "Metric",
    "boxes_from_map",
    "evaluate",
    "format_table",
    "get_metric",
    "parse_options",
    "register",
]
