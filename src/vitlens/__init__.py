"""vitlens: explain the decisions of Vision Transformers.

PM (Kang, Heo, Choe 2025), B-cos ViTs (Böhle, Fritz, Schiele 2023) and Vision DiffMask
(Nalmpantis et al. 2023), with the baselines and evaluation protocols of their papers.

``import vitlens`` is light: torch and the model libraries are imported the first time one of the
names below is used (PEP 562), so ``vitlens --help`` answers at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import VitlensError

# public name → the module that defines it (imported on first use)
_LAZY = {
    "Backbone": ".backbones",
    "load_model": ".models",
    "explain": ".explainers",
    "Explanation": ".explainers",
    "TopK": ".explainers",
    "EmbeddingSimilarity": ".explainers",
    "show": ".viz",
    "TextPrompt": ".explainers.prompts",
    "zero_shot": ".models.image_text",
}

__all__ = [
    "Backbone",
    "EmbeddingSimilarity",
    "Explanation",
    "TextPrompt",
    "TopK",
    "VitlensError",
    "__version__",
    "explain",
    "load_model",
    "show",
    "zero_shot",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them
    from .backbones import Backbone
    from .explainers import EmbeddingSimilarity, Explanation, TopK, explain
    from .explainers.prompts import TextPrompt
    from .models import load_model
    from .models.image_text import zero_shot
    from .viz import show


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
