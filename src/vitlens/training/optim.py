"""Optimiser helpers shared by the trainers."""

from __future__ import annotations

import torch


class Lookahead:
    """Lookahead (Zhang et al. 2019) around any optimiser: every ``k`` steps the slow weights move
    ``alpha`` of the way to the fast ones and the fast weights restart from there (used by DiffMask)."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5):
        self.inner, self.k, self.alpha = inner, k, alpha
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._steps = 0
        self._slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self._steps += 1
        if self._steps % self.k == 0:
            for slow, fast in zip(self._slow, (p for g in self.param_groups for p in g["params"]), strict=True):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)
        return loss

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "steps": self._steps, "slow": [s.clone() for s in self._slow]}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.param_groups = self.inner.param_groups
        self._steps = state["steps"]
        for slow, saved in zip(self._slow, state["slow"], strict=True):
            slow.copy_(saved)
