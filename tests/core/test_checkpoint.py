"""Checkpoint folders: atomic writes with a manifest, verification, rotation, and falling back past broken ones."""

from __future__ import annotations

import json

import pytest
import torch

from flowopd_core.training.base import (
    TrainerState,
    load_trainer_state,
    save_trainer_state,
)
from flowopd_core.training.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    read_checkpoint,
    write_checkpoint,
)


def _files(epoch: int) -> dict[str, bytes]:
    return {"a.bin": bytes([epoch]) * 100, "history.json": json.dumps(list(range(epoch))).encode()}


def test_write_then_read_round_trips_and_the_manifest_covers_every_file(tmp_path):
    path = write_checkpoint(tmp_path / "c", _files(3), epoch=3, meta={"rank": 0})
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["epoch"] == 3 and sorted(manifest["files"]) == ["a.bin", "history.json"]
    assert manifest["files"]["a.bin"]["size"] == 100
    got = read_checkpoint(path)
    assert got.files == _files(3) and got.epoch == 3 and got.meta == {"rank": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left
    with pytest.raises(ValueError, match="plain"):
        write_checkpoint(tmp_path / "d", {"sub/x": b""}, epoch=0)


@pytest.mark.parametrize("damage", ["no_manifest", "truncated", "flipped", "missing", "bad_manifest"])
def test_a_broken_checkpoint_is_refused_with_the_reason(tmp_path, damage):
    path = write_checkpoint(tmp_path / "c", _files(2), epoch=2)
    if damage == "no_manifest":
        (path / MANIFEST).unlink()
        reason = "no manifest.json"
    elif damage == "truncated":
        (path / "a.bin").write_bytes(b"\x02" * 50)
        reason = "a.bin has 50 bytes"
    elif damage == "flipped":
        (path / "a.bin").write_bytes(b"\x02" * 99 + b"\x03")
        reason = "a.bin does not match its sha256"
    elif damage == "missing":
        (path / "history.json").unlink()
        reason = "history.json is missing"
    else:
        (path / MANIFEST).write_text("{not json")
        reason = "unreadable manifest.json"
    with pytest.raises(CheckpointError, match=reason):
        read_checkpoint(path)


def test_store_rotates_and_falls_back_past_broken_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path / "ck", keep=2)
    assert store.latest() == (None, [])
    for epoch in (1, 2, 3):
        store.save(epoch, _files(epoch))
    assert [p.name for p in store.entries()] == ["epoch_000002", "epoch_000003"]
    found, skipped = store.latest()
    assert found.epoch == 3 and skipped == []

    # A crash while writing epoch 4: its temporary folder holds everything but the manifest. Not a checkpoint.
    partial = store.root / ".tmp-epoch_000004-123"
    partial.mkdir()
    (partial / "a.bin").write_bytes(b"\x04" * 100)
    # And the newest finished one got damaged on disk.
    (store.path(3) / "a.bin").write_bytes(b"\x00" * 100)
    found, skipped = store.latest()
    assert found.epoch == 2 and found.files == _files(2)
    assert [(p.name, "sha256" in why) for p, why in skipped] == [("epoch_000003", True)]

    # The resumed run rewrites epoch 3 over the broken one; temporary leftovers go.
    store.save(3, _files(3))
    assert store.latest()[0].files == _files(3)
    assert not list(store.root.glob(".tmp-*"))
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)


def test_trainer_state_files_round_trip_bit_for_bit(tmp_path):
    state = TrainerState(
        tensors={"lora/w": torch.randn(3, 4), "rng/generator": torch.Generator().manual_seed(1).get_state()},
        meta={"format": "x", "epoch": 5, "config": {"lr": 0.1}},
    )
    path = save_trainer_state(state, tmp_path / "s")
    back = load_trainer_state(path)
    assert back.meta == state.meta and all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items())
    (path / "trainer_state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_trainer_state(path)
