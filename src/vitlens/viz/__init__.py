"""Drawing explanations: overlays, boxes and captions in one consistent style."""

from .overlay import overlay, save_png

__all__ = ["overlay", "save_png"]
