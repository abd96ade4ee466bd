"""An adapter's base stamp: the sha256 of the base's transformer weights, written beside the adapter and checked
against the base it is loaded on (same weights anywhere: accepted; other weights: refused; no stamp: accepted)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from flowopd_core.models.base_stamp import BASE_STAMP, base_mismatch, read_stamp, stamp_adapter, transformer_digest


def _base(folder: Path, weights: bytes) -> Path:
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


def test_the_digest_is_the_weights_sha256_for_a_folder_and_a_single_file(tmp_path):
    base = _base(tmp_path / "base", b"weights")
    assert transformer_digest(base) == hashlib.sha256(b"weights").hexdigest()  # one file: its sha256sum
    single = tmp_path / "sd35.safetensors"
    single.write_bytes(b"checkpoint")
    assert transformer_digest(single) == hashlib.sha256(b"checkpoint").hexdigest()
    assert transformer_digest(tmp_path / "nothing") is None


def test_a_changed_file_is_hashed_again(tmp_path):
    base = _base(tmp_path / "base", b"weights")
    assert transformer_digest(base) == hashlib.sha256(b"weights").hexdigest()
    weights = base / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weightz")  # same size: the modification time tells it apart
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert transformer_digest(base) == hashlib.sha256(b"weightz").hexdigest()


def test_a_stamped_adapter_fits_its_weights_anywhere_and_no_other(tmp_path):
    base = _base(tmp_path / "base", b"weights")
    moved = tmp_path / "moved"
    shutil.copytree(base, moved)
    other = _base(tmp_path / "other", b"other weights")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert base_mismatch(adapter, other) is None  # no stamp: peft's shape check only
    stamp = stamp_adapter(adapter, base)
    assert stamp == adapter / BASE_STAMP
    assert read_stamp(adapter)["transformer_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert base_mismatch(adapter, base) is None
    assert base_mismatch(adapter, moved) is None  # the same weights in another folder
    problem = base_mismatch(adapter, other)
    assert problem is not None and str(base) in problem and str(other) in problem
    assert hashlib.sha256(b"other weights").hexdigest()[:12] in problem


def test_a_stamp_that_is_not_one_is_refused(tmp_path):
    base = _base(tmp_path / "base", b"weights")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / BASE_STAMP).write_text("{not json")
    assert "not readable JSON" in base_mismatch(adapter, base)
    (adapter / BASE_STAMP).write_text(json.dumps({"transformer_sha256": "x"}))
    assert "not a flowopd base stamp" in base_mismatch(adapter, base)


def test_the_recorded_name_is_only_shown(tmp_path):
    base = _base(tmp_path / "base", b"weights")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    stamp_adapter(adapter, base, "models/base")
    assert read_stamp(adapter)["base"] == "models/base"
    assert base_mismatch(adapter, base) is None
