"""Explainers by name: ``vitlens.explain(model, images, method=NAME, target=None, **options)``."""

# importing a method's module registers it
from . import attention, attnlrp, bcos, chefer, diffmask, gradients, perturbation, pm  # noqa: F401
from .base import EXPLAINERS, Explainer, explain, frozen_eval, get_explainer, register
from .explanation import SCALES, Explanation
from .targets import EmbeddingSimilarity, Target, TopK, parse_target

__all__ = [
    "EXPLAINERS",
    "SCALES",
    "EmbeddingSimilarity",
    "Explainer",
    "Explanation",
    "Target",
    "TopK",
    "explain",
    "frozen_eval",
    "get_explainer",
    "parse_target",
    "register",
]
