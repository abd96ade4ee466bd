"""The mini-world: a procedural prompt/image world with three tasks (compose, text, quality) that a tiny
SD3-architecture model can learn on a CPU. ``tasks`` holds the prompts and splits, ``render`` the images."""

from flowopd_core.miniworld.render import (
    DEGRADATIONS,
    TrainingBatch,
    degrade,
    render,
    render_word,
    sample_training_batch,
)
from flowopd_core.miniworld.tasks import (
    COLOURS,
    LETTERS,
    PALETTE,
    QUALITY_DEGRADED_FRACTION,
    RELATIONS,
    SHAPES,
    SPLITS,
    TASKS,
    TEMPLATES,
    all_prompts,
    prompts,
    template_prompts,
)
from flowopd_core.prompts import PromptSpec

__all__ = [
    "COLOURS",
    "DEGRADATIONS",
    "LETTERS",
    "PALETTE",
    "QUALITY_DEGRADED_FRACTION",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "TEMPLATES",
    "PromptSpec",
    "TrainingBatch",
    "all_prompts",
    "degrade",
    "prompts",
    "render",
    "render_word",
    "sample_training_batch",
    "template_prompts",
]
