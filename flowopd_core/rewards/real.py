"""Real-model reward adapters for clusters: each loads weights ONLY from a local folder named in its config.

Nothing here downloads: a missing folder fails at construction with a message naming the path, and
``from_pretrained`` runs with ``local_files_only=True``. These models are too heavy for a trainer's process, so
on a cluster they are usually served (``python runner.py serve-reward pickscore --port P``, see ``server.py``)
and reached with ``RemoteReward``; they also run in process.

- ``pickscore``: PickScore (Kirstain et al. 2023; docs/method.md §7), a CLIP-H fine-tuned on human preferences.
  raw = ``logit_scale.exp() * cos(image_embedding, text_embedding)`` (the model's own ``logits_per_image``
  diagonal; docs/method.md §6 reports model means of 21.5-23.1), and the training score is ``raw / normaliser``
  with Flow-GRPO's ``normaliser`` = 26 (so near 0.85 on such images; not clipped to [0, 1]). Folders: the model
  ``yuvalkirstain/PickScore_v1`` and the processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, each fetched once
  on a machine with network (e.g. ``hf download REPO --local-dir DIR``).

The aesthetic predictor, DeQA-Score, the GenEval detector and PaddleOCR have no adapter yet: their usual
weights ship as Python-object checkpoints (this project loads safetensors only) or need packages outside its
dependencies; reach them through a reward server (graphs/sd35m/README.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import Reward, SampleScore

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require_local_dir(path: str, what: str) -> Path:
    """``path`` as an existing folder, else ``FileNotFoundError`` naming it and what belongs there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: local folder {str(folder)!r} does not exist; weights are never downloaded -- fetch them once "
            f"on a machine with network and pass the folder's path"
        )
    return folder


@dataclass(frozen=True)
class PickScoreConfig:
    model_path: str = field(
        default="", metadata={"help": "local folder of the PickScore CLIP model (yuvalkirstain/PickScore_v1)"}
    )
    processor_path: str = field(
        default="",
        metadata={"help": "local folder of its CLIP processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K); "
                          "empty = model_path"},
    )
    device: str = field(default="cpu", metadata={"help": "torch device for the model, e.g. cpu or cuda:0"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, float16 or bfloat16"})
    batch_size: int = field(default=32, metadata={"help": "images per model forward"})
    max_length: int = field(default=77, metadata={"help": "text tokens (prompts are truncated, as PickScore does)"})
    normaliser: float = field(
        default=26.0, metadata={"help": "score = raw PickScore / normaliser (Flow-GRPO's 26 maps it to about 0-1)"}
    )

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("PickScoreConfig.model_path is required (a local folder; nothing is downloaded)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {self.batch_size}, {self.max_length}")
        if self.normaliser <= 0:
            raise ValueError(f"normaliser must be > 0, got {self.normaliser}")


class PickScoreReward(Reward):
    """PickScore of each image against its prompt text (module doc). Loads at construction, from local folders."""

    name = "pickscore"
    config_type = PickScoreConfig

    def __init__(self, config: PickScoreConfig | None = None) -> None:
        super().__init__(config)
        from transformers import AutoModel, AutoProcessor, CLIPModel  # heavy: only for this adapter

        model_dir = require_local_dir(self.config.model_path, "PickScore model_path")
        processor_dir = require_local_dir(self.config.processor_path or self.config.model_path,
                                          "PickScore processor_path")
        model = AutoModel.from_pretrained(model_dir, local_files_only=True, use_safetensors=True)
        if not isinstance(model, CLIPModel):
            raise TypeError(f"PickScore needs a CLIPModel in {str(model_dir)!r}, found {type(model).__name__}")
        self.model = model.to(device=self.config.device, dtype=_DTYPES[self.config.dtype]).eval()
        self.processor: Any = AutoProcessor.from_pretrained(processor_dir, local_files_only=True)
        self._lock = threading.Lock()

    @torch.no_grad()
    def raw_scores(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> torch.Tensor:
        """``(H, W, 3)`` uint8 images and their texts -> raw PickScore ``(N,)`` float32 on CPU.

        raw_i = logit_scale.exp() * cos(image_i, text_i): the diagonal of CLIP's ``logits_per_image``.
        """
        inputs = self.processor(
            text=list(texts), images=[Image.fromarray(i) for i in images], padding=True, truncation=True,
            max_length=self.config.max_length, return_tensors="pt",
        )
        inputs = {k: v.to(self.config.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with self._lock:  # one forward at a time: rewards may be called from a thread pool
            logits = self.model(**inputs).logits_per_image
        return logits.diagonal().float().cpu()

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        size = self.config.batch_size
        raw = torch.cat([
            self.raw_scores(images[s:s + size], [p.text for p in prompts[s:s + size]])
            for s in range(0, len(prompts), size)
        ])
        return [SampleScore(score=float(r) / self.config.normaliser, details={"pickscore": round(float(r), 4)})
                for r in raw.tolist()]


REAL_REWARDS: dict[str, type[Reward]] = {
    "pickscore": PickScoreReward,
}
