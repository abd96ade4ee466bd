"""No-reference image quality for mini-world images (a programmatic proxy, not a learned aesthetic model:
none can be had offline here; see docs/miniworld.md).

A clean mini-world image is flat palette-coloured objects with crisp edges on a pure white background.
The score measures how far an image is from that, without looking at the prompt. Pixels are first matched to
the nearest ``PALETTE`` colour; "closeness" of a pixel to a colour at RGB distance d (0-441) is
``clip((far - d) / (far - near), 0, 1)``: 1 within ``near``, 0 beyond ``far``. Objects are the connected
non-white regions of at least ``min_area`` of the image. Four terms, each in [0, 1]:

- background (``B``): mean closeness to white of the pixels more than 1 px away from every object.
  Falls with noise, stains, speckles, a grey or washed-out background.
- purity (``P``): mean closeness of object-interior pixels (objects eroded by 1 px) to their own palette
  colour. Falls with noise, washed-out or off-palette colours, texture inside objects. Text ink (a component
  whose most frequent colour is black) has strokes too thin to erode: its interior is the darker half of its
  pixels (by distance to black), the stroke cores.
- sharpness (``S``): edge width = the summed "mixedness" (1 - closeness to the nearest palette colour) of the
  pixels within 2 px of an object boundary, divided by the boundary length (object pixels with a 4-neighbour
  outside). An anti-aliased edge is about one mixed pixel wide; blur widens it. ``S = clip((blurred - w) /
  (blurred - sharp), 0, 1)`` with the edge widths ``sharp`` and ``blurred`` of the config.
- form (``F``): mean over coloured objects (text ink, whose most frequent colour is black, is exempt) of their
  boundary regularity ``2 (h + w) / perimeter`` (bbox height/width; perimeter = 4-neighbour boundary edges). It is
  exactly 1 for every orthogonally convex blob -- all mini-world shapes -- and drops for ragged, notched or
  fragmented outlines; mapped to [0, 1] by ``clip((regularity - ragged) / (1 - ragged), 0, 1)``.

``score = B * P * S * F`` (each defect is a multiplicative penalty; a single zero term zeroes the score).
An image without any object scores 0 (a blank image is not a well-formed picture).
Why it tracks quality: each term is at its maximum exactly on the generator's clean renders and each
degradation the pretraining data contains (``miniworld.DEGRADATIONS``: blur, noise, washed-out colours, jagged
outlines, dirty background) lowers at least one term in proportion to its strength (measured in tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from flowopd_core.miniworld.tasks import PALETTE
from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import Reward, SampleScore

_NAMES: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)
_WHITE, _BLACK = _NAMES.index("white"), _NAMES.index("black")


@dataclass(frozen=True)
class QualityConfig:
    near: float = field(
        default=20.0, metadata={"help": "RGB distance (0-441) within which a pixel fully matches a colour"}
    )
    far: float = field(default=80.0, metadata={"help": "RGB distance beyond which a pixel does not match at all"})
    min_area: float = field(default=0.01, metadata={"help": "smallest object, as a fraction of the image area"})
    sharp: float = field(default=1.0, metadata={"help": "edge width (mixed pixels per boundary pixel) scoring 1"})
    blurred: float = field(default=3.0, metadata={"help": "edge width scoring 0"})
    ragged: float = field(default=0.7, metadata={"help": "boundary regularity scoring 0 (1 = orthogonally convex)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.near < self.far:
            raise ValueError(f"need 0 <= near < far, got {self.near}, {self.far}")
        if not 0.0 < self.min_area < 1.0:
            raise ValueError(f"min_area must lie in (0, 1), got {self.min_area}")
        if not 0.0 <= self.sharp < self.blurred:
            raise ValueError(f"need 0 <= sharp < blurred, got {self.sharp}, {self.blurred}")
        if not 0.0 <= self.ragged < 1.0:
            raise ValueError(f"ragged must lie in [0, 1), got {self.ragged}")


@dataclass(frozen=True)
class QualityTerms:
    """The four terms (module doc) and their geometric mean; all in [0, 1]."""

    background: float
    purity: float
    sharpness: float
    form: float
    score: float
    objects: int


def _closeness(distance: np.ndarray, config: QualityConfig) -> np.ndarray:
    return np.clip((config.far - distance) / (config.far - config.near), 0.0, 1.0)


def regularity(part: np.ndarray) -> float:
    """``(h, w)`` bool component cropped to its bbox -> ``2 (h + w) / perimeter`` in (0, 1] (module doc)."""
    padded = np.pad(part, 1)
    edges = np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    return 2.0 * (part.shape[0] + part.shape[1]) / edges


def quality_terms(image: np.ndarray, config: QualityConfig) -> QualityTerms:
    """Score one ``(H, W, 3)`` uint8 image (module doc)."""
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - _RGB, axis=-1)  # (H, W, K)
    nearest = dist.argmin(axis=-1)
    components, count = ndimage.label(nearest != _WHITE)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    keep = np.flatnonzero(sizes >= config.min_area * nearest.size)
    keep = keep[keep > 0]
    if keep.size == 0:
        return QualityTerms(0.0, 0.0, 0.0, 0.0, 0.0, 0)
    objects = np.isin(components, keep)
    # text ink: components whose most frequent colour is black (anti-aliased strokes add greys of any hue)
    ink_labels = [k for k in keep if np.bincount(nearest[components == k], minlength=len(_NAMES)).argmax() == _BLACK]
    ink = np.isin(components, ink_labels)  # strokes 1-2 px wide, too thin to erode
    background = ~ndimage.binary_dilation(objects, iterations=1)
    interior = ndimage.binary_erosion(objects & ~ink, iterations=1)
    for k in ink_labels:  # the stroke cores: the darker half of each ink component
        part = components == k
        interior |= part & (dist[..., _BLACK] <= np.median(dist[..., _BLACK][part]))
    interior = interior if interior.any() else objects

    close = _closeness(dist, config)  # (H, W, K)
    b = float(close[..., _WHITE][background].mean()) if background.any() else 0.0
    own = np.take_along_axis(close, nearest[..., None], axis=-1)[..., 0]
    p = float(own[interior].mean())

    boundary = objects & ~ndimage.binary_erosion(objects)
    band = ndimage.binary_dilation(boundary, iterations=2)
    mixed = 1.0 - close.max(axis=-1)
    width = float(mixed[band].sum() / boundary.sum())
    s = float(np.clip((config.blurred - width) / (config.blurred - config.sharp), 0.0, 1.0))

    forms = []
    for index, box in zip(range(1, count + 1), ndimage.find_objects(components)):
        if sizes[index] < config.min_area * nearest.size:
            continue
        if index in ink_labels:
            continue  # text ink: letters are not convex, their legibility is the OCR reward's business
        part = components[box] == index
        forms.append((regularity(part) - config.ragged) / (1.0 - config.ragged))
    f = float(np.clip(np.mean(forms), 0.0, 1.0)) if forms else 1.0
    score = b * p * s * f
    return QualityTerms(round(b, 4), round(p, 4), round(s, 4), round(f, 4), score, int(keep.size))


class QualityReward(Reward):
    """No-reference mini-world image quality (module doc); ignores the prompts."""

    name = "quality"
    config_type = QualityConfig

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        out = []
        for image in images:
            terms = quality_terms(image, self.config)
            details = {
                "background": terms.background,
                "purity": terms.purity,
                "sharpness": terms.sharpness,
                "form": terms.form,
                "objects": terms.objects,
            }
            out.append(SampleScore(score=terms.score, details=details))
        return out
