"""Training Vision DiffMask gates on a frozen classifier.

Per step: sample a state ℓ per image, sample Hard Concrete gates for states 0..ℓ and multiply them
(a patch can be dropped at any depth), replace closed patches by the placeholder at the embedding level,
and minimise ``α_ℓ (KL(p_orig ‖ p_masked) − ε) + L0`` where ``L0`` is the cumulative sum of
log P(gate ≠ 0) averaged over patches. The Lagrange multipliers α (one per state) are updated by gradient
*ascent* (Adam with ``maximize=True``) and clipped to [0, 200], so a violated constraint raises its
multiplier and a satisfied one lowers it to the floor. (The public reference implementation flips the
sign before the gradient exists, so its multipliers descend.) The classifier's parameters are frozen:
gradients flow through its activations to the gates, never into its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbones import Backbone
from ..data import collate, open_dataset, parse_data_spec
from ..errors import VitlensError
from ..explainers.base import require_global_attention
from ..explainers.diffmask import DiffMaskGates
from .classifier import prompt_classes
from .distributed import all_reduce_sum
from .loop import Task, TrainConfig, check_resumable, held_out_spec, provenance, train
from .optim import Lookahead


def kl_to_original(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class DiffMaskTask(Task):
    kind = "diffmask"

    def __init__(
        self,
        backbone: Backbone,
        *,
        kl_margin: float = 0.1,
        multiplier_init: float = 20.0,
        multiplier_max: float = 200.0,
        multiplier_lr: float = 0.3,
        placeholder_lr_scale: float = 10.0,
        scale: float = 15.0,
        offset: float = 8.0,
        gates: DiffMaskGates | None = None,
        seed: int = 0,
    ):
        require_global_attention(backbone, "diffmask")
        super().__init__(backbone)
        for p in backbone.parameters():
            p.requires_grad_(False)
        dim = backbone.run(
            torch.zeros(1, 3, *backbone.preprocessing.input_size, device=backbone.mean.device)
        ).tokens.shape[-1]
        num_states = len(backbone.blocks) + 2
        if gates is None:
            with torch.random.fork_rng(devices=[]):  # the initial gates depend on the seed alone
                torch.manual_seed(seed)
                gates = DiffMaskGates(dim, num_states, scale, offset)
        self.gates = gates
        self.settings = {**gates.settings(), "kl_margin": kl_margin}
        self.kl_margin, self.multiplier_max, self.placeholder_lr_scale = kl_margin, multiplier_max, placeholder_lr_scale
        self.multipliers = torch.full((num_states,), float(multiplier_init), requires_grad=True)
        self.multiplier_opt = torch.optim.Adam([self.multipliers], lr=multiplier_lr, maximize=True)

    def modules(self) -> torch.nn.Module:
        return self.gates

    def optimizer(self, cfg: TrainConfig):
        self.multipliers = self.multipliers.detach().to(self.backbone.mean.device).requires_grad_(True)
        self.multiplier_opt = torch.optim.Adam([self.multipliers], lr=self.multiplier_opt.defaults["lr"], maximize=True)
        probes = [p for n, p in self.gates.named_parameters() if n != "placeholder"]
        groups = [
            {"params": probes, "lr": cfg.lr},
            {"params": [self.gates.placeholder], "lr": cfg.lr * self.placeholder_lr_scale},
        ]
        return Lookahead(torch.optim.Adam(groups), k=6, alpha=0.5)

    def loss(self, module, batch, step):
        self.backbone.eval()  # frozen: no dropout, BatchNorm statistics untouched
        images = batch["image"]
        with torch.no_grad():
            trace = self.backbone.run(images)
            log_p = trace.logits.log_softmax(-1)
        log_alpha = module(trace)  # [B, K, N]
        b, k, _ = log_alpha.shape
        layer = torch.randint(0, k, (b,), device=images.device)
        rows = torch.arange(b, device=images.device)
        open_gates = self.gates.gate.sample(log_alpha).cumprod(1)[rows, layer]
        masked = self.backbone.run(embeddings=self.gates.masked_embeddings(trace, open_gates), grid=trace.grid)
        kl = kl_to_original(log_p, masked.logits.log_softmax(-1))
        l0 = self.gates.gate.log_p_open(log_alpha).cumsum(1)[rows, layer].mean(-1)
        loss = (self.multipliers.to(kl.device)[layer] * (kl - self.kl_margin)).mean() + l0.mean()
        return loss, {"kl": kl.mean().item(), "l0": l0.mean().item(), "open": (open_gates > 0).float().mean().item()}

    def after_step(self, step: int) -> None:
        """Gradient ascent on the multipliers, then clip them to [0, max]."""
        if self.multipliers.grad is None:
            return
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.multipliers.grad = all_reduce_sum(self.multipliers.grad) / world
        self.multiplier_opt.step()
        self.multiplier_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.multipliers.clamp_(0, self.multiplier_max)

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.detach().cpu(), "multiplier_opt": self.multiplier_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.multipliers.copy_(state["multipliers"])
        self.multiplier_opt.load_state_dict(state["multiplier_opt"])

    def save_extras(self) -> tuple[dict, dict]:
        tensors = {f"gates.{k}": v for k, v in self.gates.state_dict().items()}
        tensors["multipliers"] = self.multipliers.detach()
        return tensors, {"diffmask": self.settings}

    @torch.no_grad()
    def masked_kl(self, images: torch.Tensor) -> torch.Tensor:
        """KL(p_orig ‖ p_masked) per image with the deterministic (expected) gates of all states."""
        trace = self.backbone.run(images)
        gates = self.gates.gate.expected_gate(self.gates(trace)).prod(1)
        masked = self.backbone.run(embeddings=self.gates.masked_embeddings(trace, gates), grid=trace.grid)
        return kl_to_original(trace.logits.log_softmax(-1), masked.logits.log_softmax(-1))


def train_diffmask(
    model,
    data: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    kl_margin: float = 0.1,
    multiplier_lr: float = 0.3,
    resume: bool = False,
    overwrite: bool = False,
    classes_from_prompts: bool = False,
) -> dict:
    """``vitlens train diffmask``: DiffMask gates for a frozen classifier.

    The checkpoint holds the classifier unchanged plus the gates, so it loads as the classifier with
    the ``diffmask`` explainer attached.

    Args:
        model (str | PathLike): the frozen classifier (URI, ``vitlens:NAME`` or checkpoint directory).
        data: a data spec, e.g. ``"counting:train"``.
        out: the checkpoint directory to write.
        cfg: the loop's settings.
        kl_margin: KL(p_orig || p_masked) allowed, in nats.
        multiplier_lr: learning rate of the Lagrange multipliers.
        resume: continue the interrupted run in ``out``.
        overwrite: replace a model already in ``out`` instead of refusing.
        classes_from_prompts: ``model`` is an image–text model (CLIP, SigLIP): its zero-shot classifier over
            the data's class names is the classifier (:func:`prompt_classes`).

    Returns:
        The run's summary (training seconds, held-out KL and share within the margin).
    """
    from ..models import load_model
    from ..models.checkpoint import load_checkpoint

    spec = parse_data_spec(data, default_split="train")
    if resume:
        check_resumable(out, str(spec))
        backbone = load_checkpoint(out, kind="diffmask")
        task = DiffMaskTask(
            backbone, kl_margin=kl_margin, multiplier_lr=multiplier_lr, gates=DiffMaskGates.from_checkpoint(backbone)
        )
        source = backbone.config["training"].get("base_model")
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
    else:
        backbone = load_model(model)
        if backbone.spec is None:
            raise VitlensError("DiffMask needs a model loaded from a URI or a vitlens checkpoint")
        if (backbone.config or {}).get("kind") == "diffmask":
            raise VitlensError(f"{model} is already a DiffMask checkpoint; pass the classifier it was trained on")
        dataset = open_dataset(spec, size=backbone.preprocessing.input_size)
        if classes_from_prompts:
            backbone = prompt_classes(backbone, dataset)
        task = DiffMaskTask(backbone, kl_margin=kl_margin, multiplier_lr=multiplier_lr, seed=cfg.seed)
        source = str(model)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    record = provenance(spec, base_model=source)

    def evaluate(bb, d):
        test = open_dataset(held_out_spec(spec, None), size=bb.preprocessing.input_size)
        images = collate([test[i] for i in range(min(256, len(test)))])["image"].to(bb.mean.device)
        kl = task.masked_kl(images)
        frozen = all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
        if not frozen:
            raise RuntimeError("DiffMask training changed the frozen classifier")  # a bug, never a user error
        return {
            "held_out_kl": round(kl.mean().item(), 4),
            "held_out_within_margin": round((kl <= kl_margin).float().mean().item(), 4),
        }

    return train(task, dataset, out, cfg, resume=resume, provenance=record, evaluate=evaluate, overwrite=overwrite)
