"""Which base an adapter was trained on: a stamp file beside the adapter, checked before it is loaded.

A LoRA adapter is a correction to one set of base weights. peft checks only that the shapes fit, so an adapter
trained on another base of the same architecture (a mini-world variant, an SD3.5 fine-tune) would load silently
and do something else. Every adapter flowopd saves gets a stamp, :data:`BASE_STAMP` (JSON): the base's path as
given and the sha256 of its transformer weights (the only part the adapter is fitted to). A loader refuses an
adapter whose stamp names other weights; an adapter without a stamp (from another tool) is checked by shape only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

BASE_STAMP = "flowopd_base.json"
STAMP_FORMAT = "flowopd-adapter-base/1"

_DIGESTS: dict[tuple, str | None] = {}  # (path, (file, size, mtime_ns)...) -> digest: hashed once per process
_LOCK = threading.Lock()


def _weight_files(base: Path) -> list[Path]:
    """The files whose bytes are the base's transformer: a pipeline folder's ``transformer/*.safetensors``, or a
    single-file checkpoint itself."""
    if base.is_file():
        return [base]
    return sorted((base / "transformer").glob("*.safetensors"))


def transformer_digest(base: str | Path) -> str | None:
    """sha256 of a base's transformer weights (a folder's ``transformer/*.safetensors`` in name order, one
    file's digest being its ``sha256sum``; a single-file checkpoint's whole file), or None when there are none.

    Hashed in 16 MB chunks (an SD3.5-sized transformer is gigabytes) and once per process for unchanged files
    (keyed by size and modification time)."""
    files = _weight_files(Path(base))
    if not files:
        return None
    key = (str(Path(base).resolve()), *((str(f), s.st_size, s.st_mtime_ns) for f in files for s in [f.stat()]))
    with _LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
        digest = hashlib.sha256()
        for file in files:
            with file.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 24), b""):
                    digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
        return _DIGESTS[key]


def stamp_adapter(adapter: str | Path, base: str | Path, shown: str = "") -> Path:
    """Write :data:`BASE_STAMP` into the adapter folder ``adapter``: it was trained on ``base`` (a pipeline folder
    or single-file checkpoint), recorded as ``shown`` (default: ``base`` as given; only the digest is checked).
    Returns the stamp's path."""
    stamp = Path(adapter) / BASE_STAMP
    data = {"format": STAMP_FORMAT, "base": shown or str(base), "transformer_sha256": transformer_digest(base)}
    stamp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return stamp


def read_stamp(adapter: str | Path) -> dict | None:
    """The adapter folder's stamp, or None when it has none. ValueError for a stamp that is not one."""
    stamp = Path(adapter) / BASE_STAMP
    if not stamp.is_file():
        return None
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{stamp} is not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != STAMP_FORMAT or not (
            data.get("transformer_sha256") is None or isinstance(data.get("transformer_sha256"), str)):
        raise ValueError(f"{stamp} is not a flowopd base stamp (format {STAMP_FORMAT!r})")
    return data


def base_mismatch(adapter: str | Path, base: str | Path) -> str | None:
    """Why the adapter folder ``adapter`` must not be loaded on ``base``, or None.

    Refused: a stamp that is not one, and a stamp whose transformer sha256 differs from ``base``'s. Accepted: no
    stamp (nothing to check beyond peft's shapes), and the same weights anywhere (a moved checkout, a copied
    folder)."""
    try:
        stamp = read_stamp(adapter)
    except ValueError as exc:
        return str(exc)
    if stamp is None:
        return None
    want, have = stamp.get("transformer_sha256"), transformer_digest(base)
    if want == have:
        return None
    return (f"the adapter {str(adapter)!r} was trained on the base {stamp.get('base')!r} (transformer sha256 "
            f"{str(want)[:12]}), not on {str(base)!r} ({str(have)[:12]}); link the base it was trained on")
