"""Hierarchical ViTs (Swin): stages of windowed-attention blocks, the token grid halving between stages.

The :class:`Backbone` view of such a model: ``blocks`` are the stages (each with its patch merging), the
trace's ``hidden`` holds the tokens entering each stage and the last stage's output, flattened row-major
to ``[B, N_k, D_k]`` (count and width change from stage to stage), and the trace's ``grid`` is the last
stage's grid, the grid of every map (7×7 for a 224-pixel Swin-T). The patch ``embeddings`` lie on the
finer grid of the patch embedding. There are no prefix tokens; the head averages the final tokens.

Windowed attention never relates every token of the image to every other one, so these backbones set
``global_attention = False`` and the methods that read attention over the whole image refuse them;
gradient and perturbation methods and PM work on the last stage's grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from ..errors import VitlensError
from .base import Backbone


class HierarchicalBackbone(Backbone):
    """A :class:`Backbone` whose blocks are stages that change the token grid and width.

    Subclasses implement :meth:`stage` (one stage on flat tokens) and :meth:`last_stage_norm`, beside the
    usual ``embed``, ``add_prefix_and_position``, ``final_norm``, ``head`` and ``token_logits``.
    """

    global_attention = False

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        return ()

    @property
    def pooling(self) -> str:
        return "avg"

    def stage(self, index: int, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Stage ``index`` on tokens ``[B, N, D]`` of ``grid`` → its output tokens and their grid."""
        raise NotImplementedError

    def last_stage_norm(self) -> nn.Module:
        """Grad-CAM's layer: the last block's second norm (``[B, N, D]`` out), in front of its MLP (after it in
        Swin V2's post-norm blocks)."""
        raise NotImplementedError

    def final_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The last stage's grid for a patch-embedding ``grid``: between consecutive stages, 2×2 tokens merge
        into one (odd sides padded)."""
        gh, gw = grid
        for _ in range(len(self.blocks) - 1):
            gh, gw = (gh + 1) // 2, (gw + 1) // 2
        return gh, gw

    def grid_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """The grid of the maps (the last stage's) for an input of ``size`` (H, W)."""
        return self.final_grid(super().grid_for(size))

    def attention_norm(self, index: int) -> nn.Module:
        """Grad-CAM's layer: the last stage's :meth:`last_stage_norm` (pytorch-grad-cam's Swin target layer);
        earlier stages lie on finer grids than the map and are refused in one line."""
        last = len(self.blocks) - 1
        if index != last:
            raise VitlensError(
                f"gradcam on a {self.family} model reads its last stage (layer=-1 or {last}): stage {index} "
                "lies on a finer grid than the map"
            )
        return self.last_stage_norm()

    def _no_global_attention(self) -> VitlensError:
        return VitlensError(
            f"{self.family} models have windowed attention only: there are no attention probabilities over the "
            "whole image to read"
        )

    @contextlib.contextmanager
    def capture_attention(self) -> Iterator[list[Tensor]]:
        raise self._no_global_attention()
        yield []  # pragma: no cover
