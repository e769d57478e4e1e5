"""vitlens: explain the decisions of Vision Transformers.

PM (Kang, Heo, Choe 2025), B-cos ViTs (Böhle, Fritz, Schiele 2023) and Vision DiffMask
(Nalmpantis et al. 2023), with the baselines and evaluation protocols of their papers.
"""

__version__ = "0.1.0"

from .backbones import Backbone, load_model  # noqa: E402
from .errors import VitlensError  # noqa: E402
from .explainers import EmbeddingSimilarity, Explanation, TopK, explain  # noqa: E402
from .viz import show  # noqa: E402

__all__ = [
    "Backbone",
    "EmbeddingSimilarity",
    "Explanation",
    "TopK",
    "VitlensError",
    "__version__",
    "explain",
    "load_model",
    "show",
]
