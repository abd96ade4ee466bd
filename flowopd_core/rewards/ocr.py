"""OCR reward: a real OCR engine (rapidocr 3.x, PP-OCR recognition model bundled in its wheel) reads the image
and the reading is compared to the prompt's target text as the paper does (docs/method.md §7):

    score = 1 - min(Levenshtein(reading, target), len(target)) / len(target)

after lower-casing and removing whitespace from both; full credit (1.0) when the target is a substring of the
reading. The target is ``spec["word"]``, else the first double-quoted span of the prompt text (Flow-GRPO's OCR
prompts quote it); a prompt with neither scores NaN.

Recognition only (no text detector, no angle classifier): the whole image is taken as one text line. Small
images are padded with a white border (``pad`` x their height on every side) and resized (bicubic) to the
recogniser's input height ``height``; the recogniser pads lines to at least ``min_width``. All images of a
batch go through the engine in batches of ``batch_size``. The engine is built once per reward object, lazily
and under a lock, and each call holds that lock (rapidocr's objects are not documented as thread-safe);
nothing else is shared.

``ocr_likelihood`` (:class:`OCRLikelihoodReward`) is a dense training form of the same reward: the same recogniser
and preparation, but instead of decoding a reading it takes the recogniser's per-frame character distribution
and scores the CTC likelihood of the target itself, case-folded (upper- and lower-case forms of a letter are one
class; every other character is one "other" class)::

    score = exp( log P_CTC(target | image) / len(target) )      # per-character geometric-mean probability

It lies in [0, 1], is 1 only when the recogniser is certain of the target, and moves with every change in
legibility, where the paper's edit score moves in steps of 1/len(target). On 128 SDE samples of the shipped
mini-world base (16 text prompts x 8) the two correlate at 0.59 (Spearman 0.53 within a prompt group).
Evaluate with ``ocr``; train with either. Its ``strict`` and ``details`` carry the decoded reading and its edit
score, so both can be watched during training. Measured on the mini-world, a text teacher trained on it did not
raise the paper's OCR metric either (docs/experiments.md, stage-1 probes): it is a training signal to try, not a fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import Reward, SampleScore, cannot_score

EXTRA = "miniworld"
"""The optional dependency set that brings the OCR stack: ``pip install -e '.[miniworld]'``."""


def _missing(module: str) -> ImportError:
    return ImportError(f"the OCR rewards need {module!r}, which comes with flowopd's {EXTRA!r} extra: "
                       f"pip install -e '.[{EXTRA}]' (or pip install 'flowopd[{EXTRA}]')")


def require(module: str) -> Any:
    """Import ``module`` of the OCR stack, or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module) from exc


def check_installed(*modules: str) -> None:
    """Raise :func:`require`'s ImportError for the first of ``modules`` that is not installed (without
    importing them: onnxruntime and rapidocr take seconds to import)."""
    for module in modules:
        try:
            found = sys.modules[module] if module in sys.modules else importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise _missing(module)

_QUOTED = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class OCRConfig:
    height: int = field(default=48, metadata={"help": "image height fed to the recogniser (PP-OCR rec uses 48)"})
    min_width: int = field(
        default=96,
        metadata={"help": "recogniser input width floor; rapidocr's 320 pads a square mini-world image 6x wider "
                          "(measured 3.6x slower, same readings on clean words)"},
    )
    pad: float = field(default=0.25, metadata={"help": "white border added on every side, as a fraction of the height"})
    batch_size: int = field(default=32, metadata={"help": "images per recogniser forward"})
    num_threads: int = field(
        default=1, metadata={"help": "onnxruntime intra-op threads (-1 = all cores); 1 leaves cores to sampling"}
    )

    def __post_init__(self) -> None:
        if self.height < 16:
            raise ValueError(f"height must be >= 16, got {self.height}")
        if self.min_width < self.height:
            raise ValueError(f"min_width must be >= height, got {self.min_width} < {self.height}")
        if not 0.0 <= self.pad <= 2.0:
            raise ValueError(f"pad must lie in [0, 2], got {self.pad}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_threads == 0 or self.num_threads < -1:
            raise ValueError(f"num_threads must be -1 or >= 1, got {self.num_threads}")


def normalise(text: str) -> str:
    """Lower-case and drop all whitespace (the paper's OCR normalisation)."""
    return "".join(text.lower().split())


def ocr_score(reading: str, target: str) -> float:
    """The paper's OCR reward in [0, 1]: 1 if ``target`` is in ``reading``, else 1 - min(edit, len)/len.

    Both strings are normalised first (``normalise``). An empty target raises ``ValueError``.
    """
    reading, target = normalise(reading), normalise(target)
    if not target:
        raise ValueError("the OCR target is empty")
    if target in reading:
        return 1.0
    distance = require("Levenshtein").distance(reading, target)
    return 1.0 - min(distance, len(target)) / len(target)


def target_text(prompt: PromptSpec) -> str | None:
    """The text a prompt asks to be written: ``spec["word"]`` or the first double-quoted span, else None."""
    word = prompt.spec.get("word")
    if isinstance(word, str) and normalise(word):
        return word
    match = _QUOTED.search(prompt.text)
    return match.group(1) if match and normalise(match.group(1)) else None


def prepare(image: np.ndarray, height: int, pad: float) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> white-padded, bicubic-resized ``(height, W', 3)`` uint8 BGR (the engine's order)."""
    border = int(round(pad * image.shape[0]))
    padded = ImageOps.expand(Image.fromarray(image), border=border, fill=(255, 255, 255))
    width = max(1, int(round(padded.width * height / padded.height)))
    resized = np.asarray(padded.resize((width, height), Image.BICUBIC))
    return np.ascontiguousarray(resized[:, :, ::-1])


class OCRReward(Reward):
    """rapidocr recognition-only reward, scored as the paper (module doc)."""

    name = "ocr"
    config_type = OCRConfig
    has_strict = True  # strict = the target is read exactly (score 1)

    def __init__(self, config: OCRConfig | None = None) -> None:
        check_installed("rapidocr", "onnxruntime", "Levenshtein")  # fail when built, not at the first score
        super().__init__(config)
        self._engine: Any = None
        self._lock = threading.Lock()

    def _locked_engine(self) -> Any:
        """The engine, built on first use; call with ``self._lock`` held."""
        if self._engine is None:
            self._engine = self._build_engine()
        return self._engine

    def _build_engine(self) -> Any:
        RapidOCR = require("rapidocr").RapidOCR  # noqa: N806  (heavy: onnxruntime, cv2 models; on first use)

        return RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_det": False,
                "Global.use_cls": False,
                "Rec.rec_batch_num": self.config.batch_size,
                "Rec.rec_img_shape": [3, self.config.height, self.config.min_width],
                "EngineConfig.onnxruntime.intra_op_num_threads": self.config.num_threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )

    def read(self, images: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """Recognise ``(H, W, 3)`` uint8 RGB images -> (text, confidence) per image."""
        if not images:
            return []
        lines = [prepare(image, self.config.height, self.config.pad) for image in images]
        with self._lock:
            output = self._locked_engine().recognize_txt(lines)
        return [(str(text), float(conf)) for text, conf in zip(output.txts, output.scores)]

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        targets = [target_text(p) for p in prompts]
        wanted = [i for i, t in enumerate(targets) if t is not None]
        readings = dict(zip(wanted, self.read([images[i] for i in wanted])))
        out = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            if target is None:
                out.append(cannot_score(f"prompt {prompt.id!r} names no text to read"))
                continue
            text, confidence = readings[i]
            score = ocr_score(text, target)
            details = {"target": target, "reading": text, "confidence": round(confidence, 4)}
            out.append(SampleScore(score=score, details=details, strict=float(score == 1.0)))
        return out


def ctc_target_loglik(probs: np.ndarray, target: str, classes: np.ndarray) -> float:
    """log P_CTC(target | frames), case-folded.

    ``probs`` ``(T, C)`` per-frame distributions over the recogniser's characters (index 0 = CTC blank);
    ``classes`` ``(C,)`` the lower-cased character of each index. The distribution is reduced to
    ``[blank, each distinct target character (all its case forms summed), other]`` and the CTC forward algorithm
    (``torch.nn.functional.ctc_loss``) sums over every alignment of the normalised target; ``-inf`` when no
    alignment fits in T frames (a repeated letter needs a blank between its copies).
    """
    target = normalise(target)
    if not target:
        raise ValueError("the OCR target is empty")
    letters = sorted(set(target))
    columns = [probs[:, 0]] + [probs[:, classes == c].sum(axis=1) for c in letters]
    reduced = np.stack(columns, axis=1).astype(np.float64)
    other = np.clip(1.0 - reduced.sum(axis=1, keepdims=True), 0.0, None)
    reduced = np.concatenate([reduced, other], axis=1)
    log_probs = torch.from_numpy(reduced).clamp_min(1e-30).log()[:, None]  # (T, 1, K + 2)
    labels = torch.tensor([[letters.index(c) + 1 for c in target]])
    nll = torch.nn.functional.ctc_loss(
        log_probs, labels, [reduced.shape[0]], [len(target)], blank=0, reduction="sum"
    )
    return -float(nll) if math.isfinite(float(nll)) else -math.inf


class OCRLikelihoodReward(OCRReward):
    """Dense OCR reward for training: the recogniser's per-character likelihood of the target (module doc)."""

    name = "ocr_likelihood"

    def _frames(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[str], np.ndarray]:
        """One recogniser forward: ``(N, T, C)`` frame distributions, the greedy readings, the class letters."""
        lines = [prepare(image, self.config.height, self.config.pad) for image in images]
        with self._lock:
            recogniser = self._locked_engine()._load_rec_model()  # rapidocr's TextRecognizer (pinned major version)
            _, height, width = recogniser.rec_image_shape
            ratio = max(width / height, *(line.shape[1] / line.shape[0] for line in lines))
            frames, readings = [], []
            for start in range(0, len(lines), self.config.batch_size):
                chunk = lines[start : start + self.config.batch_size]
                batch = np.stack([recogniser.resize_norm_img(line, ratio) for line in chunk]).astype(np.float32)
                probs = np.asarray(recogniser.session(batch), dtype=np.float32)
                decoded, _ = recogniser.postprocess_op(probs, wh_ratio_list=[ratio] * len(chunk), max_wh_ratio=ratio)
                frames.append(probs)
                readings.extend(str(text) for text, _ in decoded)
            classes = np.array([c.lower() for c in recogniser.postprocess_op.character])
        return np.concatenate(frames), readings, classes

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        targets = [target_text(p) for p in prompts]
        wanted = [i for i, t in enumerate(targets) if t is not None]
        frames, readings, classes = self._frames([images[i] for i in wanted]) if wanted else (None, [], None)
        row = {i: k for k, i in enumerate(wanted)}
        out = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            if target is None:
                out.append(cannot_score(f"prompt {prompt.id!r} names no text to read"))
                continue
            k = row[i]
            loglik = ctc_target_loglik(frames[k], target, classes)
            edit = ocr_score(readings[k], target)
            details = {"target": target, "reading": readings[k], "edit_score": edit, "loglik": round(loglik, 4)}
            out.append(SampleScore(score=math.exp(loglik / len(normalise(target))), details=details,
                                   strict=float(edit == 1.0)))
        return out
