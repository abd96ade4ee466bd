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
