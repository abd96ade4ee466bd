"""Exponential moving average of a set of named parameters (the LoRA weights of a trainer), docs/method.md §2.

Flow-GRPO's schedule (its ``EMAModuleWrapper``): after optimizer step n (0-based count of the steps before it),
when (n + 1) is a multiple of ``every``, every shadow weight moves as

    ema <- ema + (1 - d_n) (p - ema),    d_n = min((1 + n) / (10 + n), decay)

so the average warms up over the first steps and then forgets with ``decay`` (0.9 every 8 steps by default).
diffusers' ``EMAModel`` has the same warm-up but counts its own updates and has no update interval, hence
this small class. The shadow lives on the parameters' device, in float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch


class EMA:
    """Shadow copies of ``params`` (name -> parameter) updated by :meth:`step` (see the module doc)."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float = 0.9, every: int = 8) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        self.decay = decay
        self.every = every
        self.shadow = {name: p.detach().to(torch.float32).clone() for name, p in params.items()}

    def current_decay(self, step: int) -> float:
        """d_n = min((1 + n) / (10 + n), decay) for the optimizer step with 0-based index n."""
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def step(self, params: Mapping[str, torch.Tensor], step: int) -> bool:
        """Fold ``params`` in after optimizer step ``step`` (0-based) if (step + 1) % every == 0; True if it did."""
        if (step + 1) % self.every:
            return False
        self._check(params)
        weight = 1.0 - self.current_decay(step)
        for name, p in params.items():
            shadow = self.shadow[name]
            shadow.add_(p.detach().to(shadow.dtype) - shadow, alpha=weight)
        return True

    @contextmanager
    def swapped_in(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block ``params`` hold the EMA weights; their own values are restored afterwards."""
        self._check(params)
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (decay and interval belong to the config)."""
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._check(state)
        for name, value in state.items():
            self.shadow[name].copy_(value)

    def _check(self, params: Mapping[str, torch.Tensor]) -> None:
        if set(params) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(params)), sorted(set(params) - set(self.shadow))
            raise KeyError(f"EMA parameter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
