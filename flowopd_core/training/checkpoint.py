"""Crash-safe checkpoint folders: written atomically, verified on reading, rotated.

A checkpoint is a folder of files plus ``manifest.json``: the format version, the epoch, and the size and
sha256 of every other file. Writing (:func:`write_checkpoint`): a temporary sibling folder, every file written
and fsynced, the manifest written LAST and fsynced, the folder fsynced, renamed into place, the parent fsynced.
A process killed at any point leaves either the previous state or a complete checkpoint (plus, at worst, a
temporary folder that the next write removes).

Reading (:func:`read_checkpoint`) checks the manifest against the files; a folder without a readable manifest,
with a missing, extra-short or altered file is not a checkpoint (:class:`CheckpointError` says why).
:class:`CheckpointStore` keeps numbered checkpoints ``epoch_000012/`` under one root, rotates old ones away
and finds the newest one that verifies, skipping (and reporting) broken ones.

Only bytes are stored: callers serialise with safetensors / JSON (never Python object serialisation).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "flowopd-checkpoint/1"
PREFIX = "epoch_"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_TMP = ".tmp-"


class CheckpointError(Exception):
    """A folder is not a valid checkpoint (the message says why)."""


@dataclass
class Checkpoint:
    """A verified checkpoint: its folder, epoch, file contents by name and the manifest's ``meta``."""

    path: Path
    epoch: int
    files: dict[str, bytes]
    meta: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(directory: str | Path, files: Mapping[str, bytes], *, epoch: int,
                     meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``files`` (name -> content; plain names, no folders) as the checkpoint ``directory`` atomically,
    replacing one that is there. ``meta``: small JSON-able extras kept in the manifest. Returns ``directory``."""
    directory = Path(directory)
    bad = sorted(name for name in files if name == MANIFEST or not name or "/" in name or name.startswith("."))
    if bad:
        raise ValueError(f"checkpoint file names must be plain and not {MANIFEST!r}: {bad}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{_TMP}{directory.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    entries = {}
    for name, data in files.items():
        _write(tmp / name, data)
        entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "epoch": int(epoch), "files": entries, "meta": dict(meta or {})}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())  # last: marks it complete
    _fsync_dir(tmp)
    if directory.exists():  # e.g. a broken checkpoint of the same epoch that a resumed run writes again
        old = directory.with_name(f"{_TMP}old-{directory.name}-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    _fsync_dir(directory.parent)
    return directory


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and verify the checkpoint ``directory``; raises :class:`CheckpointError` naming what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (an incomplete write)")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{directory}: manifest format {manifest.get('format')!r}, want {FORMAT!r}")
        entries = dict(manifest["files"])
        epoch = int(manifest["epoch"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({exc})") from None
    files = {}
    for name, entry in sorted(entries.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        data = path.read_bytes()
        if len(data) != entry.get("size"):
            raise CheckpointError(f"{directory}: {name} has {len(data)} bytes, the manifest says {entry.get('size')}")
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise CheckpointError(f"{directory}: {name} does not match its sha256 in the manifest")
        files[name] = data
    return Checkpoint(path=directory, epoch=epoch, files=files, meta=dict(manifest.get("meta") or {}))


class CheckpointStore:
    """Numbered checkpoints ``root/epoch_NNNNNN/`` (NNNNNN: epochs done), the newest ``keep`` kept.

    One writer per root (the runner's run lock, or rank 0 of a multi-process run)."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def path(self, epoch: int) -> Path:
        return self.root / f"{PREFIX}{epoch:06d}"

    def entries(self) -> list[Path]:
        """Checkpoint folders (verified or not), oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, epoch: int, files: Mapping[str, bytes], meta: Mapping[str, Any] | None = None) -> Path:
        """Write checkpoint ``epoch``, then remove all but the newest ``keep`` and any leftover temporary folder."""
        path = write_checkpoint(self.path(epoch), files, epoch=epoch, meta=meta)
        for old in self.entries()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(f"{_TMP}*"):
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def latest(self) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
        """The newest checkpoint that verifies (None if there is none) and the newer ones skipped, with why."""
        skipped: list[tuple[Path, str]] = []
        for path in reversed(self.entries()):
            try:
                return read_checkpoint(path), skipped
            except CheckpointError as exc:
                skipped.append((path, str(exc)))
        return None, skipped
