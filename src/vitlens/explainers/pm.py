"""PM — patch-level mask prediction (Kang, Heo, Choe, Pattern Recognition Letters 187 (2025) 73–79).

The paper's full text is not public; this is the design of SPEC §3.1 that satisfies every property it
states (and follows the same group's ReLabel idea of applying the classifier at every location): the
model's own classifier is applied to every final-normed patch token, ``s_i = head(z_i)``, and the PM map
for class ``c`` is ``sigmoid(s_i[c])`` — a probability per patch that it is class-``c`` evidence. It comes
from the same single forward pass as the prediction, adds no parameters, and is class-dependent. It only
becomes a good map after PM fine-tuning (``vitlens train pm``), which supervises it on a few masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backbones import Backbone, Trace
from .base import Explainer, frozen_eval, register, resolve_target


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


@register
class PM(Explainer):
    name = "pm"
    paper = "Kang, Heo, Choe, Improving ViT interpretability with patch-level mask prediction, PRL 2025"
    cost = "1 forward (the prediction's own pass; no extra parameters)"

    @torch.no_grad()
    def explain(self, images: Tensor, target) -> Tensor:
        trace = self.backbone.run(images)
        return pm_maps(self.backbone, trace, resolve_target(target, trace.logits))

    def explain_and_predict(self, images: Tensor, target=None) -> tuple[Tensor, Tensor]:
        """Map and logits from one forward pass."""
        images = self._check(images)
        with frozen_eval(self.backbone), torch.no_grad():
            trace = self.backbone.run(images)
            maps = pm_maps(self.backbone, trace, resolve_target(target, trace.logits))
        return maps.float(), trace.logits

    def volume(self, images: Tensor) -> Tensor:
        """Every class's PM map at once: ``[B, C, gh, gw]`` probabilities."""
        images = self._check(images)
        with frozen_eval(self.backbone), torch.no_grad():
            return patch_probabilities(self.backbone, self.backbone.run(images)).float()
