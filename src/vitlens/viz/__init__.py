"""Drawing explanations: overlays, boxes and captions in one consistent style; ``show`` for notebooks."""

from .overlay import overlay, save_png
from .show import show

__all__ = ["overlay", "save_png", "show"]
