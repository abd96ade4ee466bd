"""The mini-world's training-data options as plain Python (no numpy): the text task's jitter and the tasks'
weights, parsed from the text a graph gives. :mod:`flowopd_core.miniworld.rendering` re-exports them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flowopd_core.miniworld.tasks import TASKS, TEMPLATES

TEXT_JITTER = (1.5, 1.0)  # px at size 32: largest random (x, y) offset of a word from the centre


def parse_task_weights(spec: str) -> dict[str, float]:
    """``"compose:1, text:2, quality:1"`` -> {task: weight}; tasks not named get weight 0. Raises ValueError
    naming the bad item (unknown task, bad or negative number, repeated task, all zero)."""
    weights: dict[str, float] = {}
    for item in (part.strip() for part in spec.replace(";", ",").split(",")):
        if not item:
            continue
        task, _, value = (x.strip() for x in item.partition(":"))
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} in {item!r}; tasks: {list(TASKS)}")
        if task in weights:
            raise ValueError(f"task {task!r} is weighted twice")
        try:
            weight = float(value) if value else 1.0
        except ValueError:
            raise ValueError(f"weight of {task!r} is not a number: {value!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {task!r} must be a finite number >= 0, got {value!r}")
        weights[task] = weight
    if not any(weights.values()):
        raise ValueError(f"give at least one task a weight > 0, e.g. 'compose:1, text:2, quality:1'; got {spec!r}")
    return weights


def template_shares(weights: Mapping[str, Mapping[str, float]]) -> dict[str, tuple[float, ...]]:
    """{task: {template: weight}} -> {task: each of ``TEMPLATES[task]``'s share, summing to 1}; templates not named
    weigh 1. Raises ValueError naming the bad entry (unknown task or template, a weight not finite or < 0, a task
    whose templates all weigh 0)."""
    shares = {}
    for task, named in weights.items():
        for template, weight in named.items():
            if task not in TASKS or template not in TEMPLATES[task]:
                known = [f"{t}/{name}" for t in TASKS for name in TEMPLATES[t]]
                raise ValueError(f"unknown template {f'{task}/{template}'!r}; templates: {known}")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {task}/{template} must be a finite number >= 0, got {weight!r}")
        full = [named.get(name, 1.0) for name in TEMPLATES[task]]
        if not any(full):
            raise ValueError(f"every template of {task!r} gets weight 0; give at least one a weight > 0")
        shares[task] = tuple(w / sum(full) for w in full)
    return shares


def parse_template_weights(spec: str) -> dict[str, dict[str, float]]:
    """``"compose/position:4, compose/single:0.5"`` -> {task: {template: weight}}: how often each named template is
    drawn within its task (:func:`template_shares`: a named task's templates not named keep weight 1, tasks not
    named stay uniform). Raises ValueError naming the bad item (not 'task/template:weight', not a number, a
    repeated template, or what :func:`template_shares` refuses)."""
    weights: dict[str, dict[str, float]] = {}
    for item in (part.strip() for part in spec.replace(";", ",").split(",")):
        if not item:
            continue
        key, _, value = (x.strip() for x in item.partition(":"))
        task, _, template = (x.strip() for x in key.partition("/"))
        if template in weights.get(task, {}):
            raise ValueError(f"template {key!r} is weighted twice")
        try:
            weights.setdefault(task, {})[template] = float(value)
        except ValueError:
            raise ValueError(f"weight of {key!r} is not a number: {value!r}") from None
    template_shares(weights)
    return weights


def is_text_jitter(values: Sequence[float]) -> bool:
    """Two finite numbers >= 0: a valid (x, y) bound on the text task's word offset."""
    return len(values) == 2 and all(math.isfinite(v) and v >= 0 for v in values)


def parse_text_jitter(spec: str) -> tuple[float, float]:
    """``"1.5, 1"`` -> (1.5, 1.0): the text task's largest (x, y) offset in px at size 32. Raises ValueError
    unless it is exactly two finite numbers >= 0."""
    parts = [part.strip() for part in spec.replace(";", ",").split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise ValueError(f"expected two numbers 'x, y' (px at 32 px), got {spec!r}") from None
    if not is_text_jitter(values):
        raise ValueError(f"expected two finite numbers >= 0 'x, y' (px at 32 px), got {spec!r}")
    return values  # type: ignore[return-value]
