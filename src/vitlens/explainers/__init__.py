"""Explainers by name: ``vitlens.explain(model, images, method=NAME, target=None, **options)``."""

from . import attention, pm  # noqa: F401  (registers the methods)
from .base import EXPLAINERS, Explainer, check_target, explain, get_explainer, register, resolve_target

__all__ = ["EXPLAINERS", "Explainer", "check_target", "explain", "get_explainer", "register", "resolve_target"]
