"""Rewards: images + prompts in, ``RewardResult`` out (contract in ``base.py``). An explicit registry.

Mini-world rewards, all real and offline:
- ``compose``: a detector for the mini-world's objects (GenEval-style strict correctness + partial score);
- ``ocr``: rapidocr 3.x recognition scored as the paper's OCR reward;
- ``quality``: a documented no-reference quality score of mini-world images.
"""

from __future__ import annotations

from typing import Any

from flowopd_core.rewards.base import Reward, RewardResult, SampleScore
from flowopd_core.rewards.compose import ComposeConfig, ComposeReward
from flowopd_core.rewards.ocr import OCRConfig, OCRReward
from flowopd_core.rewards.quality import QualityConfig, QualityReward

REWARDS: dict[str, type[Reward]] = {
    "compose": ComposeReward,
    "ocr": OCRReward,
    "quality": QualityReward,
}

# mini-world task -> the reward that judges it
TASK_REWARDS: dict[str, str] = {"compose": "compose", "text": "ocr", "quality": "quality"}


def make_reward(name: str, **config: Any) -> Reward:
    """Build a registered reward; ``config`` are the fields of its config dataclass."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    cls = REWARDS[name]
    return cls(cls.config_type(**config))


__all__ = [
    "REWARDS",
    "TASK_REWARDS",
    "ComposeConfig",
    "ComposeReward",
    "OCRConfig",
    "OCRReward",
    "QualityConfig",
    "QualityReward",
    "Reward",
    "RewardResult",
    "SampleScore",
    "make_reward",
]
