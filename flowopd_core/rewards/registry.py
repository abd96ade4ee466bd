"""The reward registries: name -> reward class (:data:`REWARDS`, :data:`CONTROL_REWARDS`, and
:data:`~flowopd_core.rewards.real.REAL_REWARDS`) and :func:`make_reward`. Importing it imports every reward's
code (torch, numpy); :mod:`flowopd_core.rewards.names` holds the same names without it. ``flowopd_core.rewards``
re-exports all of this lazily."""

from __future__ import annotations

from typing import Any

from flowopd_core.rewards import names
from flowopd_core.rewards.base import Reward
from flowopd_core.rewards.compose import ComposeDenseReward, ComposeReward, ComposeStrictReward
from flowopd_core.rewards.ocr import OCRLikelihoodReward, OCRReward
from flowopd_core.rewards.quality import QualityReward
from flowopd_core.rewards.random_control import RandomReward
from flowopd_core.rewards.real import REAL_REWARDS

REWARDS: dict[str, type[Reward]] = {
    "compose": ComposeReward,
    "compose_strict": ComposeStrictReward,
    "compose_dense": ComposeDenseReward,
    "ocr": OCRReward,
    "ocr_likelihood": OCRLikelihoodReward,
    "quality": QualityReward,
}

# rewards to train on in experiments only: never a metric (the Evaluator's "all" is REWARDS)
CONTROL_REWARDS: dict[str, type[Reward]] = {"random": RandomReward}

TASK_REWARDS = names.TASK_REWARDS  # mini-world task -> the reward that judges it (literal in names.py)


def make_reward(name: str, **config: Any) -> Reward:
    """Build a registered reward (:data:`REWARDS`, a local-weights adapter of :data:`REAL_REWARDS`, or one of
    :data:`CONTROL_REWARDS`); ``config`` are the fields of its config dataclass."""
    registry: dict[str, type[Reward]] = {**REWARDS, **REAL_REWARDS, **CONTROL_REWARDS}
    if name not in registry:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(registry)}")
    cls = registry[name]
    return cls(cls.config_type(**config))
