"""A null control: a reward that knows nothing about the image.

``random`` scores each image with a uniform number in [0, 1) drawn from a generator seeded by the config's
``seed`` and a CRC-32 of the image's bytes: deterministic (the same image always gets the same score, so a
resumed run repeats itself) yet unrelated to anything the image shows. A teacher trained on it under some
recipe shows how far that recipe's training noise alone moves the Evaluator's metrics, the yardstick a real
teacher's gain has to clear (docs/experiments.md, stage-1 probes).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import Reward, SampleScore


@dataclass(frozen=True)
class RandomConfig:
    seed: int = field(default=0, metadata={"help": "seed mixed with each image's CRC-32"})


class RandomReward(Reward):
    """Uniform pseudo-random scores in [0, 1), a function of the image bytes and ``seed`` only (no ``strict``)."""

    name = "random"
    config_type = RandomConfig

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        return [
            SampleScore(score=float(np.random.default_rng([self.config.seed, zlib.crc32(image.tobytes())]).random()))
            for image in images
        ]
