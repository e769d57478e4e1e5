"""PM — patch-level mask prediction (Kang, Heo, Choe, Pattern Recognition Letters 187 (2025) 73–79).

The model's own classifier is applied to every final-normed patch token, ``s_i = head(z_i)``, and the PM
map for class ``c`` is ``sigmoid(s_i[c])``: a probability per patch that it is class-``c`` evidence. It comes
from the same single forward pass as the prediction, adds no parameters, and is class-dependent. The
paper's full text is not public; this design satisfies every property it states and follows the same
group's ReLabel idea of applying the classifier at every location. The map only becomes a good one after
PM fine-tuning (``vitlens train pm``), which supervises it on a few masks.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..backbones import Backbone, Trace
from .base import Explainer, register
from .targets import Target


def patch_probabilities(backbone: Backbone, trace: Trace) -> Tensor:
    """The PM volume ``[B, C, gh, gw]``: sigmoid of the head applied to every final-normed patch token."""
    logits = backbone.token_logits(trace.patch_tokens)  # [B, N, C]
    return trace.to_grid(logits.sigmoid()).permute(0, 3, 1, 2)


def pm_maps(backbone: Backbone, trace: Trace, target: Tensor) -> Tensor:
    """The PM map of class ``target[b]`` for every image ``[B, gh, gw]``: the volume's slice, with the
    sigmoid taken on the target's patch logits only."""
    logits = backbone.token_logits(trace.patch_tokens)  # [B, N, C]
    picked = logits.gather(2, target.view(-1, 1, 1).expand(-1, logits.shape[1], 1))[..., 0]
    return trace.to_grid(picked.sigmoid())


def is_pm_trained(backbone: Backbone) -> bool:
    """Whether ``backbone`` comes from a ``vitlens train pm`` checkpoint."""
    return (backbone.config or {}).get("kind") == "pm"


@register
class PM(Explainer):
    """PM: the probability, per patch, that it is evidence for the target class (one forward pass).

    Several targets per image (``TopK``, lists per image) come from the same single pass. A model that was
    never PM fine-tuned gives a warning: its patch read-out is not trained to localise.
    """

    name = "pm"
    paper = "Kang, Heo, Choe, Improving ViT interpretability with patch-level mask prediction, PRL 2025"
    cost = "1 forward (the prediction's own pass; no extra parameters)"
    scale = "probability"
    meaning = "the probability that each patch shows the target class (trained on a few masks)"
    accepts_functions = False
    needs_head = True

    def __init__(self, model):
        super().__init__(model)
        if not is_pm_trained(self.backbone):
            warnings.warn(
                "method 'pm' on a model that was not PM fine-tuned: its patch read-out is untrained and the map "
                "is not a localisation (fine-tune it with `vitlens train pm`, or use e.g. vitlens:fashion-vit-pm)",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def explain(self, images: Tensor, target: Target) -> tuple[Tensor, Tensor]:
        trace = self.backbone.run(images)
        return pm_maps(self.backbone, trace, target.indices(trace.logits)), trace.logits

    @torch.no_grad()
    def explain_targets(self, images: Tensor, targets: list[Target]) -> tuple[Tensor, Tensor, dict]:
        """Every target's map from one forward pass."""
        trace = self.backbone.run(images)
        maps = [pm_maps(self.backbone, trace, t.indices(trace.logits)) for t in targets]
        return (maps[0] if len(maps) == 1 else torch.stack(maps, 1)), trace.logits, {}

    def volume(self, images: Tensor) -> Tensor:
        """Every class's PM map at once: ``[B, C, gh, gw]`` probabilities for images in [0, 1]."""
        from .base import frozen_eval, prepare_images

        images = prepare_images(images, self.backbone)
        with frozen_eval(self.backbone, float32=True), torch.no_grad():
            return patch_probabilities(self.backbone, self.backbone.run(images)).float()
