"""Model handles: a small, serialisable reference to a local diffusers pipeline folder.

Graph nodes pass a :class:`ModelRef` (path, dtype, device) instead of a loaded model, so that cached results
stay small and a model is rebuilt from its files when needed. :meth:`ModelRef.load` shares one loaded
pipeline per process for read-only use (sampling, evaluation, frozen teachers); a node that modifies the
model (adds adapters, trains) asks for ``fresh=True`` and owns what it gets.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.choices import DEVICES, DTYPE_NAMES, MAX_T5_LENGTH
from flowopd_core.models.pipeline import load_pipeline

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return device


@dataclass(frozen=True)
class ModelRef:
    """A pipeline folder plus how to load it, optionally with one LoRA adapter on top.

    ``path``: the base pipeline folder (absolute once resolved by the caller). ``adapter``: a peft adapter
    folder (``adapter_model.safetensors`` + ``adapter_config.json``) applied on the base, "" for none.
    ``label``: the name shown in reports (default: the adapter's or the folder's name).
    ``max_sequence_length``: T5 tokens of every prompt encoding (0 = 128, or the tokenizer's shorter limit;
    see :func:`~flowopd_core.models.pipeline.set_text_length`).
    ``config``: when ``path`` is a single-file SD3 / SD3.5 checkpoint, the local diffusers folder of the same
    architecture it loads against (:func:`~flowopd_core.models.pipeline.load_single_file_pipeline`); "" for a
    pipeline folder.
    """

    path: str
    dtype: str = "float32"
    device: str = "auto"
    adapter: str = ""
    label: str = ""
    max_sequence_length: int = 0
    config: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not 0 <= self.max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be in [0, {MAX_T5_LENGTH}] (0 = default), "
                             f"got {self.max_sequence_length}")

    @property
    def name(self) -> str:
        return self.label or Path(self.adapter or self.path).name

    def base(self) -> ModelRef:
        """The same base model without adapter."""
        return replace(self, adapter="", label="")

    def with_adapter(self, adapter: str, label: str) -> ModelRef:
        """The same base model (folder, dtype, device, text length) with ``adapter`` on top."""
        return replace(self, adapter=adapter, label=label)

    @property
    def base_key(self) -> tuple[str, str, str, int, str]:
        """What makes two references share one loaded base: (folder, dtype, device, text length, config)."""
        return (str(self.path), self.dtype, self.device, self.max_sequence_length, str(self.config))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        return cls(**data)

    def load(self, *, fresh: bool = False) -> StableDiffusion3Pipeline:
        """The loaded base pipeline (the adapter is not applied): shared (read-only use) unless ``fresh``."""
        options = dict(dtype=DTYPES[self.dtype], device=resolve_device(self.device),
                       max_sequence_length=self.max_sequence_length, config=self.config)
        if fresh:
            return load_pipeline(self.path, **options)
        key = (str(Path(self.path).resolve()), self.dtype, options["device"], self.max_sequence_length,
               str(Path(self.config).resolve()) if self.config else "")
        with _LOCK:
            if key not in _SHARED:
                if len(_SHARED) >= _MAX_SHARED:
                    _SHARED.pop(next(iter(_SHARED)))
                _SHARED[key] = load_pipeline(self.path, **options)
            return _SHARED[key]


_MAX_SHARED = 2
_SHARED: dict[tuple[str, str, str, int, str], StableDiffusion3Pipeline] = {}
_LOCK = threading.Lock()

