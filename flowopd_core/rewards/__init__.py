"""Rewards: images + prompts in, ``RewardResult`` out (contract in ``base.py``). An explicit registry.

Mini-world rewards, all real and offline:
- ``compose``: a detector for the mini-world's objects (GenEval-style strict correctness + partial score);
- ``compose_strict``: the same detector's all-or-nothing correctness as the score (GenEval's accuracy);
- ``compose_dense``: the same constraints each met to a degree (shape IoU margins, soft counts, relation margins);
- ``ocr``: rapidocr 3.x recognition scored as the paper's OCR reward;
- ``ocr_likelihood``: the same recogniser's CTC likelihood of the target text (a dense form of ``ocr`` to train on);
- ``quality``: a documented no-reference quality score of mini-world images;
- ``random``: pseudo-random scores unrelated to the image, a null control for training recipes.

The names (:mod:`flowopd_core.rewards.names`) load without the rewards' code; the registries and classes
(:mod:`flowopd_core.rewards.registry`) load on first use, so graphs that name rewards validate without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from flowopd_core.rewards.names import TASK_REWARDS

_LAZY: dict[str, str] = {
    "REAL_REWARDS": "flowopd_core.rewards.real",
    "REWARDS": "flowopd_core.rewards.registry",
    "CONTROL_REWARDS": "flowopd_core.rewards.registry",
    "make_reward": "flowopd_core.rewards.registry",
    "ComposeConfig": "flowopd_core.rewards.compose",
    "ComposeDenseReward": "flowopd_core.rewards.compose",
    "ComposeReward": "flowopd_core.rewards.compose",
    "ComposeStrictReward": "flowopd_core.rewards.compose",
    "OCRConfig": "flowopd_core.rewards.ocr",
    "OCRLikelihoodReward": "flowopd_core.rewards.ocr",
    "OCRReward": "flowopd_core.rewards.ocr",
    "PickScoreConfig": "flowopd_core.rewards.real",
    "PickScoreReward": "flowopd_core.rewards.real",
    "QualityConfig": "flowopd_core.rewards.quality",
    "QualityReward": "flowopd_core.rewards.quality",
    "RandomConfig": "flowopd_core.rewards.random_control",
    "RandomReward": "flowopd_core.rewards.random_control",
    "Reward": "flowopd_core.rewards.base",
    "RewardResult": "flowopd_core.rewards.base",
    "SampleScore": "flowopd_core.rewards.base",
}


def __getattr__(name: str) -> Any:
    """The registries and reward classes, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REAL_REWARDS",
    "REWARDS",
    "TASK_REWARDS",
    "CONTROL_REWARDS",
    "ComposeConfig",
    "ComposeReward",
    "ComposeStrictReward",
    "ComposeDenseReward",
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
