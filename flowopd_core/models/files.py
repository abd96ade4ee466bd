"""Reading model files without torch (validation of graphs imports no torch: docs/architecture.md rule 5)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

SD3_SINGLE_FILE_MARKER = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
"""A key every original-layout SD3 / SD3.5 single file holds (Stability's MMDiT, as ComfyUI loads it)."""
MAX_HEADER = 100 * 2**20


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's header (the header only is read). ``ValueError`` when the
    file is not a readable safetensors file."""
    return [k for k in _header(path) if k != "__metadata__"]


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a ``.safetensors`` file's header ({} when it has none)."""
    metadata = _header(path).get("__metadata__") or {}
    return dict(metadata) if isinstance(metadata, dict) else {}


def _header(path: str | Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise ValueError(f"{str(path)!r} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{str(path)!r} is not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file")
    return header


def is_sd3_single_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file holding an SD3-family MMDiT in the original layout."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return SD3_SINGLE_FILE_MARKER in safetensors_keys(path)
    except (OSError, ValueError):
        return False
