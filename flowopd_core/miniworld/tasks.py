"""Mini-world tasks: the vocabulary, the prompts with their ground truth and the fixed train/test splits
(images and training batches: ``render.py``).

Three tasks mirror the paper's (method.md §6-7):

- ``compose`` (GenEval-like). Two templates:
  ``count``    "a red circle", "two green squares", "three blue triangles"      (colour x shape x count 1-3)
  ``position`` "a red circle to the left of a blue square" (+ "right of", "above", "below"; the two objects
               have different colours).
- ``text`` (OCR-like): ``the word "ACE"``: a three-letter word over the 8-letter alphabet ``LETTERS`` (all
  ``8**3 = 512`` words, not only English ones), drawn in tall glyphs, black on white, one fixed slot per
  letter (see ``render.py``).
- ``quality``: "a large red circle, clean": one object; its pretraining images mix clean and degraded
  renders (``QUALITY_DEGRADED_FRACTION``), which gives the quality reward real headroom.

Split rule (fixed, deterministic, no randomness). Every prompt is a combination of attribute indices; a
prompt is held out for ``test`` when the sum of its attribute indices is divisible by 4:

- compose/count:     colour i, shape j, count n (1-3):          test iff (i + j + n) % 4 == 0   (9 of 36)
- compose/position:  colours i1 != i2, shapes j1, j2, relation k: test iff (i1 + j1 + i2 + j2 + k) % 4 == 0
                                                                 (108 of 432)
- text:              letters a, b, c (indices into LETTERS):     test iff (a + b + c) % 4 == 0    (128 of 512)
- quality:           size s, colour i, shape j:                  test iff (s + i + j) % 4 == 0   (6 of 24)

So every test prompt is a new combination of attribute values that all occur in train (every colour, shape,
count, relation and letter-in-position is seen in training); test prompt strings never occur in train.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

from flowopd_core.prompts import PromptSpec

TASKS: tuple[str, ...] = ("compose", "text", "quality")
SPLITS: tuple[str, ...] = ("train", "test")

# Colours are RGB uint8. "white" is the background, "black" the ink of the text task; objects use COLOURS.
PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (225, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 200, 20),
}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
# relation -> phrase; the relation reads "first object <relation> second object"
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
LETTERS: str = "ACEHKNRS"  # all 512 three-letter words read 100 % by rapidocr at 32 px (measured; see render.py)
WORD_LENGTH: int = 3  # letters per text-task word
SIZES: tuple[str, ...] = ("small", "large")
QUALITY_DEGRADED_FRACTION: float = 0.5  # share of quality-task pretraining images that are degraded
TEMPLATES: dict[str, tuple[str, ...]] = {
    "compose": ("count", "position"),
    "text": ("word",),
    "quality": ("icon",),
}


def _held_out(*indices: int) -> bool:
    """The split rule (module doc): a combination is a test prompt iff its index sum is divisible by 4."""
    return sum(indices) % 4 == 0


def _spec(task: str, template: str, text: str, **truth: Any) -> PromptSpec:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)
    return PromptSpec(text=text, task=task, id=f"{task}-{template}-{slug}", spec={"template": template, **truth})


def _object(colour: str, shape: str, count: int = 1) -> dict[str, Any]:
    return {"colour": colour, "shape": shape, "count": count}


def _noun(colour: str, shape: str, count: int) -> str:
    return f"{COUNT_WORDS[count]} {colour} {shape if count == 1 else PLURALS[shape]}"


def _compose_count() -> list[tuple[bool, PromptSpec]]:
    out = []
    for (i, colour), (j, shape), n in itertools.product(enumerate(COLOURS), enumerate(SHAPES), COUNT_WORDS):
        spec = _spec("compose", "count", _noun(colour, shape, n), objects=[_object(colour, shape, n)], relation=None)
        out.append((_held_out(i, j, n), spec))
    return out


def _compose_position() -> list[tuple[bool, PromptSpec]]:
    out = []
    objects = list(itertools.product(enumerate(COLOURS), enumerate(SHAPES)))
    for ((i1, c1), (j1, s1)), ((i2, c2), (j2, s2)) in itertools.product(objects, objects):
        if c1 == c2:
            continue
        for k, (relation, phrase) in enumerate(RELATIONS.items()):
            text = f"{_noun(c1, s1, 1)} {phrase} {_noun(c2, s2, 1)}"
            spec = _spec("compose", "position", text, objects=[_object(c1, s1), _object(c2, s2)], relation=relation)
            out.append((_held_out(i1, j1, i2, j2, k), spec))
    return out


def _text_words() -> list[tuple[bool, PromptSpec]]:
    out = []
    for letters in itertools.product(enumerate(LETTERS), repeat=WORD_LENGTH):
        word = "".join(letter for _, letter in letters)
        out.append((_held_out(*(i for i, _ in letters)), _spec("text", "word", f'the word "{word}"', word=word)))
    return out


def _quality_icons() -> list[tuple[bool, PromptSpec]]:
    out = []
    combos = itertools.product(enumerate(SIZES), enumerate(COLOURS), enumerate(SHAPES))
    for (s, size), (i, colour), (j, shape) in combos:
        text = f"a {size} {colour} {shape}, clean"
        spec = _spec("quality", "icon", text, objects=[_object(colour, shape)], size=size)
        out.append((_held_out(s, i, j), spec))
    return out


_BUILDERS = {
    ("compose", "count"): _compose_count,
    ("compose", "position"): _compose_position,
    ("text", "word"): _text_words,
    ("quality", "icon"): _quality_icons,
}


@functools.cache
def template_prompts(task: str, template: str, split: str) -> tuple[PromptSpec, ...]:
    """The prompts of one template (``TEMPLATES[task]``) and split, in a fixed order."""
    if (task, template) not in _BUILDERS:
        raise ValueError(f"unknown template {template!r} of task {task!r}; expected one of {TEMPLATES.get(task)}")
    _check(task, split)
    test = split == "test"
    return tuple(spec for held_out, spec in _BUILDERS[(task, template)]() if held_out == test)


def _check(task: str | None, split: str) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown mini-world task {task!r}; expected one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def prompts(task: str, split: str) -> list[PromptSpec]:
    """All prompts of one task and split, in a fixed order (templates in ``TEMPLATES`` order)."""
    _check(task, split)
    return [spec for template in TEMPLATES[task] for spec in template_prompts(task, template, split)]


def all_prompts(split: str) -> list[PromptSpec]:
    """All prompts of every task (``TASKS`` order) for one split."""
    _check(None, split)
    return [spec for task in TASKS for spec in prompts(task, split)]
