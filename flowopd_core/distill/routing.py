"""The checks and blend weights of Flow-OPD's routing (docs/method.md §4) as plain Python, without torch: the
graph validator checks a router's weights against its teacher pool with :func:`route_rows`;
:func:`flowopd_core.distill.loss.route` turns the rows into tensors."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from flowopd_core.choices import ROUTE_MODES
from flowopd_core.prompts import UNTAGGED


def _normalised(weights: Mapping[str, float], teachers: Sequence[str], key: str) -> list[float]:
    unknown = sorted(set(weights) - set(teachers))
    if unknown:
        raise ValueError(f"task_weights[{key!r}] names unknown teachers {unknown} (have {list(teachers)})")
    row = [float(weights.get(name, 0.0)) for name in teachers]
    if any(w < 0 or not math.isfinite(w) for w in row) or sum(row) <= 0:
        raise ValueError(f"task_weights[{key!r}] must be finite, >= 0 and not all 0, got {dict(weights)}")
    total = sum(row)
    return [w / total for w in row]


def route_rows(
    tasks: Sequence[str],
    teachers: Sequence[str],
    mode: str = "hard",
    task_weights: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, list[float]]:
    """task -> the blend weights over ``teachers`` (one row per task that can be routed, untagged included), as
    :func:`~flowopd_core.distill.loss.route` uses them; raises ValueError as it does (also when one of ``tasks``,
    the prompts' task tags, has no teacher)."""
    if mode not in ROUTE_MODES:
        raise ValueError(f"route mode must be one of {ROUTE_MODES}, got {mode!r}")
    teachers = tuple(teachers)
    if not teachers or len(set(teachers)) != len(teachers) or UNTAGGED in teachers:
        raise ValueError(f"need distinct, non-empty teacher names, got {list(teachers)}")
    task_weights = dict(task_weights or {})
    if mode == "hard" and task_weights:
        raise ValueError("task_weights are for soft routing; hard routing follows the task tag")
    rows = {task: _normalised(w, teachers, task) for task, w in task_weights.items()}
    rows.setdefault(UNTAGGED, [1.0 / len(teachers)] * len(teachers))
    for k, name in enumerate(teachers):
        rows.setdefault(name, [1.0 if j == k else 0.0 for j in range(len(teachers))])
    missing = sorted({task for task in tasks if task not in rows})
    if missing:
        raise ValueError(f"no teacher for task(s) {missing} (teachers: {list(teachers)}); untagged prompts "
                         f"use a uniform blend")
    return rows


def own_reward_problems(tasks: Iterable[str], task_rewards: Mapping[str, str], rewards: Iterable[str]) -> str:
    """Why prompts of some of ``tasks`` cannot be judged by their task's own reward (``task_rewards``: task ->
    reward name; ``rewards``: the names of the rewards scored), or '' when every task can."""
    problems, rewards = [], sorted(rewards)
    for task in sorted(set(tasks)):
        own = task_rewards.get(task)
        if own is None:
            what = f"task {task!r} has" if task else "untagged prompts have"
            problems.append(f"{what} no own reward (tasks with one: {sorted(task_rewards)})")
        elif own not in rewards:
            problems.append(f"task {task!r} needs reward {own!r}, which is not among the rewards {rewards}")
    return "; ".join(problems)
