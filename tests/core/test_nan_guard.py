"""NaN/inf guard of the LoRA trainers: a step with a non-finite loss, gradient norm or no finite reward is skipped
(nothing changes), counted, and max_bad_steps consecutive ones stop training with FloatingPointError."""

from __future__ import annotations

import math

import pytest
import torch

from flowopd_core.grpo import trainer as grpo
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.policy import Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult

PROMPTS = PromptSet(
    tuple(PromptSpec(t, task="compose") for t in ("a red circle", "two blue squares", "a green triangle"))
)


class Reward:
    """Mean brightness, or ``bad`` (NaN / inf) for every image in the epochs listed in ``bad_epochs``."""

    def __init__(self, bad: float = math.nan, bad_epochs: tuple[int, ...] = ()) -> None:
        self.bad, self.bad_epochs, self.calls = bad, bad_epochs, 0
        self.trainer: GRPOTrainer | None = None

    def __call__(self, images, prompts):
        scores = images.float().mean((1, 2, 3))
        if self.trainer is not None and self.trainer.epoch_index in self.bad_epochs:
            scores = torch.full_like(scores, self.bad)
        return RewardResult(scores=scores, details=[{} for _ in prompts])


def _trainer(reward: Reward, **overrides) -> GRPOTrainer:
    config = dict(group_size=4, prompts_per_epoch=2, steps=3, batch_size=8, lora_rank=4, lora_alpha=8.0, lr=1e-2,
                  updates_per_epoch=2, reward_workers=0, epochs=6)
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    trainer = GRPOTrainer(
        pipe, Policy(pipe.transformer), "p", {"r": reward}, GRPOConfig(**{**config, **overrides}), PROMPTS
    )
    reward.trainer = trainer
    return trainer


def _snapshot(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    state = trainer.state_dict()
    return {k: v for k, v in state.tensors.items() if not k.startswith("rng/")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_epoch_without_a_finite_reward_changes_nothing_and_too_many_stop(bad):
    trainer = _trainer(Reward(bad, bad_epochs=(1, 2)), max_bad_steps=3)
    good = trainer.epoch()
    assert good.skipped_steps == 0 and good.optimizer_steps == 2
    before = _snapshot(trainer)
    skipped = trainer.epoch()  # epoch 1: every reward non-finite -> both steps skipped
    assert skipped.skipped_steps == 2 and skipped.optimizer_steps == 2 and skipped.trained_samples == 0
    assert _same(before, _snapshot(trainer))  # LoRA, EMA, AdamW moments and step counts untouched
    assert trainer.state_dict().meta["bad_streak"] == 2
    with pytest.raises(
        FloatingPointError, match=r"3 consecutive optimizer steps skipped .* at epoch 2 .*no finite reward"
    ):
        trainer.epoch()  # epoch 2: the third consecutive bad step
    assert _same(before, _snapshot(trainer))


def test_a_non_finite_loss_skips_only_its_step_and_a_good_step_resets_the_count(monkeypatch):
    trainer = _trainer(Reward(), max_bad_steps=2)
    real = GRPOTrainer._step_terms
    calls = {"n": 0}

    def poisoned(self, batch, rows, steps, with_kl):
        calls["n"] += 1
        terms = real(self, batch, rows, steps, with_kl)
        if calls["n"] == 1:  # the first term of the first update of the epoch
            terms.total = terms.total * math.nan
        return terms

    monkeypatch.setattr(GRPOTrainer, "_step_terms", poisoned)
    before = _snapshot(trainer)
    metrics = trainer.epoch()
    assert metrics.skipped_steps == 1 and metrics.optimizer_steps == 1 and math.isfinite(metrics.grad_norm)
    after = _snapshot(trainer)
    assert not _same(before, after) and all(torch.isfinite(v).all() for v in after.values())
    assert trainer.state_dict().meta["bad_streak"] == 0  # the good second step reset the streak
    calls["n"] = 0
    assert trainer.epoch().skipped_steps == 1  # one bad step again: below max_bad_steps = 2, training goes on


def test_a_non_finite_gradient_norm_skips_the_step():
    trainer = _trainer(Reward(), max_bad_steps=1)
    before = _snapshot(trainer)
    for p in trainer.params.values():
        p.grad = torch.full_like(p, math.inf)
    with pytest.raises(FloatingPointError, match="gradient norm inf"):
        trainer._optimizer_step()
    assert _same(before, _snapshot(trainer)) and all(p.grad is None for p in trainer.params.values())
    assert trainer.optimizer.state_dict()["state"] == {}


def test_max_bad_steps_is_validated_and_free_to_change_on_resume():
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        GRPOConfig(max_bad_steps=0)
    assert "max_bad_steps" in grpo.GRPOTrainer.FREE_CONFIG_KEYS
    a = _trainer(Reward(), max_bad_steps=3)
    a.epoch()
    b = _trainer(Reward(), max_bad_steps=5)
    b.load_state_dict(a.state_dict())
    assert b.epoch_index == 1
