"""Rewards: images + prompts in, ``RewardResult`` out (contract in ``base.py``). An explicit registry.

Mini-world rewards, all real and offline:
- ``compose``: a detector for the mini-world's objects (GenEval-style strict correctness + partial score);
- ``compose_strict``: the same detector's all-or-nothing correctness as the score (GenEval's accuracy);
- ``ocr``: rapidocr 3.x recognition scored as the paper's OCR reward;
- ``ocr_likelihood``: the same recogniser's CTC likelihood of the target text (a dense form of ``ocr`` to train on);
- ``quality``: a documented no-reference quality score of mini-world images;
- ``random``: pseudo-random scores unrelated to the image, a null control for training recipes.
"""

from __future__ import annotations

from typing import Any

from flowopd_core.rewards.base import Reward, RewardResult, SampleScore
from flowopd_core.rewards.compose import ComposeConfig, ComposeReward, ComposeStrictReward
from flowopd_core.rewards.ocr import OCRConfig, OCRLikelihoodReward, OCRReward
from flowopd_core.rewards.quality import QualityConfig, QualityReward
from flowopd_core.rewards.random_control import RandomConfig, RandomReward
from flowopd_core.rewards.real import REAL_REWARDS, PickScoreConfig, PickScoreReward

REWARDS: dict[str, type[Reward]] = {
    "compose": ComposeReward,
    "compose_strict": ComposeStrictReward,
    "ocr": OCRReward,
    "ocr_likelihood": OCRLikelihoodReward,
    "quality": QualityReward,
}

# rewards to train on in experiments only: never a metric (the Evaluator's "all" is REWARDS)
CONTROL_REWARDS: dict[str, type[Reward]] = {"random": RandomReward}

# mini-world task -> the reward that judges it
TASK_REWARDS: dict[str, str] = {"compose": "compose", "text": "ocr", "quality": "quality"}


def make_reward(name: str, **config: Any) -> Reward:
    """Build a registered reward (:data:`REWARDS`, a local-weights adapter of :data:`REAL_REWARDS`, or one of
    :data:`CONTROL_REWARDS`); ``config`` are the fields of its config dataclass."""
    registry: dict[str, type[Reward]] = {**REWARDS, **REAL_REWARDS, **CONTROL_REWARDS}
    if name not in registry:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(registry)}")
    cls = registry[name]
    return cls(cls.config_type(**config))


__all__ = [
    "REAL_REWARDS",
    "REWARDS",
    "TASK_REWARDS",
    "CONTROL_REWARDS",
    "ComposeConfig",
    "ComposeReward",
    "ComposeStrictReward",
    "OCRConfig",
    "OCRLikelihoodReward",
    "OCRReward",
    "PickScoreConfig",
    "PickScoreReward",
    "QualityConfig",
    "QualityReward",
    "RandomConfig",
    "RandomReward",
    "Reward",
    "RewardResult",
    "SampleScore",
    "make_reward",
]
