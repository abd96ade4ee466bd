"""Mini-world images: ground-truth renders with random layout jitter, degradations, and training batches.

Images here are ``(H, W, 3)`` uint8 numpy arrays (white background); ``sample_training_batch`` turns them into
the project's ``(B, 3, H, W)`` float tensors in [0, 1]. Everything scales with ``size`` (default 32).

Rendering is anti-aliased: shapes are drawn with PIL at ``SUPERSAMPLE`` x the size and box-filtered down.

Text task: each letter of the word is drawn in Pillow's bundled TrueType font (``ImageFont.load_default``) at
font size ``TEXT_FONT_SIZE`` (13) with a stroke of ``TEXT_STROKE`` (0.5) px, centred in its own slot: slot
centres are ``TEXT_PITCH`` (10) px apart around the image centre; then the image is stretched
``TEXT_STRETCH`` (2x) vertically (all at 32 px, scaled with the size). A three-letter word then spans about
x 1-30 and y 6-27 px, with a clear gap between glyphs (a single-string draw makes neighbours touch and
rapidocr misreads them). Position is fixed (no jitter), so a given word always has the same image. Measured
(``OCRReward`` defaults, recognition only, 32 px): all 512 three-letter words over ``LETTERS`` read exactly
(mean score 1.0, 100 % exact).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from flowopd_core.images import from_uint8
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
TEXT_FONT_SIZE = 13  # at size 32
TEXT_STROKE = 0.5  # px at size 32: stroke width around each glyph (semi-bold)
TEXT_PITCH = 10.0  # px at size 32: distance between the centres of neighbouring letters
TEXT_STRETCH = 2.0  # vertical stretch of the rendered word (tall, narrow glyphs)


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

    circle: radius r; square: half-side 0.9 r; triangle: upright, apex at cy - r, base of width 2r at cy + r.
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
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return np.asarray(canvas.reduce(s))


@functools.lru_cache(maxsize=2048)
def _word_image(word: str, size: int) -> np.ndarray:
    s = SUPERSAMPLE
    big, scale = size * s, size / 32 * s
    font = ImageFont.load_default(size=TEXT_FONT_SIZE * scale)
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    for i, letter in enumerate(word):  # one slot per letter, TEXT_PITCH apart, centred as a group
        x = big / 2 + (i - (len(word) - 1) / 2) * TEXT_PITCH * scale
        draw.text((x, big / 2), letter, font=font, fill=0, anchor="mm", stroke_width=TEXT_STROKE * scale, stroke_fill=0)
    band = int(round(big / TEXT_STRETCH))
    top = (big - band) // 2
    canvas = canvas.crop((0, top, big, top + band)).resize((big, big), Image.BICUBIC)
    grey = np.asarray(canvas.reduce(s))
    image = np.repeat(grey[:, :, None], 3, axis=2)
    image.setflags(write=False)
    return image


def render_word(word: str, size: int = 32) -> np.ndarray:
    """The text task's image of ``word`` -> ``(size, size, 3)`` uint8, black on white, fixed position.

    Sized for the task's three-letter words (module doc); longer words run out of the frame.
    """
    if not word:
        raise ValueError("cannot render an empty word")
    return _word_image(word, size).copy()


# ------------------------------------------------------------------------------------------------ layout
def _fits(candidate: tuple[float, float, float], placed: list[tuple[float, float, float]], gap: float) -> bool:
    x, y, r = candidate
    return all(abs(x - px) >= r + pr + gap or abs(y - py) >= r + pr + gap for px, py, pr in placed)


def layout_count(n: int, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping ``(cx, cy, r)`` at random places (bounding boxes at least ``GAP`` apart)."""
    scale = size / 32
    low, high = ((0.16, 0.25) if n == 1 else (0.15, 0.2))
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
    raise RuntimeError(f"could not place {n} objects in a {size}px image")  # not reached for n <= 3


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


def layout_icon(big: bool, rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    """One ``(cx, cy, r)`` near the centre (quality task); ``big`` picks the "large" radius range."""
    r = rng.uniform(*((0.26, 0.32) if big else (0.16, 0.2))) * size
    slack = 0.3 * (size / 2 - r - size / 32)
    cx, cy = size / 2 + rng.uniform(-slack, slack, size=2)
    return float(cx), float(cy), float(r)


# ------------------------------------------------------------------------------------------------ render
def render(spec: PromptSpec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Ground-truth image of a mini-world prompt -> ``(size, size, 3)`` uint8.

    compose/quality: random sizes and positions (drawn from ``rng``); text: fixed (``render_word``).
    """
    if size < 16:
        raise ValueError(f"mini-world images need size >= 16, got {size}")
    truth = spec.spec
    template = truth.get("template")
    if spec.task == "text":
        return render_word(truth["word"], size)
    if spec.task == "compose" and template == "count":
        obj = truth["objects"][0]
        spots = layout_count(obj["count"], rng, size)
        return draw_objects([Placed(obj["colour"], obj["shape"], x, y, r) for x, y, r in spots], size)
    if spec.task == "compose" and template == "position":
        spots = layout_pair(truth["relation"], rng, size)
        objs = truth["objects"]
        return draw_objects([Placed(o["colour"], o["shape"], *xyr) for o, xyr in zip(objs, spots)], size)
    if spec.task == "quality":
        obj = truth["objects"][0]
        x, y, r = layout_icon(truth["size"] == "large", rng, size)
        return draw_objects([Placed(obj["colour"], obj["shape"], x, y, r)], size)
    raise ValueError(f"not a mini-world prompt (task {spec.task!r}, template {template!r}): {spec.text!r}")


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


def sample_training_batch(
    rng: np.random.Generator,
    batch_size: int,
    size: int = 32,
    tasks: Sequence[str] = TASKS,
    quality_degraded_fraction: float = QUALITY_DEGRADED_FRACTION,
) -> TrainingBatch:
    """Draw ``batch_size`` (prompt, image) pairs from the ``train`` split.

    Sampling: task uniform over ``tasks``, then template uniform within the task, then prompt uniform within
    the template; the image is ``render(spec, rng, size)``. For the quality task a fraction
    ``quality_degraded_fraction`` (default 0.5) of the images is degraded by one of ``DEGRADATIONS``
    (uniform) at mild severity; compose and text images are always clean. Deterministic given ``rng``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
    if not 0.0 <= quality_degraded_fraction <= 1.0:
        raise ValueError(f"quality_degraded_fraction must lie in [0, 1], got {quality_degraded_fraction}")
    specs, arrays, kinds = [], [], []
    for _ in range(batch_size):
        task = tasks[int(rng.integers(len(tasks)))]
        templates = TEMPLATES[task]
        pool = template_prompts(task, templates[int(rng.integers(len(templates)))], "train")
        spec = pool[int(rng.integers(len(pool)))]
        image = render(spec, rng, size)
        kind = ""
        if task == "quality" and rng.random() < quality_degraded_fraction:
            kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
            image = degrade(image, kind, rng, severity="mild")
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
    )
