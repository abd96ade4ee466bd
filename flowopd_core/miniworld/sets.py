"""Prompt sets and ground-truth image batches of the mini-world, as the graph nodes use them."""

from __future__ import annotations

import numpy as np
import torch

from flowopd_core.images import from_uint8
from flowopd_core.miniworld.rendering import render
from flowopd_core.miniworld.tasks import TASKS, prompts
from flowopd_core.prompts import PromptSet


def prompt_set(task: str, split: str, per_task: int = 0, seed: int = 0) -> PromptSet:
    """The ``split`` prompts of ``task`` (or of every task for ``task="all"``).

    ``per_task > 0`` keeps a seeded random subset of that many prompts per task, in the original order.
    """
    tasks = TASKS if task == "all" else (task,)
    chosen = []
    for name in tasks:
        specs = prompts(name, split)
        if 0 < per_task < len(specs):
            rng = np.random.default_rng([seed, TASKS.index(name)])
            keep = sorted(rng.choice(len(specs), size=per_task, replace=False).tolist())
            specs = [specs[i] for i in keep]
        chosen.extend(specs)
    return PromptSet(tuple(chosen), name=f"miniworld-{task}-{split}")


def render_set(prompt_set: PromptSet, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Ground-truth images ``(B, 3, size, size)`` in [0, 1] for mini-world prompts (random layout per seed)."""
    rng = np.random.default_rng(seed)
    arrays = [render(spec, rng, size) for spec in prompt_set]
    return from_uint8(arrays)
