"""Model handles: a small, serialisable reference to a local diffusers pipeline folder.

Graph nodes pass a :class:`ModelRef` (path, dtype, device) instead of a loaded model, so that cached results
stay small and a model is rebuilt from its files when needed. :meth:`ModelRef.load` shares one loaded
pipeline per process for read-only use (sampling, evaluation, frozen teachers); a node that modifies the
model (adds adapters, trains) asks for ``fresh=True`` and owns what it gets.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.models.pipeline import load_pipeline

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")


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
    """

    path: str
    dtype: str = "float32"
    device: str = "auto"
    adapter: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    @property
    def name(self) -> str:
        return self.label or Path(self.adapter or self.path).name

    def base(self) -> ModelRef:
        """The same base model without adapter."""
        return ModelRef(self.path, self.dtype, self.device)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        return cls(**data)

    def load(self, *, fresh: bool = False) -> StableDiffusion3Pipeline:
        """The loaded base pipeline (the adapter is not applied): shared (read-only use) unless ``fresh``."""
        if fresh:
            return load_pipeline(self.path, dtype=DTYPES[self.dtype], device=resolve_device(self.device))
        key = (str(Path(self.path).resolve()), self.dtype, resolve_device(self.device))
        with _LOCK:
            if key not in _SHARED:
                if len(_SHARED) >= _MAX_SHARED:
                    _SHARED.pop(next(iter(_SHARED)))
                _SHARED[key] = load_pipeline(self.path, dtype=DTYPES[self.dtype], device=key[2])
            return _SHARED[key]


_MAX_SHARED = 2
_SHARED: dict[tuple[str, str, str], StableDiffusion3Pipeline] = {}
_LOCK = threading.Lock()

