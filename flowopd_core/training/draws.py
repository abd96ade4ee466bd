"""Which prompts an epoch draws: uniformly, or spread evenly over strata (compose's categories for a GRPO
teacher, ``balance_templates``; the task tags for a distiller, ``balance_tasks``), so that a stratum with few
prompts is not drowned by one with many."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from flowopd_core.prompts import PromptSet


def _strata(prompts: PromptSet, key: str) -> dict[str, list[int]]:
    """Indices of ``prompts`` per value of the attribute ``key``, in order of first appearance."""
    strata: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        strata.setdefault(getattr(prompt, key), []).append(index)
    return strata


def template_strata(prompts: PromptSet) -> dict[str, list[int]]:
    """Indices of ``prompts`` per category (:attr:`PromptSpec.category`), in order of first appearance."""
    return _strata(prompts, "category")


def task_strata(prompts: PromptSet) -> dict[str, list[int]]:
    """Indices of ``prompts`` per task tag (:attr:`PromptSpec.task`), in order of first appearance."""
    return _strata(prompts, "task")


def small_strata(strata: Mapping[str, Sequence[int]], n: int) -> dict[str, int]:
    """The strata too small for :func:`balanced_draw` of ``n``: name -> size, for those under ceil(n / k)."""
    need = -(-n // len(strata))
    return {name: len(rows) for name, rows in strata.items() if len(rows) < need}


def balanced_draw(strata: Mapping[str, Sequence[int]], n: int, epoch: int, generator: torch.Generator) -> list[int]:
    """``n`` indices spread evenly over ``strata`` (stratum -> its indices): each of the k strata gets n // k,
    drawn at random without replacement; the n % k left over go to the next strata in a rotation that moves on
    with ``epoch``, so over k epochs every stratum gets the same number of draws.

    Each stratum must hold at least ceil(n / k) indices (:func:`small_strata`, checked by the trainers)."""
    names = list(strata)
    k = len(names)
    extra = n % k
    lucky = {names[(epoch * extra + j) % k] for j in range(extra)}
    out: list[int] = []
    for name in names:
        rows = strata[name]
        take = n // k + (name in lucky)
        out += [rows[i] for i in torch.randperm(len(rows), generator=generator)[:take].tolist()]
    return out
