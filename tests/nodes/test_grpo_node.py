"""A failed or killed GRPO node resumes from its last checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import runner
from flowopd_core.grpo import trainer as grpo
from flowopd_core.models.base_stamp import transformer_digest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--set", "teacher.epochs=3", "--set", "teacher.group_size=2", "--set", "teacher.prompts_per_epoch=2",
    "--set", "teacher.steps=3", "--set", "teacher.checkpoint_every=1", "--set", "teacher.lora_rank=4",
    "--set", "teacher.lr=0.01", "--set", "test.per_task=2", "--set", "eval.steps=2",
]


def run(run_dir: Path) -> int:
    return runner.main(
        ["run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(run_dir), "--no-progress", *TINY]
    )


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "nodes" / "teacher" / "adapter" / "adapter_model.safetensors"))


def test_resume_after_failure_is_bit_identical(tmp_path, monkeypatch):
    assert run(tmp_path / "straight") == 0

    calls = {"n": 0}
    real_epoch = grpo.GRPOTrainer.epoch

    def failing_epoch(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in epoch 3")
        return real_epoch(self)

    monkeypatch.setattr(grpo.GRPOTrainer, "epoch", failing_epoch)
    resumed = tmp_path / "resumed"
    assert run(resumed) == 1
    checkpoints = sorted((resumed / "checkpoints" / "teacher").glob("*/epoch_*"))
    assert [c.name for c in checkpoints] == ["epoch_000001", "epoch_000002"]  # the newest 2 (keep_checkpoints)
    assert json.loads((checkpoints[-1] / "history.json").read_text())[-1]["epoch"] == 1  # epochs 0, 1 done
    monkeypatch.setattr(grpo.GRPOTrainer, "epoch", real_epoch)

    assert run(resumed) == 0
    assert "resumed grpo-compose at epoch 2" in (resumed / "run.log").read_text()
    assert not any((resumed / "checkpoints" / "teacher").iterdir())  # removed once the node succeeded
    history = json.loads((resumed / "nodes" / "teacher" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    stamp = json.loads((resumed / "nodes" / "teacher" / "adapter" / "flowopd_base.json").read_text())
    assert stamp["transformer_sha256"] == transformer_digest(ROOT / "models" / "miniworld")  # the base it trained on
    a, b = adapter(tmp_path / "straight"), adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    # TensorBoard has every epoch once, the restored ones included
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(resumed / "nodes" / "teacher" / "tensorboard"))
    board.Reload()
    assert "grpo/reward" in board.Tags()["scalars"] and "grpo/reward_mean/compose" in board.Tags()["scalars"]
    assert sorted({e.step for e in board.Scalars("grpo/reward")}) == [0, 1, 2]
    logged = {e.step: e.value for e in board.Scalars("grpo/reward")}
    assert logged == pytest.approx({i: h["reward"] for i, h in enumerate(history)})


def test_non_finite_losses_stop_the_node_naming_it_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = grpo.GRPOTrainer._step_terms

    def nan_from_epoch_2(self, batch, rows, steps, with_kl):
        terms = real(self, batch, rows, steps, with_kl)
        if self.epoch_index >= 2:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(grpo.GRPOTrainer, "_step_terms", nan_from_epoch_2)
    run_dir = tmp_path / "nan"
    assert runner.main(["run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(run_dir), "--no-progress",
                        *TINY, "--set", "teacher.max_bad_steps=2", "--set", "teacher.group_size=4",
                        "--set", "teacher.prompts_per_epoch=4", "--set", "teacher.updates_per_epoch=2"]) == 1
    # groups of 4: some group is never flat; 2 updates in epoch 2 = the 2 consecutive bad steps
    text = (run_dir / "run.log").read_text()
    assert (
        "node teacher (grpo grpo-compose): 2 consecutive optimizer steps skipped for non-finite values at epoch 2"
        in text
    )
    assert "GRPO loss nan" in text and "epoch_000002, is intact" in text
    (key,) = (run_dir / "checkpoints" / "teacher").iterdir()
    from flowopd_core.training.checkpoint import CheckpointStore

    found, skipped = CheckpointStore(key).latest()
    assert found.epoch == 2 and skipped == []
    assert [h["skipped_steps"] for h in json.loads(found.files["history.json"])] == [0, 0]


def test_window_range_reaches_the_trainer(tmp_path):
    """Flow-GRPO-Fast's window range is a graph param: with 'lo, hi' = '1, 2' every epoch's SDE window is step 1
    (the default range [0, T // 2) would put it at step 0)."""
    assert runner.main(["run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(tmp_path / "run"),
                        "--no-progress", *TINY, "--set", "teacher.sde_window=1",
                        "--set", "teacher.window_range=1, 2"]) == 0
    history = json.loads((tmp_path / "run" / "nodes" / "teacher" / "metrics.json").read_text())
    assert [entry["sde_steps"] for entry in history] == [[1]] * 3
    for entry in history:  # one reward (compose, weight 1): the logged curves are that reward's mean and best
        assert entry["reward"] == entry["reward_mean"]["compose"]
        assert entry["reward_best_of_group"] == entry["reward_best"]["compose"] >= entry["reward"]


def test_window_range_is_parsed_strictly():
    assert grpo.parse_window_range("2, 6") == (2, 6) and grpo.parse_window_range(" 0 0 ") == (0, 0)
    for bad in ("2", "a, b", "1, 2, 3", "1.5, 3"):
        with pytest.raises(ValueError, match="window_range"):
            grpo.parse_window_range(bad)
