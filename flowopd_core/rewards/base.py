"""The reward interface: images + prompts (with their ground-truth metadata) in, a ``RewardResult`` out.

A reward is a small class with a ``name``, a frozen config dataclass (``config_type``) and
``__call__(images, prompts) -> RewardResult`` where ``images`` is ``(B, 3, H, W)`` float in [0, 1] and
``prompts`` a list of ``PromptSpec`` (``spec`` carries the ground truth). Scores lie in [0, 1], higher is better;
NaN means "cannot score" (non-finite pixels, or a prompt without what the reward needs), and every aggregate
is NaN-aware.

Subclasses implement ``score_batch`` on the valid samples only, as ``(N, H, W, 3)`` uint8 arrays; NaN pixels
and the scatter back into the batch are handled here once. Rewards hold no state besides their config and a
lazily built engine, so they may run in a thread pool next to sampling.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from flowopd_core.prompts import PromptSpec


@dataclass
class RewardResult:
    """Per-sample rewards of one batch.

    scores:  ``(B,)`` float32 in [0, 1] (higher is better), NaN = cannot score.
    details: one JSON-able dict per sample, for logging (what was detected / read, and why).
    strict:  ``(B,)`` float32 of 1.0 / 0.0 (GenEval-style all-or-nothing correctness) or ``None`` when the
             reward has no strict form; NaN where ``scores`` is NaN.
    """

    scores: torch.Tensor
    details: list[dict[str, Any]]
    strict: torch.Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.scores.ndim != 1 or len(self.details) != self.scores.shape[0]:
            raise ValueError(f"scores must be (B,) with one details dict each, got {tuple(self.scores.shape)} "
                             f"and {len(self.details)} details")
        if self.strict is not None and self.strict.shape != self.scores.shape:
            raise ValueError(f"strict must match scores {tuple(self.scores.shape)}, got {tuple(self.strict.shape)}")

    def mean(self) -> float:
        """NaN-aware mean score (NaN when no sample could be scored)."""
        return _nanmean(self.scores)

    def strict_mean(self) -> float:
        """NaN-aware mean of ``strict`` (NaN when there is no strict form or nothing was scored)."""
        return math.nan if self.strict is None else _nanmean(self.strict)


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


@dataclass
class SampleScore:
    """One sample's reward: ``score`` in [0, 1] or NaN, optional ``strict`` 1.0 / 0.0, logging ``details``."""

    score: float
    details: dict[str, Any] = field(default_factory=dict)
    strict: float | None = None


def cannot_score(reason: str) -> SampleScore:
    """A NaN sample score carrying the reason in its details."""
    return SampleScore(score=math.nan, details={"error": reason}, strict=math.nan)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` float in [0, 1] (values outside are clamped) -> ``(B, H, W, 3)`` uint8."""
    arr = images.detach().to(torch.float32).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    return np.rint(arr * 255.0).astype(np.uint8)


class Reward(abc.ABC):
    """Base class of every reward; see the module doc for the contract."""

    name: ClassVar[str]
    config_type: ClassVar[type]
    has_strict: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        config = self.config_type() if config is None else config
        if not isinstance(config, self.config_type):
            raise TypeError(f"{type(self).__name__} needs a {self.config_type.__name__}, got {type(config).__name__}")
        self.config = config

    @abc.abstractmethod
    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        """Score ``(N, H, W, 3)`` uint8 images (all finite) against their prompts, one ``SampleScore`` each."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[PromptSpec]) -> RewardResult:
        """``images`` ``(B, 3, H, W)`` float in [0, 1], ``prompts`` B ``PromptSpec`` -> ``RewardResult``."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = getattr(images, "shape", type(images))
            raise ValueError(f"{self.name}: images must be a (B, 3, H, W) tensor, got {got}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, PromptSpec)]
        if bad:
            raise TypeError(f"{self.name}: prompts must be PromptSpec, got {bad[0]}")
        finite = torch.isfinite(images.detach()).flatten(1).all(dim=1).cpu().tolist()
        results = [cannot_score("image has non-finite pixels") for _ in prompts]
        valid = [i for i, ok in enumerate(finite) if ok]
        if valid:
            arrays = images_to_uint8(images[valid])
            scored = self.score_batch(arrays, [prompts[i] for i in valid])
            if len(scored) != len(valid):
                raise RuntimeError(f"{self.name}: score_batch returned {len(scored)} scores for {len(valid)} images")
            for i, sample in zip(valid, scored):
                results[i] = sample
        scores = torch.tensor([r.score for r in results], dtype=torch.float32)
        strict = None
        if self.has_strict:
            values = [math.nan if r.strict is None or math.isnan(r.score) else r.strict for r in results]
            strict = torch.tensor(values, dtype=torch.float32)
        return RewardResult(scores=scores, details=[r.details for r in results], strict=strict, name=self.name)
