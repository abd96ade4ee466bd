"""Mini-world tasks: the vocabulary, the prompts with their ground truth and the fixed train/test splits
(images and training batches: ``rendering.py``).

Three tasks mirror the paper's (docs/method.md §6-7); each task's prompts come in templates (the evaluator's
categories: a task's score is the equal-weight mean over its templates, as GenEval's):

- ``compose`` (GenEval-like), four templates of graded difficulty over 5 colours x 4 shapes:
  ``single``   "a purple diamond", "a small red circle", "a large blue square" (one object; an optional size)
  ``count``    "two green squares", "three blue triangles", "four yellow diamonds"
  ``pair``     "a red circle and a blue square" (two objects of different colours, anywhere: colour binding)
  ``position`` "a red circle to the left of a blue square" (+ "right of", "above", "below"; different colours)
- ``text`` (OCR-like): ``the word "BAT"``: a pseudo-word over the 12 letters ``LETTERS`` (9 consonants,
  3 vowels) in the patterns consonant-vowel and vowel-consonant (template ``word2``: "BA", "UT") and
  consonant-vowel-consonant (``word3``: "BAT"), drawn in proportionally spaced glyphs (the place of a letter
  depends on its neighbours' widths) at a random horizontal and vertical offset, black on white
  (``rendering.py``). Mini-world v2 had three- and four-letter words in smaller glyphs; v3 (this) has two- and
  three-letter words in larger ones.
- ``quality``: "a large red circle, clean" (``icon``) and "a red circle and a blue square, clean" (``pair``);
  its pretraining images mix clean and degraded renders (``QUALITY_DEGRADED_FRACTION``), which gives the
  quality reward real headroom.

Split rule (fixed, deterministic, no randomness). Every prompt is a combination of attribute indices (colour
i into ``COLOURS``, shape j into ``SHAPES``, ...); a prompt is held out for ``test`` when the sum of its indices
is divisible by the template's modulus (2 for the small templates, 4 or 8 for the large ones):

- compose/single:   colour i, shape j, size s (0 none, 1 small, 2 large)  test iff (i + j + s) % 2 == 0  (30 of 60)
- compose/count:    colour i, shape j, count n (2-4)                      test iff (i + j + n) % 2 == 0  (30 of 60)
- compose/pair:     objects (i1, j1), (i2, j2), colours i1 < i2           test iff (i1 + j1 + i2 + j2) % 4 == 0
                                                                                                       (40 of 160)
- compose/position: colours i1 != i2, shapes j1, j2, relation k     test iff (i1 + j1 + i2 + j2 + k) % 8 == 0
                                                                                                     (188 of 1280)
- text/word2:        consonant and vowel indices (into CONSONANTS, VOWELS)  test iff their sum % 2 == 0
                                                                             (14 of 27 cv, 14 of 27 vc)
- text/word3:        as word2                                              test iff their sum % 4 == 0  (61 of 243)
- quality/icon:     size s, colour i, shape j                             test iff (s + i + j) % 4 == 0  (10 of 40)
- quality/pair:     as compose/pair                                       test iff (i1 + j1 + i2 + j2) % 4 == 0
                                                                                                       (40 of 160)

So every test prompt is a new combination of attribute values that all occur in train (every colour, shape,
size, count, relation and letter-in-position is seen in training); test prompt strings never occur in train.
Totals: compose 1272 train / 288 test, text 208 / 89, quality 150 / 50 (tests/core/test_miniworld.py).
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
    "purple": (110, 40, 150),  # dark: anti-aliased rims of blue or red on white stay nearer those
}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
# relation -> phrase; the relation reads "first object <relation> second object"
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
CONSONANTS: str = "BDHKLNRST"  # with VOWELS: letters rapidocr reads at 32 px in the text task's rendering
VOWELS: str = "AEU"  # (measured on every word: see rendering.py)
LETTERS: str = "".join(sorted(CONSONANTS + VOWELS))
# text template -> its c(onsonant) / v(owel) patterns and its split modulus
WORD_PATTERNS: dict[str, tuple[str, ...]] = {"word2": ("cv", "vc"), "word3": ("cvc",)}
WORD_MODULUS: dict[str, int] = {"word2": 2, "word3": 4}
SIZES: tuple[str, ...] = ("small", "large")
QUALITY_DEGRADED_FRACTION: float = 0.5  # share of quality-task pretraining images that are degraded
TEMPLATES: dict[str, tuple[str, ...]] = {
    "compose": ("single", "count", "pair", "position"),
    "text": ("word2", "word3"),
    "quality": ("icon", "pair"),
}


def _held_out(*indices: int, modulus: int = 4) -> bool:
    """The split rule (module doc): a combination is a test prompt iff its index sum is divisible by ``modulus``."""
    return sum(indices) % modulus == 0


def _spec(task: str, template: str, text: str, **truth: Any) -> PromptSpec:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)
    return PromptSpec(text=text, task=task, id=f"{task}-{template}-{slug}", spec={"template": template, **truth})


def _object(colour: str, shape: str, count: int = 1, size: str | None = None) -> dict[str, Any]:
    """One object of a compose/quality spec; ``size`` ("small" / "large") only where the prompt names one."""
    return {"colour": colour, "shape": shape, "count": count, **({"size": size} if size else {})}


def _noun(colour: str, shape: str, count: int) -> str:
    return f"{COUNT_WORDS[count]} {colour} {shape if count == 1 else PLURALS[shape]}"


def _compose_single() -> list[tuple[bool, PromptSpec]]:
    out = []
    for (i, colour), (j, shape), s in itertools.product(enumerate(COLOURS), enumerate(SHAPES), range(3)):
        size = (None, *SIZES)[s]
        text = f"a {size} {colour} {shape}" if size else f"a {colour} {shape}"
        spec = _spec("compose", "single", text, objects=[_object(colour, shape, 1, size)], relation=None)
        out.append((_held_out(i, j, s, modulus=2), spec))
    return out


def _compose_count() -> list[tuple[bool, PromptSpec]]:
    out = []
    counts = [n for n in COUNT_WORDS if n > 1]
    for (i, colour), (j, shape), n in itertools.product(enumerate(COLOURS), enumerate(SHAPES), counts):
        spec = _spec("compose", "count", _noun(colour, shape, n), objects=[_object(colour, shape, n)], relation=None)
        out.append((_held_out(i, j, n, modulus=2), spec))
    return out


def _pairs() -> list[tuple[bool, str, list[dict[str, Any]]]]:
    """Unordered pairs of objects of different colours (the first has the lower colour index)."""
    out = []
    objects = list(itertools.product(enumerate(COLOURS), enumerate(SHAPES)))
    for ((i1, c1), (j1, s1)), ((i2, c2), (j2, s2)) in itertools.product(objects, objects):
        if i1 < i2:
            text = f"{_noun(c1, s1, 1)} and {_noun(c2, s2, 1)}"
            out.append((_held_out(i1, j1, i2, j2), text, [_object(c1, s1), _object(c2, s2)]))
    return out


def _compose_pair() -> list[tuple[bool, PromptSpec]]:
    return [(held, _spec("compose", "pair", text, objects=objs, relation=None)) for held, text, objs in _pairs()]


def _compose_position() -> list[tuple[bool, PromptSpec]]:
    out = []
    objects = list(itertools.product(enumerate(COLOURS), enumerate(SHAPES)))
    for ((i1, c1), (j1, s1)), ((i2, c2), (j2, s2)) in itertools.product(objects, objects):
        if c1 == c2:
            continue
        for k, (relation, phrase) in enumerate(RELATIONS.items()):
            text = f"{_noun(c1, s1, 1)} {phrase} {_noun(c2, s2, 1)}"
            spec = _spec("compose", "position", text, objects=[_object(c1, s1), _object(c2, s2)], relation=relation)
            out.append((_held_out(i1, j1, i2, j2, k, modulus=8), spec))
    return out


def _text_words(template: str) -> list[tuple[bool, PromptSpec]]:
    out = []
    for pattern in WORD_PATTERNS[template]:
        alphabets = [CONSONANTS if kind == "c" else VOWELS for kind in pattern]
        for letters in itertools.product(*(enumerate(a) for a in alphabets)):
            word = "".join(letter for _, letter in letters)
            spec = _spec("text", template, f'the word "{word}"', word=word)
            out.append((_held_out(*(i for i, _ in letters), modulus=WORD_MODULUS[template]), spec))
    return out


def _quality_icons() -> list[tuple[bool, PromptSpec]]:
    out = []
    combos = itertools.product(enumerate(SIZES), enumerate(COLOURS), enumerate(SHAPES))
    for (s, size), (i, colour), (j, shape) in combos:
        text = f"a {size} {colour} {shape}, clean"
        spec = _spec("quality", "icon", text, objects=[_object(colour, shape)], size=size)
        out.append((_held_out(s, i, j), spec))
    return out


def _quality_pairs() -> list[tuple[bool, PromptSpec]]:
    return [(held, _spec("quality", "pair", f"{text}, clean", objects=objs)) for held, text, objs in _pairs()]


_BUILDERS = {
    ("compose", "single"): _compose_single,
    ("compose", "count"): _compose_count,
    ("compose", "pair"): _compose_pair,
    ("compose", "position"): _compose_position,
    ("text", "word2"): functools.partial(_text_words, "word2"),
    ("text", "word3"): functools.partial(_text_words, "word3"),
    ("quality", "icon"): _quality_icons,
    ("quality", "pair"): _quality_pairs,
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
