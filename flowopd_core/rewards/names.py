"""The registered reward names as literal lists, importable without the rewards' code (torch, numpy): graph
validation checks reward names against them. ``tests/core/test_reward_names.py`` checks that they equal the keys
of the registries in :mod:`flowopd_core.rewards.registry`."""

from __future__ import annotations

REWARD_NAMES: tuple[str, ...] = ("compose", "compose_strict", "compose_dense", "ocr", "ocr_likelihood", "quality")
"""The keys of :data:`~flowopd_core.rewards.REWARDS` (mini-world metrics; the Evaluator's "all")."""
REAL_REWARD_NAMES: tuple[str, ...] = ("pickscore",)
"""The keys of :data:`~flowopd_core.rewards.REAL_REWARDS` (local-weights adapters)."""
CONTROL_REWARD_NAMES: tuple[str, ...] = ("random",)
"""The keys of :data:`~flowopd_core.rewards.CONTROL_REWARDS` (to train on in experiments only, never a metric)."""
ALL_REWARD_NAMES: tuple[str, ...] = (*REWARD_NAMES, *REAL_REWARD_NAMES, *CONTROL_REWARD_NAMES)

TASK_REWARDS: dict[str, str] = {"compose": "compose", "text": "ocr", "quality": "quality"}
"""Mini-world task -> the reward that judges it."""
