"""Vision DiffMask (Nalmpantis et al., CVPR-W 2023; DiffMask: De Cao et al., EMNLP 2020).

Post-hoc gates on a frozen classifier's hidden states learn the smallest set of patches whose removal
(replacement by a learned placeholder at the patch-embedding level) keeps the predicted distribution.
The attribution map is the product over all hidden states of P(gate ≠ 0) per patch: deterministic, one
forward pass of the model plus the probes.

Hidden states (``L + 2`` for ``L`` blocks): the patch embeddings before position embeddings (with the
model's own prefix tokens, as they enter the first block, in front), the input of every block, and the
final output. Probe ``k`` reads ``[h_0 ; h_k]`` per token.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..backbones import Backbone, Trace
from ..backbones.base import CheckpointRecord
from ..errors import VitlensError
from ..models.checkpoint import WEIGHTS, check_tensors
from .base import Explainer, frozen_eval, register


class HardConcrete:
    """Hard Concrete gates (Louizos et al. 2018): temperature β, stretch (l, r), clamped to [0, 1]."""

    def __init__(self, beta: float = 0.2, l: float = -0.2, r: float = 1.0):  # noqa: E741 - the paper's names
        self.beta, self.l, self.r = beta, l, r

    def sample(self, log_alpha: Tensor) -> Tensor:
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / self.beta)
        return (s * (self.r - self.l) + self.l).clamp(0, 1)

    def log_p_open(self, log_alpha: Tensor) -> Tensor:
        """log P(gate ≠ 0) = log σ(log α − β log(−l / r))."""
        return nn.functional.logsigmoid(log_alpha - self.beta * math.log(-self.l / self.r))

    def p_one(self, log_alpha: Tensor) -> Tensor:
        """P(gate = 1) = σ(log α − β log((1 − l) / (r − 1))); 0 when r ≤ 1 (the stretch never reaches 1)."""
        if self.r <= 1:
            return torch.zeros_like(log_alpha)
        return torch.sigmoid(log_alpha - self.beta * math.log((1 - self.l) / (self.r - 1)))

    def expected_gate(self, log_alpha: Tensor) -> Tensor:
        """The deterministic gate DiffMask uses at test time: clamp(σ(log α)(r − l) + l, 0, 1)."""
        return (torch.sigmoid(log_alpha) * (self.r - self.l) + self.l).clamp(0, 1)


class Probe(nn.Module):
    """Weight-normalised Linear(2D → D/4) → tanh → Linear(D/4 → 1) → tanh, × scale, + learned offset.

    Gates must start open. With PyTorch's default init, the last layer's bias shifts all gate
    logits of a state at once and ``tanh × scale`` can outweigh the offset, so for some seeds whole states
    started shut; a shut Hard Concrete gate passes no gradient and training collapsed (KL > 3 on held-out
    images for 1 of 8 seeds). So the last layer starts with a zero bias and half the default weight norm:
    logits start spread around the offset (training still finds the sparse set quickly), all gates open.
    (A zero last layer keeps every gate at P(open) ≈ 1, where the L0 term has no gradient: nothing learns.)
    """

    def __init__(self, dim: int, scale: float = 15.0, offset: float = 8.0):
        super().__init__()
        hidden = max(1, dim // 4)
        self.fc1 = weight_norm(nn.Linear(2 * dim, hidden))
        self.fc2 = weight_norm(nn.Linear(hidden, 1))
        with torch.no_grad():  # gates start open: logits spread around the offset, no per-state shift
            self.fc2.parametrizations.weight.original0.mul_(0.5)
            self.fc2.bias.zero_()
        self.scale = scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, first: Tensor, state: Tensor) -> Tensor:
        x = torch.tanh(self.fc1(torch.cat([first, state], dim=-1)))
        return torch.tanh(self.fc2(x))[..., 0] * self.scale + self.offset


def _stacked(probes: nn.ModuleList, layer: str) -> tuple[Tensor, Tensor]:
    """The weights ``[K, out, in]`` and biases ``[K, out]`` of every probe's weight-normalised ``layer``, as
    one computation (``w = g · v / ‖v‖`` per output row, as ``weight_norm`` computes it)."""
    linears = [getattr(probe, layer) for probe in probes]
    g = torch.stack([m.parametrizations.weight.original0 for m in linears])
    v = torch.stack([m.parametrizations.weight.original1 for m in linears])
    return v * (g / torch.linalg.vector_norm(v, dim=-1, keepdim=True)), torch.stack([m.bias for m in linears])


class DiffMaskGates(nn.Module):
    """The trainable part: one probe per hidden state and the placeholder embedding.

    Its weights are the regular :meth:`state_dict`; :meth:`settings` are the arguments that rebuild it.
    A ``vitlens train diffmask`` checkpoint stores both (``gates.*`` tensors, the ``diffmask`` config entry)
    and :meth:`from_checkpoint` reads them back.

    Args:
        dim: the width of the model's tokens.
        num_states: how many hidden states are gated (``L + 2`` for ``L`` blocks).
        scale: the probes' logit range around the offset.
        offset: the probes' initial logit (gates start open).

    Examples:
        >>> gates = DiffMaskGates(32, 4)
        >>> DiffMaskGates(**gates.settings()).load_state_dict(gates.state_dict())
        <All keys matched successfully>
    """

    def __init__(self, dim: int, num_states: int, scale: float = 15.0, offset: float = 8.0):
        super().__init__()
        self.dim, self.num_states, self.scale, self.offset = dim, num_states, float(scale), float(offset)
        self.probes = nn.ModuleList(Probe(dim, scale, offset) for _ in range(num_states))
        self.placeholder = nn.Parameter(nn.init.xavier_normal_(torch.empty(1, dim)))
        self.gate = HardConcrete()

    @classmethod
    def for_backbone(cls, backbone: Backbone, scale: float = 15.0, offset: float = 8.0) -> DiffMaskGates:
        """Fresh (untrained) gates for every hidden state of ``backbone``."""
        dim = backbone.run(
            torch.zeros(1, 3, *backbone.preprocessing.input_size, device=backbone.mean.device)
        ).embeddings.shape[-1]
        return cls(dim, len(backbone.blocks) + 2, scale, offset).to(backbone.mean.device)

    def settings(self) -> dict:
        """The arguments that rebuild these gates: ``dim``, ``num_states``, ``scale``, ``offset``."""
        return {"dim": self.dim, "num_states": self.num_states, "scale": self.scale, "offset": self.offset}

    @classmethod
    def from_checkpoint(cls, source: Backbone | CheckpointRecord) -> DiffMaskGates:
        """The gates stored in a ``vitlens train diffmask`` checkpoint, in eval mode.

        Args:
            source: a model loaded from the checkpoint (the gates go to its device) or its
                :class:`~vitlens.backbones.base.CheckpointRecord` (the gates stay on the CPU).

        Returns:
            The trained gates.

        Raises:
            VitlensError: (one line) the model is no DiffMask checkpoint, or its ``gates.*`` tensors do not
                fit the ``diffmask`` settings of its config.

        Examples:
            >>> gates = DiffMaskGates.from_checkpoint(load_model("vitlens:fashion-vit-diffmask"))
        """
        record = source.checkpoint if isinstance(source, Backbone) else source
        config = {} if record is None else record.config
        if config.get("kind") != "diffmask":
            raise VitlensError(
                "method 'diffmask' needs a DiffMask checkpoint (train one with `vitlens train diffmask`); "
                f"this model is {'a ' + config['kind'] + ' checkpoint' if config else 'not a vitlens checkpoint'}"
            )
        settings = config["diffmask"]
        gates = cls(settings["dim"], settings["num_states"], settings["scale"], settings["offset"])
        state = {k[len("gates.") :]: v for k, v in record.tensors.items() if k.startswith("gates.")}
        where = str(Path(record.path) / WEIGHTS) if record.path else "the checkpoint"
        check_tensors(state, gates.state_dict(), f"{where}: the DiffMask gates")
        gates.load_state_dict(state)
        if isinstance(source, Backbone):
            gates = gates.to(source.mean.device)
        return gates.eval()

    @staticmethod
    def states(trace: Trace) -> list[Tensor]:
        """The ``L + 2`` hidden states: embeddings (with the prefix tokens in front), block inputs, output."""
        first = torch.cat([trace.hidden[0][:, : trace.num_prefix_tokens], trace.embeddings], dim=1)
        return [first, *trace.hidden]

    def log_alpha(self, trace: Trace) -> Tensor:
        """Gate logits ``[B, K, N]`` for the patch tokens of every state.

        Equal to ``probe(states[0], states[k])`` for every probe ``k``, computed for all probes at once: the
        first state's half of every first layer is one product, and no ``[h_0 ; h_k]`` copy is made (per probe
        calls cost a fast GPU forward pass a fifth more).
        """
        p = trace.num_prefix_tokens
        states = [trace.embeddings, *(h[:, p:] for h in trace.hidden)]  # the patch tokens of self.states(trace)
        w1, b1 = _stacked(self.probes, "fc1")  # [K, h, 2D], [K, h]
        w2, b2 = _stacked(self.probes, "fc2")  # [K, 1, h], [K, 1]
        dim = states[0].shape[-1]
        from_first = nn.functional.linear(states[0], w1[..., :dim].flatten(0, 1)).unflatten(-1, w1.shape[:2])
        parts = zip(states, w1[..., dim:], b1, strict=True)
        from_state = torch.stack([nn.functional.linear(s, w, b) for s, w, b in parts], 2)
        hidden = torch.tanh(from_first + from_state)  # [B, N, K, h]
        out = torch.tanh(torch.einsum("bnkh,kh->bkn", hidden, w2[:, 0]) + b2)
        offsets = torch.stack([probe.offset for probe in self.probes])
        return out * self.scale + offsets[:, None]

    def forward(self, trace: Trace) -> Tensor:
        return self.log_alpha(trace)

    def masked_embeddings(self, trace: Trace, gates: Tensor) -> Tensor:
        """Patch embeddings with closed gates (``[B, N]`` in [0, 1]) replaced by the placeholder."""
        g = gates[..., None]
        return g * trace.embeddings + (1 - g) * self.placeholder

    def attribution(self, trace: Trace) -> Tensor:
        """Π_k P(gate_k ≠ 0) per patch → ``[B, gh, gw]`` (the paper's deterministic map)."""
        return trace.to_grid(self.gate.log_p_open(self.log_alpha(trace)).sum(1).exp())


@register
class DiffMask(Explainer):
    """The DiffMask map explains the predicted distribution as a whole (it is trained to keep it), so it
    is the same for every ``target``.

    Args (positional):
        model: a ``vitlens train diffmask`` checkpoint (its gates are loaded), or any model together with
            ``gates``.
        gates: gates to use instead of the checkpoint's, e.g. ``DiffMaskTask(...).gates`` while training or
            ``DiffMaskGates.for_backbone(backbone)`` (untrained) in tests.

    Examples:
        >>> DiffMask("vitlens:fashion-vit-diffmask")(images).maps.shape
        torch.Size([8, 8, 8])
    """

    name = "diffmask"
    needs_global_attention = True
    paper = "Nalmpantis et al., VISION DIFFMASK, CVPR-W 2023 (De Cao et al. 2020)"
    cost = "1 forward + the gate probes (needs a `vitlens train diffmask` checkpoint)"
    scale = "probability"
    meaning = "the probability that the patch must stay for the prediction to hold (class-agnostic)"
    class_specific = False
    needs_head = True

    def __init__(self, model, gates: DiffMaskGates | None = None):
        super().__init__(model)
        self.gates = (
            DiffMaskGates.from_checkpoint(self.backbone)
            if gates is None
            else gates.to(self.backbone.mean.device).eval()
        )
        if len(self.gates.probes) != len(self.backbone.blocks) + 2:
            raise VitlensError(
                f"diffmask: the gates read {len(self.gates.probes)} hidden states, this model has "
                f"{len(self.backbone.blocks) + 2}"
            )

    @torch.no_grad()
    def explain(self, images: Tensor, target) -> tuple[Tensor, Tensor]:
        with frozen_eval(self.gates):
            trace = self.backbone.run(images)
            return self.gates.attribution(trace), trace.logits
