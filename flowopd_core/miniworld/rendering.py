"""Mini-world images: ground-truth renders with random layout jitter, degradations, and training batches.

Images here are ``(H, W, 3)`` uint8 numpy arrays (white background); ``sample_training_batch`` turns them into
the project's ``(B, 3, H, W)`` float tensors in [0, 1]. Everything scales with ``size`` (default 32).

Rendering is anti-aliased: shapes are drawn with PIL at ``SUPERSAMPLE`` x the size and box-filtered down.

Text task: the word is set in Pillow's bundled TrueType font (``ImageFont.load_default``) at font size
``TEXT_FONT_SIZE`` (12) with a stroke of ``TEXT_STROKE`` (0.5) px, proportionally spaced: each glyph advances
by its own width plus ``TEXT_TRACKING`` (0.5) px (letters drawn one by one: a single-string draw makes
neighbours touch and rapidocr misreads them), the word centred; then the image is stretched
``TEXT_STRETCH`` (2x) vertically (tall, narrow glyphs; all at 32 px, scaled with the size) and, after
downsampling, grey levels ``TEXT_LEVELS`` (40, 250) are stretched to black and white (crisp stroke cores). So
where a letter lands depends on the widths of the others: a word is not a concatenation of fixed per-letter
slots. A render then moves the word by a random offset of up to ``TEXT_JITTER`` (1.5, 1) px (x, y; a
training batch may set another bound, ``text_jitter``), never closer than 1 px to the frame. Measured
(``OCRReward`` defaults, recognition only, 32 px, one random offset per word from seed 0): all 297 words of
the text task read exactly (mean OCR score 1.0), at the default offsets and at (3, 2); quality reward of these
renders 0.99 on average (min 0.84). Font size 9.5 (mini-world v2, which also had four-letter words) misread a
few two-letter words.

How hard the text task is to learn is set by the offsets, not the font: pretraining the three-stage recipe
(``graphs/pretrain_miniworld.yaml``, 14,000 steps) with offsets up to (3, 2) px left the tiny model at OCR 0.17
on SDE rollouts of train prompts (1 % read exactly), with (1.5, 1) px at 0.94 (85 % exact) and (0.5, 0.5) px
at 1.00 (models/miniworld/PROVENANCE.md).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from flowopd_core.images import from_uint8
from flowopd_core.miniworld.options import TEXT_JITTER as TEXT_JITTER
from flowopd_core.miniworld.options import is_text_jitter, template_shares
from flowopd_core.miniworld.options import parse_task_weights as parse_task_weights
from flowopd_core.miniworld.options import parse_template_weights as parse_template_weights
from flowopd_core.miniworld.options import parse_text_jitter as parse_text_jitter
from flowopd_core.miniworld.tasks import (
    PALETTE,
    QUALITY_DEGRADED_FRACTION,
    TASKS,
    TEMPLATES,
    template_prompts,
)
from flowopd_core.prompts import PromptSpec

SUPERSAMPLE = 4
GAP = 2.0  # px at size 32: least clearance between two objects' bounding boxes (keeps components apart)
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "washed", "jagged", "dirty")
SEVERITIES: tuple[str, ...] = ("mild", "heavy")
TEXT_FONT_SIZE = 12.0  # at size 32
TEXT_STROKE = 0.5  # px at size 32: stroke width around each glyph (semi-bold)
TEXT_TRACKING = 0.5  # px at size 32: extra space after each glyph's own advance width
TEXT_STRETCH = 2.0  # vertical stretch of the rendered word (tall, narrow glyphs)
TEXT_LEVELS = (40.0, 250.0)  # grey levels mapped to black and white after downsampling (crisper strokes)
SMALL_RADIUS = (0.14, 0.19)  # object half-extent / image size of a "small" compose object (single template)
LARGE_RADIUS = (0.27, 0.32)  # ... of a "large" one
BINDING_THRESHOLD = 12  # grey levels (of 255): a pixel shows the binding if a shape swap changes it by more


@dataclass(frozen=True)
class Placed:
    """One object placed in the image: centre ``(cx, cy)`` and half-extent ``r`` in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float


# ----------------------------------------------------------------------------------------------- drawing
def draw_objects(objects: Sequence[Placed], size: int) -> np.ndarray:
    """Draw objects on a white canvas -> ``(size, size, 3)`` uint8 (anti-aliased by supersampling).

    circle: radius r; square: half-side 0.9 r; triangle: upright, apex at cy - r, base of width 2r at cy + r;
    diamond: a square standing on a corner, corners r from the centre.
    """
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), PALETTE["white"])
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        x, y, r, fill = o.cx * s, o.cy * s, o.r * s, PALETTE[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            h = 0.9 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return np.asarray(canvas.reduce(s))


@functools.lru_cache(maxsize=4096)
def _word_canvas(word: str, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The centred word at ``SUPERSAMPLE`` x ``size`` -> (grey ``(S*size, S*size)`` uint8, ink box y0, x0, y1, x1)."""
    s = SUPERSAMPLE
    big, scale = size * s, size / 32 * s
    font = ImageFont.load_default(size=TEXT_FONT_SIZE * scale)
    advances = [font.getlength(letter) for letter in word]
    tracking = TEXT_TRACKING * scale
    x = big / 2 - (sum(advances) + tracking * (len(word) - 1)) / 2
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    for letter, advance in zip(word, advances):  # proportional: each glyph advances by its own width
        draw.text((x + advance / 2, big / 2), letter, font=font, fill=0, anchor="mm",
                  stroke_width=TEXT_STROKE * scale, stroke_fill=0)
        x += advance + tracking
    band = int(round(big / TEXT_STRETCH))
    top = (big - band) // 2
    grey = np.asarray(canvas.crop((0, top, big, top + band)).resize((big, big), Image.BICUBIC))
    ys, xs = np.nonzero(grey < 250)
    if not len(ys):
        raise ValueError(f"word {word!r} draws no ink")
    grey.setflags(write=False)
    return grey, (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def word_slack(word: str, size: int = 32) -> tuple[float, float, float, float]:
    """How far (px) the centred ``word`` can move left, right, up and down and keep its ink >= 1 px inside the
    frame (size / 32 px below 32 px); raises ``ValueError`` when the centred word does not fit at all."""
    grey, (y0, x0, y1, x1) = _word_canvas(word, size)
    big, margin = grey.shape[0], SUPERSAMPLE * min(1.0, size / 32)  # 1 px at 32 px and up, 0.5 px at 16
    slack = (x0 - margin, big - margin - x1, y0 - margin, big - margin - y1)
    if min(slack) < 0:
        raise ValueError(f"word {word!r} does not fit a {size}px image")
    return tuple(v / SUPERSAMPLE for v in slack)  # type: ignore[return-value]


def render_word(word: str, size: int = 32, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The text task's image of ``word`` -> ``(size, size, 3)`` uint8, black on white, centred and moved by
    ``offset`` = (dx, dy) px (rounded to 1 / ``SUPERSAMPLE`` px). Raises ``ValueError`` when the word does not
    fit or the offset moves its ink closer than 1 px to the frame (see ``word_slack``)."""
    if not word:
        raise ValueError("cannot render an empty word")
    left, right, up, down = word_slack(word, size)
    dx, dy = offset
    if not (-left <= dx <= right and -up <= dy <= down):
        raise ValueError(f"offset {offset} moves {word!r} out of the frame (slack l/r/u/d {left, right, up, down})")
    grey, _ = _word_canvas(word, size)
    sx, sy = int(round(dx * SUPERSAMPLE)), int(round(dy * SUPERSAMPLE))
    moved = np.roll(grey, (sy, sx), axis=(0, 1))  # exact: the rolled-over border rows/columns are white
    small = np.asarray(Image.fromarray(moved).reduce(SUPERSAMPLE)).astype(np.float32)
    lo, hi = TEXT_LEVELS
    small = np.clip(np.rint((small - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(small[:, :, None], 3, axis=2)


def word_offset(
    word: str, rng: np.random.Generator, size: int = 32, jitter: tuple[float, float] | None = None
) -> tuple[float, float]:
    """A random (dx, dy) offset for ``word``: uniform within ``jitter`` (px at size 32, scaled with the size;
    default ``TEXT_JITTER``) and the word's slack."""
    left, right, up, down = word_slack(word, size)
    jx, jy = (j * size / 32 for j in (TEXT_JITTER if jitter is None else jitter))
    dx = rng.uniform(-min(left, jx), min(right, jx))
    dy = rng.uniform(-min(up, jy), min(down, jy))
    return float(dx), float(dy)


# ------------------------------------------------------------------------------------------------ layout
def _fits(candidate: tuple[float, float, float], placed: list[tuple[float, float, float]], gap: float) -> bool:
    x, y, r = candidate
    return all(abs(x - px) >= r + pr + gap or abs(y - py) >= r + pr + gap for px, py, pr in placed)


def layout_count(n: int, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping ``(cx, cy, r)`` at random places (bounding boxes at least ``GAP`` apart); half-extents
    r / size in (0.16, 0.25) for one object, (0.15, 0.2) for two or three, (0.14, 0.17) for four."""
    scale = size / 32
    low, high = (0.16, 0.25) if n == 1 else (0.15, 0.2) if n <= 3 else (0.14, 0.17)
    for _ in range(100):
        placed: list[tuple[float, float, float]] = []
        radii = rng.uniform(low, high, size=n) * size
        for r in radii:
            lo, hi = r + scale, size - r - scale
            for _ in range(30):
                candidate = (rng.uniform(lo, hi), rng.uniform(lo, hi), r)
                if _fits(candidate, placed, GAP * scale):
                    placed.append(candidate)
                    break
        if len(placed) == n:
            return placed
    raise RuntimeError(f"could not place {n} objects in a {size}px image")  # not reached for n <= 4


def layout_pair(relation: str, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Two ``(cx, cy, r)``, the first ``relation`` the second ("left of", ...), cross-axis offset <= 2 px."""
    scale = size / 32
    ra, rb = rng.uniform(0.15, 0.19, size=2) * size
    lo_a, lo_b = ra + scale, rb + scale
    # main axis: a at m_a, b at m_a + sep; both inside the frame
    sep = min(ra + rb + GAP * scale + rng.uniform(0.0, 4.0) * scale, size - lo_a - lo_b)
    m_a = rng.uniform(lo_a, max(lo_a, size - lo_b - sep))  # max(): rounding can make the range negative
    m_b = m_a + sep
    rmax = max(ra, rb)
    cross = rng.uniform(rmax + scale, size - rmax - scale)
    ca, cb = cross + rng.uniform(-2, 2, size=2) * scale
    ca, cb = (float(np.clip(c, rmax + scale, size - rmax - scale)) for c in (ca, cb))
    if relation == "left of":
        return [(m_a, ca, ra), (m_b, cb, rb)]
    if relation == "right of":
        return [(m_b, ca, ra), (m_a, cb, rb)]
    if relation == "above":
        return [(ca, m_a, ra), (cb, m_b, rb)]
    if relation == "below":
        return [(ca, m_b, ra), (cb, m_a, rb)]
    raise ValueError(f"unknown relation {relation!r}")


def layout_single(size_word: str | None, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    """One ``(cx, cy, r)`` anywhere inside the frame; r / size in ``SMALL_RADIUS`` or ``LARGE_RADIUS`` for a
    "small" or "large" object, else in (0.16, 0.25) (as ``layout_count(1)``)."""
    if size_word is None:
        return layout_count(1, rng, size)[0]
    if size_word not in ("small", "large"):
        raise ValueError(f"unknown object size {size_word!r}")
    r = rng.uniform(*(SMALL_RADIUS if size_word == "small" else LARGE_RADIUS)) * size
    lo, hi = r + size / 32, size - r - size / 32
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), float(r)


def layout_icon(big: bool, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    """One ``(cx, cy, r)`` near the centre (quality task); ``big`` picks the "large" radius range."""
    r = rng.uniform(*((0.26, 0.32) if big else (0.16, 0.2))) * size
    slack = 0.3 * (size / 2 - r - size / 32)
    cx, cy = size / 2 + rng.uniform(-slack, slack, size=2)
    return float(cx), float(cy), float(r)


# ------------------------------------------------------------------------------------------------ render
def render(
    spec: PromptSpec, rng: np.random.Generator, size: int = 32, text_jitter: tuple[float, float] | None = None
) -> np.ndarray:
    """Ground-truth image of a mini-world prompt -> ``(size, size, 3)`` uint8.

    compose/quality: random sizes and positions; text: the word at a random offset (``word_offset``, within
    ``text_jitter``, default ``TEXT_JITTER``); all drawn from ``rng``.
    """
    if size < 16:
        raise ValueError(f"mini-world images need size >= 16, got {size}")
    truth = spec.spec
    if spec.task == "text":
        word = truth["word"]
        return render_word(word, size, word_offset(word, rng, size, text_jitter))
    return draw_objects(placed_objects(spec, rng, size), size)


def placed_objects(spec: PromptSpec, rng: np.random.Generator, size: int = 32) -> list[Placed]:
    """The objects of a compose or quality prompt's ground truth at random sizes and places (``render``)."""
    truth = spec.spec
    template = truth.get("template")
    objs = truth.get("objects") or []
    if spec.task == "compose" and template == "single":
        spots = [layout_single(objs[0].get("size"), rng, size)]
    elif spec.task == "compose" and template == "count":
        spots = layout_count(objs[0]["count"], rng, size)
        objs = objs * len(spots)
    elif template == "pair" and spec.task in ("compose", "quality"):
        spots = layout_count(2, rng, size)
    elif spec.task == "compose" and template == "position":
        spots = layout_pair(truth["relation"], rng, size)
    elif spec.task == "quality" and template == "icon":
        spots = [layout_icon(truth["size"] == "large", rng, size)]
    else:
        raise ValueError(f"not a mini-world prompt (task {spec.task!r}, template {template!r}): {spec.text!r}")
    return [Placed(o["colour"], o["shape"], *xyr) for o, xyr in zip(objs, spots)]


def with_extra_copy(placed: Sequence[Placed], rng: np.random.Generator, size: int = 32) -> list[Placed] | None:
    """``placed`` plus one more copy of one of its objects (same colour, shape and size, picked at random) at a
    random free place (bounding boxes at least ``GAP`` apart), or ``None`` where none fits in 30 tries: the
    compose task's "one too many" error (``sample_training_batch``'s ``compose_error_fraction``)."""
    scale = size / 32
    source = placed[int(rng.integers(len(placed)))]
    taken = [(o.cx, o.cy, o.r) for o in placed]
    lo, hi = source.r + scale, size - source.r - scale
    for _ in range(30):
        candidate = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), source.r)
        if _fits(candidate, taken, GAP * scale):
            return [*placed, Placed(source.colour, source.shape, *candidate)]
    return None


def with_crop(placed: Sequence[Placed], rng: np.random.Generator, size: int = 32) -> list[Placed]:
    """``placed`` with one object (picked at random) moved against a random edge of the frame so that 30-60 % of
    its extent lies outside it: the compose task's cropped-object error (``sample_training_batch``'s
    ``compose_crop_fraction``). The detector reads a cropped object's shape against its truncated box and mostly
    fails it (strict 0.17-0.30 per template on such renders, against 0.99-1.0 uncropped). Unlike
    ``with_extra_copy`` no caption describes a cropped image better than the prompt it was drawn for, so
    classifier-free guidance does not steer samples away from the error (docs/experiments.md)."""
    i = int(rng.integers(len(placed)))
    o = placed[i]
    side = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
    inside = o.r * (1.0 - 2.0 * float(rng.uniform(0.3, 0.6)))  # centre's distance inside the edge
    at = inside if side % 2 == 0 else size - inside
    out = list(placed)
    out[i] = replace(o, cx=at) if side < 2 else replace(o, cy=at)
    return out


# ------------------------------------------------------------------------------------------- degradation
def _object_mask(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels visibly away from the white background."""
    return (255 - image.astype(np.int16)).max(axis=2) > 40


def _blur(image: np.ndarray, rng: np.random.Generator, heavy: bool) -> np.ndarray:
    sigma = rng.uniform(*((2.0, 3.0) if heavy else (0.6, 1.2))) * image.shape[0] / 32
    return ndimage.gaussian_filter(image.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")


def _noise(image: np.ndarray, rng: np.random.Generator, heavy: bool) -> np.ndarray:
    std = rng.uniform(*((0.3, 0.45) if heavy else (0.05, 0.12))) * 255.0
    return image.astype(np.float32) + rng.normal(0.0, std, size=image.shape)


def _washed(image: np.ndarray, rng: np.random.Generator, heavy: bool) -> np.ndarray:
    keep = rng.uniform(*((0.1, 0.25) if heavy else (0.6, 0.8)))
    return keep * image.astype(np.float32) + (1.0 - keep) * 190.0


def _jagged(image: np.ndarray, rng: np.random.Generator, heavy: bool) -> np.ndarray:
    out = image.copy()
    for _ in range(2 if heavy else 1):
        mask = _object_mask(out)
        if not mask.any():
            break
        grow = ndimage.binary_dilation(mask) & ~mask
        shrink = mask & ~ndimage.binary_erosion(mask)
        p = 0.5 if heavy else 0.35
        _, (iy, ix) = ndimage.distance_transform_edt(~mask, return_indices=True)
        add = grow & (rng.random(mask.shape) < p)
        cut = shrink & (rng.random(mask.shape) < p)
        out[add] = out[iy[add], ix[add]]
        out[cut] = PALETTE["white"]
    return out.astype(np.float32)


def _dirty(image: np.ndarray, rng: np.random.Generator, heavy: bool) -> np.ndarray:
    h, w, _ = image.shape
    background = ~_object_mask(image)
    amplitude = rng.uniform(*((0.45, 0.6) if heavy else (0.15, 0.3))) * 255.0
    field = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=h / 8)
    field = (field - field.min()) / (field.max() - field.min() + 1e-8)  # smooth blotches in [0, 1]
    tint = rng.uniform(0.3, 1.0, size=3)  # darkening per channel: a brownish / greyish stain
    out = image.astype(np.float32)
    out[background] -= amplitude * field[background, None] * tint
    count = int(rng.integers(*((15, 26) if heavy else (3, 7))))
    ys, xs = rng.integers(0, h, size=count), rng.integers(0, w, size=count)
    keep = background[ys, xs]
    out[ys[keep], xs[keep]] = rng.uniform(60, 200, size=(int(keep.sum()), 3))
    return out


_DEGRADE = {"blur": _blur, "noise": _noise, "washed": _washed, "jagged": _jagged, "dirty": _dirty}


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator, severity: str = "mild") -> np.ndarray:
    """Degrade a ``(H, W, 3)`` uint8 image -> uint8 of the same shape.

    kinds (``DEGRADATIONS``), mild / heavy ranges at 32 px (scaled with the size where spatial):
      blur   Gaussian blur, sigma 0.6-1.2 / 2-3 px
      noise  additive Gaussian noise, std 0.05-0.12 / 0.3-0.45 of the range
      washed colours pulled towards grey 190: keep 60-80 % / 10-25 % of the original
      jagged boundary pixels toggled at random (p 0.35, once / p 0.5, twice): ragged outlines
      dirty  smooth dark stain on the background (15-30 % / 45-60 % deep) + 3-6 / 15-25 speckles
    """
    if kind not in _DEGRADE:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; expected one of {SEVERITIES}")
    out = _DEGRADE[kind](image, rng, severity == "heavy")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def binding_pixels(placed: Sequence[Placed], objects: Sequence[Mapping], size: int = 32) -> np.ndarray:
    """``(size, size)`` bool: the pixels of ``draw_objects(placed)`` that change when the two named ``objects``
    (a compose spec's ``objects``) swap shapes, each colour keeping its place: where an image shows which shape
    goes with which colour (the binding a two-object prompt names). Every placed object of a named colour and
    shape takes the other's shape (extra copies and cropped objects too). All False unless the spec names two
    objects of different colours and different shapes (then a swap changes nothing the prompt names)."""
    if len(objects) != 2:
        return np.zeros((size, size), dtype=bool)
    (c0, s0), (c1, s1) = ((o["colour"], o["shape"]) for o in objects)
    if c0 == c1 or s0 == s1:
        return np.zeros((size, size), dtype=bool)
    swap = {(c0, s0): s1, (c1, s1): s0}
    swapped = [replace(o, shape=swap.get((o.colour, o.shape), o.shape)) for o in placed]
    before, after = draw_objects(placed, size), draw_objects(swapped, size)
    return np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2) > BINDING_THRESHOLD


# ---------------------------------------------------------------------------------------- training batches
@dataclass(frozen=True)
class TrainingBatch:
    """One pretraining batch: ``images`` ``(B, 3, H, W)`` float32 in [0, 1] with their prompts.

    ``degradations[i]`` names the degradation applied to image i ("" for a clean render).
    """

    prompts: list[str]
    images: torch.Tensor
    tasks: list[str]
    specs: list[PromptSpec]
    degradations: list[str]
    binding: torch.Tensor | None = None
    """``(B, 1, H, W)`` float32, 1 on the pixels that show a two-object compose image's binding
    (:func:`binding_pixels` of its final placement, an extra copy or a crop included), else 0; only with
    ``binding_masks=True``."""


def sample_training_batch(
    rng: np.random.Generator,
    batch_size: int,
    size: int = 32,
    tasks: Sequence[str] = TASKS,
    quality_degraded_fraction: float = QUALITY_DEGRADED_FRACTION,
    task_weights: Sequence[float] | None = None,
    text_jitter: tuple[float, float] | None = None,
    compose_error_fraction: float = 0.0,
    template_weights: Mapping[str, Mapping[str, float]] | None = None,
    compose_crop_fraction: float = 0.0,
    binding_masks: bool = False,
) -> TrainingBatch:
    """Draw ``batch_size`` (prompt, image) pairs from the ``train`` split.

    Sampling: task uniform over ``tasks`` (or in proportion to ``task_weights``, one non-negative weight per
    task, not all zero), then template uniform within the task (or, for a task in ``template_weights``
    (:func:`parse_template_weights`' form), in proportion to its templates' weights, 1 where not named), then
    prompt uniform within the template; the
    image is ``render(spec, rng, size, text_jitter)`` (``text_jitter``: the text task's largest (x, y) offset
    in px at 32 px, default ``TEXT_JITTER``). For the quality task a fraction ``quality_degraded_fraction``
    (default 0.5) of the images is degraded by one of ``DEGRADATIONS`` (uniform) at mild severity. For the compose
    task a fraction ``compose_error_fraction`` (default 0) is drawn with one named object too many
    (:func:`with_extra_copy`, kind "extra_copy"; an image where no extra copy fits in 20 layouts stays right, so
    the realised share is lower: 0.43 at 0.5), and a fraction ``compose_crop_fraction`` (default 0) of the
    compose images has one object partly outside the frame (:func:`with_crop`, kind "crop"; drawn after the
    extra-copy error, so both can apply); text images are always clean. Deterministic given ``rng``; with both
    compose fractions 0 and no ``template_weights`` the stream is the one the shipped base was trained on.
    ``binding_masks``: also return each image's :func:`binding_pixels` as ``binding`` (no random draws: the
    stream is the same either way).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if size < 16:
        raise ValueError(f"mini-world images need size >= 16, got {size}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
    fractions = {"quality_degraded_fraction": quality_degraded_fraction,
                 "compose_error_fraction": compose_error_fraction, "compose_crop_fraction": compose_crop_fraction}
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:  # NaN fails too
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if text_jitter is not None and not is_text_jitter(text_jitter):
        raise ValueError(f"text_jitter must be two finite numbers >= 0 (x, y px), got {text_jitter!r}")
    p = None
    if task_weights is not None:
        w = np.asarray(task_weights, dtype=np.float64)
        if w.shape != (len(tasks),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"task_weights must be one finite weight >= 0 per task, not all 0; got {list(task_weights)}"
            )
        p = w / w.sum()
    try:
        template_p = template_shares(template_weights or {})
    except ValueError as err:
        raise ValueError(f"template_weights: {err}") from None
    specs, arrays, kinds, masks = [], [], [], []
    for _ in range(batch_size):
        # uniform draws keep their original form, so unweighted data streams are unchanged
        task = tasks[int(rng.integers(len(tasks)))] if p is None else tasks[int(rng.choice(len(tasks), p=p))]
        templates = TEMPLATES[task]
        if task in template_p:
            template = templates[int(rng.choice(len(templates), p=template_p[task]))]
        else:
            template = templates[int(rng.integers(len(templates)))]
        pool = template_prompts(task, template, "train")
        spec = pool[int(rng.integers(len(pool)))]
        drawn = placed_objects(spec, rng, size) if task == "compose" else None  # render's draws, kept
        image = draw_objects(drawn, size) if drawn is not None else render(spec, rng, size, text_jitter)
        kind = ""
        placed = None
        if task == "compose" and compose_error_fraction > 0 and rng.random() < compose_error_fraction:
            for _ in range(20):  # a fresh layout until the extra copy fits
                placed = with_extra_copy(placed_objects(spec, rng, size), rng, size)
                if placed is not None:
                    kind, image = "extra_copy", draw_objects(placed, size)
                    break
        if task == "compose" and compose_crop_fraction > 0 and rng.random() < compose_crop_fraction:
            placed = with_crop(placed or placed_objects(spec, rng, size), rng, size)
            kind, image = "+".join(filter(None, (kind, "crop"))), draw_objects(placed, size)
        if task == "quality" and rng.random() < quality_degraded_fraction:
            kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
            image = degrade(image, kind, rng, severity="mild")
        if binding_masks:
            final = placed if placed is not None else drawn
            masks.append(binding_pixels(final, spec.spec["objects"], size) if final is not None
                         else np.zeros((size, size), dtype=bool))
        specs.append(spec)
        arrays.append(image)
        kinds.append(kind)
    images = from_uint8(arrays)
    return TrainingBatch(
        prompts=[s.text for s in specs],
        images=images.contiguous(),
        tasks=[s.task for s in specs],
        specs=specs,
        degradations=kinds,
        binding=torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)) if binding_masks else None,
    )
