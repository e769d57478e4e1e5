"""Explainers by name: ``vitlens.explain(model, images, method=NAME, target=None, **options)``."""

# importing a method's module registers it
from . import attention, bcos, chefer, diffmask, gradients, perturbation, pm  # noqa: F401
from .base import EXPLAINERS, Explainer, check_target, explain, get_explainer, register, resolve_target

__all__ = ["EXPLAINERS", "Explainer", "check_target", "explain", "get_explainer", "register", "resolve_target"]
