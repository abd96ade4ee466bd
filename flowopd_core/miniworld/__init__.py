"""The mini-world: a procedural prompt/image world with three tasks (compose, text, quality) that a tiny
SD3-architecture model can learn on a CPU. ``tasks`` holds the prompts and splits, ``rendering`` the images.

The prompt-side names load eagerly (no numpy); the renderer's (numpy, scipy, PIL) load on first use, so a graph
that names the mini-world's tasks validates without them.
"""

from __future__ import annotations

from typing import Any

from flowopd_core.miniworld.options import TEXT_JITTER, parse_task_weights, parse_template_weights, parse_text_jitter
from flowopd_core.miniworld.tasks import (
    COLOURS,
    CONSONANTS,
    LETTERS,
    PALETTE,
    QUALITY_DEGRADED_FRACTION,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TASKS,
    TEMPLATES,
    VOWELS,
    WORD_MODULUS,
    WORD_PATTERNS,
    all_prompts,
    prompts,
    template_prompts,
)
from flowopd_core.prompts import PromptSpec

__all__ = [
    "COLOURS",
    "CONSONANTS",
    "DEGRADATIONS",
    "TEXT_JITTER",
    "LETTERS",
    "PALETTE",
    "QUALITY_DEGRADED_FRACTION",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TASKS",
    "TEMPLATES",
    "VOWELS",
    "WORD_MODULUS",
    "WORD_PATTERNS",
    "PromptSpec",
    "TrainingBatch",
    "all_prompts",
    "degrade",
    "parse_task_weights",
    "parse_template_weights",
    "parse_text_jitter",
    "prompts",
    "render",
    "render_word",
    "sample_training_batch",
    "template_prompts",
    "word_offset",
    "word_slack",
]

_RENDER_NAMES = frozenset(
    {"DEGRADATIONS", "TrainingBatch", "degrade", "render", "render_word", "sample_training_batch", "word_offset",
     "word_slack"}
)


def __getattr__(name: str) -> Any:
    """The renderer's names, imported on first use (PEP 562)."""
    if name in _RENDER_NAMES:
        from flowopd_core.miniworld import rendering as _render

        return getattr(_render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
