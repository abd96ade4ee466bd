"""fit(), the Python API of resumable training: checkpoints, resume bit for bit, signals, no graph needed."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.policy import Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.training.fit import Interrupted, fit

PROMPTS = PromptSet(tuple(PromptSpec(t, task="compose") for t in ("a red circle", "two blue squares", "a cat")))


def _bright(images, prompts):
    return RewardResult(scores=images.float().mean(dim=(1, 2, 3)), details=[{} for _ in prompts])


def _trainer(epochs: int) -> GRPOTrainer:
    config = GRPOConfig(group_size=4, prompts_per_epoch=2, steps=4, batch_size=8, lora_rank=4, lora_alpha=8.0,
                        lr=1e-2, ema_every=1, epochs=epochs)
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    return GRPOTrainer(pipe, Policy(pipe.transformer), "student", {"bright": _bright}, config, PROMPTS)


def _lora(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.params.items()}


def test_fit_resumes_from_its_checkpoints_bit_for_bit(tmp_path):
    straight = _trainer(3)
    history = fit(straight, progress=None)
    assert [h["epoch"] for h in history] == [0, 1, 2]

    first = _trainer(2)  # a run that stopped after two epochs, checkpointing each
    fit(first, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, keep=1, progress=None)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_000002"]  # keep=1: the newest only
    resumed = _trainer(3)  # the same run asked for one more epoch: it resumes at epoch 2
    events = []
    again = fit(resumed, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1, on_epoch=events.append,
                progress=None)
    assert [h["epoch"] for h in again] == [0, 1, 2] and [e["epoch"] for e in events] == [2]
    def untimed(entries):
        plain = [json.loads(json.dumps(e, default=str)) for e in entries]
        return [{k: v for k, v in e.items() if "seconds" not in k} for e in plain]

    assert untimed(again[:2]) == untimed(history[:2])  # the first two restored from the checkpoint, as run
    want = _lora(straight)
    assert all(torch.equal(want[k], v) for k, v in _lora(resumed).items())


def test_a_signal_stops_after_the_epoch_with_a_checkpoint(tmp_path):
    trainer = _trainer(5)

    def on_epoch(entry):
        if entry["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster's scheduler would

    with pytest.raises(Interrupted) as stopped:
        fit(trainer, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0, on_epoch=on_epoch, progress=None)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.epochs == 2
    assert stopped.value.checkpoint == tmp_path / "ckpt" / "epoch_000002"
    resumed = _trainer(5)
    fit(resumed, checkpoint_dir=tmp_path / "ckpt", progress=None, checkpoint_every=0)
    assert resumed.epoch_index == 5


class StopPressed(Exception):
    """Stands in for an exception a host raises from the progress bar (ComfyUI's Stop)."""


def _untimed(entries):
    plain = [json.loads(json.dumps(e, default=str)) for e in entries]
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in plain]


def test_a_stop_inside_an_epoch_keeps_the_last_epoch_and_resumes_bit_for_bit(tmp_path):
    straight = _trainer(4)
    history = fit(straight, progress=None)
    per_epoch = straight.config.updates_per_epoch
    assert straight.optimizer_steps == 4 * per_epoch

    trainer = _trainer(4)

    def should_stop() -> bool:  # polled after each sampling batch and optimizer step
        return trainer.optimizer_steps == 2 * per_epoch + 1  # the first step of epoch 2 is done

    with pytest.raises(Interrupted) as stopped:  # checkpoint_every=3: epoch 2 would not be on disk otherwise
        fit(trainer, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, should_stop=should_stop, progress=None)
    assert trainer.optimizer_steps == 2 * per_epoch + 1 < 3 * per_epoch  # stopped inside epoch 2
    assert stopped.value.signum is None and stopped.value.epochs == 2
    assert stopped.value.checkpoint == tmp_path / "ckpt" / "epoch_000002"
    assert "stop requested after 2 epochs" in str(stopped.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_000002"]
    saved = json.loads((tmp_path / "ckpt" / "epoch_000002" / "history.json").read_text())
    assert _untimed(saved) == _untimed(history[:2])  # nothing of the unfinished epoch
    meta = json.loads((tmp_path / "ckpt" / "epoch_000002" / "trainer_state.json").read_text())
    assert meta["epoch"] == 2 and meta["optimizer_steps"] == 2 * per_epoch

    resumed = _trainer(4)
    again = fit(resumed, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, progress=None)
    assert _untimed(again) == _untimed(history)
    want = _lora(straight)
    assert all(torch.equal(want[k], v) for k, v in _lora(resumed).items())


class _Bar:
    def __init__(self, total, desc, log, stop_at=None):
        self.total, self.n, self.log, self.stop_at = total, 0, log, stop_at
        log.append(self)

    def update(self, n=1):
        self.n += n
        if self.stop_at is not None and self.n >= self.stop_at:
            raise StopPressed("Stop")

    def close(self):
        pass


def test_the_bar_counts_batches_and_steps_and_a_raise_from_it_stops_like_comfyui(tmp_path):
    trainer = _trainer(3)
    units = trainer.units_per_epoch()
    assert units == 1 + trainer.config.updates_per_epoch  # 2 prompts x 4 samples in one batch of 8, 2 steps
    bars = []
    with pytest.raises(StopPressed):  # the host's own exception goes through unchanged
        fit(trainer, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0, keep=1,
            progress=lambda total, desc: _Bar(total, desc, bars, stop_at=units + 2), label="t")
    assert bars[0].total == 3 * units and bars[0].n == units + 2  # stopped after the first step of epoch 1
    assert trainer.optimizer_steps == trainer.config.updates_per_epoch + 1
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch_000001"]  # epoch 0, its checkpoint

    resumed = _trainer(3)
    fit(resumed, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0,
        progress=lambda total, desc: _Bar(total, desc, bars))
    assert bars[-1].n == bars[-1].total == 3 * units  # started at epoch 1's units, then one per unit
    straight = _trainer(3)
    fit(straight, progress=None)
    want = _lora(straight)
    assert all(torch.equal(want[k], v) for k, v in _lora(resumed).items())


def test_a_stop_in_the_first_epoch_writes_no_checkpoint(tmp_path):
    trainer = _trainer(2)
    with pytest.raises(Interrupted) as stopped:
        fit(trainer, checkpoint_dir=tmp_path / "ckpt", should_stop=lambda: True, progress=None)
    assert stopped.value.epochs == 0 and stopped.value.checkpoint is None
    assert trainer.optimizer_steps == 0  # stopped after the first denoising step
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_a_second_signal_stops_inside_the_epoch_and_keeps_the_last_completed_one(tmp_path):
    trainer = _trainer(4)
    sent = []

    def should_stop() -> bool:  # here only to send signals at known points inside epoch 1
        if trainer.epoch_index == 1 and trainer.optimizer_steps in (3, 4) and trainer.optimizer_steps not in sent:
            sent.append(trainer.optimizer_steps)
            os.kill(os.getpid(), signal.SIGTERM)  # the first asks for the epoch's end, the second stops now
        return False

    with pytest.raises(Interrupted) as stopped:
        fit(trainer, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0, should_stop=should_stop, progress=None)
    assert sent == [3, 4] and trainer.optimizer_steps == 4  # epoch 1's steps taken, the epoch unfinished
    assert stopped.value.signum == signal.SIGTERM and stopped.value.epochs == 1
    assert stopped.value.checkpoint == tmp_path / "ckpt" / "epoch_000001"
    assert json.loads((tmp_path / "ckpt" / "epoch_000001" / "trainer_state.json").read_text())["optimizer_steps"] == 2
