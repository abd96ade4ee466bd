"""The evaluator's settings (:class:`EvalConfig`), importable without torch: the Evaluator node declares its ports
from it. :mod:`flowopd_core.eval.evaluate` re-exports it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flowopd_core.choices import METRIC_MODES, PRECISIONS
from flowopd_core.prompts import UNTAGGED
from flowopd_core.rewards.names import TASK_REWARDS

SIDE_METRICS: tuple[str, ...] = ("quality",)
"""Metrics that ``task+quality`` adds to every task."""


def metric_plan(
    tasks: Sequence[str], mode: str, available: Sequence[str], task_rewards: Mapping[str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """task -> the metric (reward) names computed on its prompts, for a ``mode`` of :data:`METRIC_MODES`.
    ``task_rewards`` adds to / overrides :data:`TASK_REWARDS` (e.g. ``{"compose": "geneval"}`` on a cluster).
    Outside ``all``, a tagged task needs its own metric (a tag no metric knows is refused, not scored by the side
    metric alone); untagged prompts get the side metric under ``task+quality``."""
    own = {**TASK_REWARDS, **(task_rewards or {})}
    if mode not in METRIC_MODES:
        raise ValueError(f"metrics must be one of {sorted(METRIC_MODES)}, got {mode!r}")
    plan = {}
    for task in tasks:
        names = list(available) if mode == "all" else [own[task]] if task in own else []
        if mode != "all" and task != UNTAGGED and task not in own:
            raise ValueError(f"task {task!r} has no metric of its own (tasks with one: {sorted(own)}): name it in "
                             f"task_rewards (e.g. '{task}=quality') or use metrics='all'")
        if mode == "task+quality":
            names += SIDE_METRICS
        if not names:
            raise ValueError(f"task {task!r} has no reward in TASK_REWARDS; use metrics='all' or tag the prompts")
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"task {task!r} needs rewards {missing}, not among the given {sorted(available)}")
        plan[task] = tuple(dict.fromkeys(names))
    return plan


@dataclass(frozen=True)
class Comparison:
    """One method-vs-method row: the paired difference ``a - b`` (model labels) on every task, or on ``task``."""

    a: str
    b: str
    task: str = ""

    def __str__(self) -> str:
        return f"{self.a} vs {self.b}" + (f" @ {self.task}" if self.task else "")


def parse_comparisons(spec: str) -> tuple[Comparison, ...]:
    """``'flow-opd vs grpo-mix; flow-opd vs grpo-text @ text'`` -> comparisons (``;`` or new lines separate rows;
    ``@ task`` limits a row to one task). Labels may contain ``-`` but not ``@``; ``vs`` needs spaces around it."""
    out = []
    for part in re.split(r"[;\n]", spec):
        part = part.strip()
        if not part:
            continue
        pair, at, task = (x.strip() for x in part.partition("@"))
        a, sep, b = (x.strip() for x in f" {pair} ".partition(" vs "))
        if not sep or not a or not b or " vs " in f" {b} " or (at and not task):
            raise ValueError(f"comparison {part!r} is not 'A vs B' or 'A vs B @ task' (model labels)")
        if a == b:
            raise ValueError(f"comparison {part!r} compares a model with itself")
        out.append(Comparison(a, b, task))
    if len(set(out)) != len(out):
        raise ValueError(f"comparisons repeat a row: {spec!r}")
    return tuple(out)


def comparison_problems(
    comparisons: Sequence[Comparison], models: Sequence[str] | None, tasks: Sequence[str] | None = None
) -> list[str]:
    """Labels and tasks that ``comparisons`` name but the evaluation does not have (``models``: the labels;
    either None: not checked)."""
    problems = []
    for c in comparisons:
        missing = [name for name in (c.a, c.b) if models is not None and name not in models]
        if missing:
            problems.append(f"'{c}': no model labelled {', '.join(map(repr, missing))} (models: {list(models)})")
        if c.task and tasks is not None and c.task not in tasks:
            problems.append(f"'{c}': no task {c.task!r} among the prompts' tasks {list(tasks)}")
    return problems


@dataclass(frozen=True)
class EvalConfig:
    steps: int = field(default=40, metadata={"help": "ODE steps (paper evaluation: 40; training uses 10)"})
    resolution: int = field(
        default=0, metadata={"help": "image height = width in pixels; 0 = the model's native size (paper: 512)"}
    )
    guidance_scale: float = field(default=4.5, metadata={"help": "classifier-free guidance w (1 = no CFG)"})
    seed: int = field(default=0, metadata={"help": "noise seed; sample i of a run starts from noise (seed, i)"})
    batch_size: int = field(default=16, metadata={"help": "samples per sampling batch (and per scoring job)"})
    precision: str = field(
        default="auto", metadata={"help": "compute precision of the sampling: auto (fp32 on the CPU, bf16 on CUDA), "
                                          "fp32, bf16 or fp16 (autocast)", "choices": PRECISIONS}
    )
    images_per_prompt: int = field(default=1, metadata={"help": "images sampled per prompt"})
    metrics: str = field(
        default="task+quality", metadata={"help": f"rewards per task: {' | '.join(METRIC_MODES)} (METRIC_MODES)"}
    )
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the Student-t intervals"})
    keep_images: int = field(default=16, metadata={"help": "images kept per task for the grids (0 = all)"})
    concurrent: bool = field(
        default=True, metadata={"help": "score batch k in a background thread while batch k+1 samples"}
    )
    task_rewards: dict[str, str] = field(
        default_factory=dict, metadata={"help": "task -> its own metric, over TASK_REWARDS (e.g. compose -> geneval)"}
    )
    comparisons: str = field(
        default="", metadata={"help": "method-vs-method rows of paired differences in results.md, by model label: "
                                      "'flow-opd vs grpo-mix; flow-opd vs grpo-text @ text' (@ task: one task only)"}
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "images_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.metrics not in METRIC_MODES:
            raise ValueError(f"metrics must be one of {sorted(METRIC_MODES)}, got {self.metrics!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.keep_images < 0:
            raise ValueError(f"keep_images must be >= 0, got {self.keep_images}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        parse_comparisons(self.comparisons)
