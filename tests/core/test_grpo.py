"""Flow-GRPO (docs/method.md §2): pure functions in closed form, and the trainer on the tiny 16x16 pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowopd_core.grpo.loss import (
    combine_rewards,
    group_advantages,
    group_best,
    kl_to_reference,
    multi_reward_advantages,
    ppo_clip_loss,
)
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.pipeline import velocity
from flowopd_core.models.policy import Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.sampling.generate import SampleConfig, generate
from flowopd_core.sampling.samplers import gaussian_kl, noisy_steps, sde_noise_std, transition_logprob
from flowopd_core.training.base import load_trainer_state, save_trainer_state
from flowopd_core.training.draws import balanced_draw, template_strata

TEXTS = ("a red circle", "two blue squares", "a green triangle")
PROMPTS = PromptSet(tuple(PromptSpec(text, task="compose") for text in TEXTS))


class Brightness:
    """Mean pixel value (``sign`` = -1: darkness shifted to stay positive)."""

    def __init__(self, sign: float = 1.0) -> None:
        self.sign = sign

    def __call__(self, images, prompts):
        scores = images.float().mean((1, 2, 3))
        scores = scores if self.sign > 0 else 1.0 - scores
        return RewardResult(scores=scores, details=[{} for _ in prompts])


def _config(**overrides) -> GRPOConfig:
    base = dict(group_size=4, prompts_per_epoch=2, steps=4, batch_size=8, lora_rank=4, lora_alpha=8.0, lr=1e-2)
    return GRPOConfig(**{**base, **overrides})


def _trainer(config: GRPOConfig, reward=None, prompts: PromptSet = PROMPTS) -> GRPOTrainer:
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    return GRPOTrainer(pipe, Policy(pipe.transformer), "student", {"bright": reward or Brightness()}, config, prompts)


# ------------------------------------------------------------------------------------------ pure functions


def test_balanced_draw_spreads_each_epoch_over_the_categories():
    strata = {"single": list(range(0, 5)), "count": list(range(5, 10)), "position": list(range(10, 100))}
    generator = torch.Generator().manual_seed(0)
    totals = {name: 0 for name in strata}
    for epoch in range(6):
        picked = balanced_draw(strata, 8, epoch, generator)
        assert len(picked) == len(set(picked)) == 8  # without replacement
        per = {name: sum(i in rows for i in picked) for name, rows in strata.items()}
        assert sorted(per.values()) == [2, 3, 3]  # 8 // 3 each, the 2 left over to two categories
        for name in strata:
            totals[name] += per[name]
    assert set(totals.values()) == {16}  # the left-overs rotate: equal draws over every 3 epochs
    prompts = PromptSet(tuple(PromptSpec(t, spec={"template": k}) for t, k in (("a", "x"), ("b", "y"), ("c", "x"))))
    assert template_strata(prompts) == {"x": [0, 2], "y": [1]}
    assert template_strata(PROMPTS) == {"": [0, 1, 2]}  # no categories: one stratum (a uniform draw)



def test_group_advantages_closed_form():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    std = math.sqrt(1.25)  # population std of 1..4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]) / (std + 1e-4)
    adv = group_advantages(r, g)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # zero-std group -> exactly 0

    global_std = r.double().std(correction=0).item()
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0, 0, 0, 0]) / (global_std + 1e-4)
    assert torch.allclose(group_advantages(r, g, global_std=True), expected, atol=1e-6)

    clamped = group_advantages(r, g, clip=1.0)
    assert torch.allclose(clamped[:4], torch.tensor([-1.0, -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 1.0]))

    # NaN: left out of the stats, advantage 0; a group with < 2 scored samples, or none, is flat
    r = torch.tensor([1.0, math.nan, 3.0, 3.0, math.nan, 7.0, math.nan, math.nan])
    mean, std = 7 / 3, torch.tensor([1.0, 3.0, 3.0]).std(correction=0).item()
    adv = group_advantages(r, torch.tensor([0, 0, 0, 0, 1, 1, 2, 2]))
    expected = torch.tensor([1 - mean, 0, 3 - mean, 3 - mean, 0, 0, 0, 0]) / (std + 1e-4)
    assert torch.allclose(adv, expected.float(), atol=1e-6) and torch.isfinite(adv).all()
    # ids need not be contiguous or sorted
    assert torch.equal(group_advantages(torch.tensor([2.0, 1.0, 1.0, 2.0]), torch.tensor([7, 3, 7, 3])),
                       group_advantages(torch.tensor([2.0, 1.0, 1.0, 2.0]), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), torch.zeros(3, dtype=torch.long))


def test_group_best_closed_form():
    scores = torch.tensor([0.1, 0.5, float("nan"), 0.2, float("nan"), float("nan"), 0.9, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert group_best(scores, groups) == pytest.approx((0.5 + 0.2 + 0.9) / 3)  # group 2 has no score
    assert math.isnan(group_best(torch.full((4,), float("nan")), torch.tensor([0, 0, 1, 1])))
    assert group_best(torch.tensor([-3.0, -1.0]), torch.tensor([0, 0])) == -1.0


def test_ppo_clip_loss_closed_form():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.00005])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0])
    out = ppo_clip_loss(new, old, adv, clip_range=0.2)
    # max(-A rho, -A clip(rho)): 1 -> -1; 1.5 (A>0) -> -1.2; 0.5 (A>0) -> -0.5; 1.00005 (A<0) -> 2.0001
    assert out.loss.item() == pytest.approx((-1 - 1.2 - 0.5 + 2.0001) / 4, abs=1e-5)
    assert out.clip_fraction.item() == 0.5
    assert out.approx_kl.item() == pytest.approx(0.5 * (new.detach() ** 2).mean().item())
    out.loss.backward()
    assert new.grad[1] == 0 and new.grad[0] != 0  # the clipped sample has no gradient


def test_kl_forms_equal_their_definitions():
    g = torch.Generator().manual_seed(0)
    mu_p, mu_q = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 3, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    t, t_next = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.75, 0.4, 0.1], dtype=torch.float64)
    s = sde_noise_std(t, t_next, 0.7).reshape(-1, 1, 1, 1)
    dt, d = t_next - t, 3 * 8 * 8
    true = kl_to_reference(mu_p, mu_q, s, dt, form="true")
    assert torch.allclose(true, gaussian_kl(mu_p, mu_q, s, reduce="sum"))
    flow = kl_to_reference(mu_p, mu_q, s, dt, form="flow_grpo")
    assert torch.allclose(flow, true * dt.abs() / d)
    # Flow-GRPO's literal code: ((mu - mu_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2), std_dev_t = sigma_t
    sigma_t = 0.7 * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))  # docs/method.md §1 (t_next at t = 1)
    assert torch.allclose(flow, (mu_p - mu_q).square().mean((1, 2, 3)) / (2 * sigma_t**2))
    assert torch.allclose(kl_to_reference(mu_p, mu_q, s, dt, form="mean"), true / d)
    assert torch.allclose(kl_to_reference(mu_p, mu_q, s, dt, kind="cps"), true / d)
    assert torch.equal(kl_to_reference(mu_p, mu_p, s, dt), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        kl_to_reference(mu_p, mu_q, s, dt, form="other")


def test_multi_reward_sum_and_normalised():
    a = torch.tensor([1.0, 0.0, 1.0, 0.0])
    b = torch.tensor([0.0, 10.0, 0.0, 20.0])  # a larger scale
    g = torch.zeros(4, dtype=torch.long)
    weights = {"a": 1.0, "b": 0.5}
    assert torch.equal(combine_rewards({"a": a, "b": b}, weights, "sum"), torch.tensor([1.0, 5.0, 1.0, 10.0]))
    a_adv = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (0.5 + 1e-4)
    b_adv = torch.tensor([-7.5, 2.5, -7.5, 12.5]) / (math.sqrt(68.75) + 1e-4)
    normalised = combine_rewards({"a": a, "b": b}, weights, "normalised", g)
    assert torch.allclose(normalised, a_adv + 0.5 * b_adv, atol=1e-6)
    # sum mode: b's scale dominates the ranking; normalised: a's sign survives on samples 0 and 2 vs 1
    assert torch.allclose(multi_reward_advantages({"a": a, "b": b}, g, weights, "sum"),
                          group_advantages(torch.tensor([1.0, 5.0, 1.0, 10.0]), g))
    assert torch.allclose(multi_reward_advantages({"a": a, "b": b}, g, weights, "normalised", clip=1.0),
                          (a_adv + 0.5 * b_adv).clamp(-1, 1), atol=1e-6)
    # one reward of weight 1: both modes are Flow-GRPO's advantages
    for mode in ("sum", "normalised"):
        assert torch.allclose(multi_reward_advantages({"b": b}, g, mode=mode), group_advantages(b, g), atol=1e-6)
    # NaN: a reward that cannot score a sample adds nothing; no score at all -> NaN (advantage 0)
    b_nan = torch.tensor([math.nan, 10.0, math.nan, 20.0])
    a_nan = torch.tensor([1.0, 0.0, math.nan, 0.0])
    combined = combine_rewards({"a": a_nan, "b": b_nan}, weights)
    assert combined[0] == 1.0 and combined[1] == 5.0 and math.isnan(combined[2]) and combined[3] == 10.0
    assert multi_reward_advantages({"a": a_nan, "b": b_nan}, g, weights)[2] == 0
    with pytest.raises(KeyError):
        combine_rewards({"a": a}, {"c": 1.0})
    with pytest.raises(ValueError):
        combine_rewards({"a": a}, mode="normalised")  # needs group ids


def test_config_checks():
    assert GRPOConfig().trainable_steps == 9 and GRPOConfig().window_bounds == (0, 5)
    for bad in (dict(group_size=1), dict(kind="ode"), dict(kl_form="x"), dict(reward_mode="x"), dict(lr=0),
                dict(sde_window=6), dict(sde_window=2, window_range=(9, 10)), dict(train_fraction=0.05)):
        with pytest.raises(ValueError):
            GRPOConfig(**bad)
    # asked-for steps or weights the run could not honour are refused, not clamped or trained as zero
    GRPOConfig(steps=10, step_subset=9), GRPOConfig(reward_weights={"random": 1.0, "compose": 0.0})
    for bad, match in ((dict(steps=10, step_subset=10), "more than the 9 trainable"),
                       (dict(sde_window=2, step_subset=3), "more than the sde_window"),
                       (dict(reward_weights={"compose": math.nan}), "finite")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(**bad)


# ------------------------------------------------------------------------------------------ trainer


def test_rewards_that_all_weigh_zero_are_refused():
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    with pytest.raises(ValueError, match="every reward weighs 0"):
        GRPOTrainer(pipe, Policy(pipe.transformer), "student", {"bright": Brightness()},
                    _config(reward_weights={"bright": 0.0}), PROMPTS)
    # a reward logged at weight 0 beside one that trains (a control's setting); unlisted rewards weigh 1
    GRPOTrainer(pipe, Policy(pipe.transformer), "student2", {"bright": Brightness(), "dim": Brightness()},
                _config(reward_weights={"bright": 0.0}), PROMPTS)


def test_first_on_policy_step_has_ratio_one():
    trainer = _trainer(_config())
    trainer.epoch()  # the adapter is no longer zero: the check is not trivially the base model
    batch = trainer.collect()
    rows = torch.arange(len(batch))
    for k in range(batch.train_steps.shape[1]):
        out = trainer.step_loss(batch, rows, batch.train_steps[:, k])
        assert torch.equal(out.ppo.ratio, torch.ones(len(batch)))
        assert out.ppo.clip_fraction.item() == 0 and out.ppo.approx_kl.item() == 0
    half = torch.randperm(len(batch), generator=torch.Generator().manual_seed(0))[:4]  # other batch composition
    # a batch of another size may take other BLAS kernels (CPU-dependent): equal to rounding, not bit for bit
    ratio = trainer.step_loss(batch, half, batch.train_steps[half, 0]).ppo.ratio
    assert torch.allclose(ratio, torch.ones(4), rtol=0, atol=1e-6)
    metrics = trainer.epoch()
    assert metrics.reward_best["bright"] >= metrics.reward_mean["bright"]  # best of each group of 4 vs the mean
    assert metrics.first_update_ratio_dev == 0.0
    assert metrics.clip_fraction > 0  # the second optimizer step is off-policy beyond eps = 1e-4
    # after the updates the stored batch is off-policy
    assert not torch.equal(trainer.step_loss(batch, rows, batch.train_steps[:, 0]).ppo.ratio, torch.ones(len(batch)))


def _brightness(trainer: GRPOTrainer) -> float:
    """Mean brightness of fixed-seed SDE rollouts of the current adapter, 8 per prompt."""
    config = SampleConfig(steps=4, kind="sde", guidance_scale=4.5, seed=123, batch_size=24)
    texts = [t for t in TEXTS for _ in range(8)]
    return generate(trainer.pipe, texts, config, transformer=trainer.policy).images.mean().item()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_training_moves_brightness_towards_the_reward(sign):
    config = _config(prompts_per_epoch=3, batch_size=12, lr=3e-2, updates_per_epoch=1, beta=0.0, epochs=8)
    trainer = _trainer(config, Brightness(sign))
    before = _brightness(trainer)
    history = trainer.train()
    after = _brightness(trainer)
    assert sign * (after - before) > 0.02, (before, after)
    rewards = [m.reward_mean["bright"] for m in history]
    assert sum(rewards[-3:]) > sum(rewards[:3]), rewards


def test_every_lora_parameter_changes_and_no_base_weight():
    trainer = _trainer(_config(weight_decay=0.0))  # no decay: every change comes from a gradient
    base = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in trainer.params.items()}
    # 8 targets per block, minus the last block's missing to_add_out and its dead add_q_proj (policy.dead_targets)
    assert len(lora) == 2 * (8 * TEST_CONFIG.num_layers - 2)
    trainer.epoch()  # 2 optimizer steps: B moves first (A's grad is 0 while B = 0), then A
    unchanged = {n for n, p in trainer.params.items() if torch.equal(p, lora[n])}
    assert unchanged == set()
    assert all(torch.equal(p, base[n]) for n, p in trainer.policy.model.named_parameters() if "lora_" not in n)


def test_kl_to_reference_is_zero_at_start_and_positive_after_training():
    trainer = _trainer(_config(beta=0.04))
    batch = trainer.collect()
    assert torch.equal(trainer.reference_kl(batch), torch.zeros(batch.train_steps.shape))
    first = trainer.epoch()
    # the first optimizer step starts at the base (KL 0); the second one's micro-batches have moved away from it
    assert first.kl > 0 and first.first_update_ratio_dev < 1e-6  # micro-batches differ from sampling batches
    trainer.epoch()
    batch = trainer.collect()
    kl = trainer.reference_kl(batch)
    assert (kl > 0).all() and torch.isfinite(kl).all()
    # The value, computed independently: the adapter ON for the policy's transition, OFF for the reference's,
    # and the exact KL of the two Gaussians (torch.distributions) turned into Flow-GRPO's form (x |dt| / D).
    i, k = 1, 0
    step = int(batch.train_steps[i, k])
    sub = batch.rollout.subset(torch.tensor([i]))
    x, t, t_next = sub.latents[:, step], trainer.sigmas[step], trainer.sigmas[step + 1]
    cond, uncond = trainer._conditioning([batch.prompts[i]])
    cfg_w = trainer.config.guidance_scale
    with torch.no_grad():
        trainer.policy.set_active(trainer.adapter)
        on = transition_logprob(sub, step, velocity(trainer.policy, x, t, cond, uncond, cfg_w))
        with trainer.policy.disable():
            off = transition_logprob(sub, step, velocity(trainer.policy, x, t, cond, uncond, cfg_w))
    exact = kl_divergence(Normal(on.mean.double(), on.std.double()), Normal(off.mean.double(), on.std.double()))
    want = exact.sum() * abs(float(t_next - t)) / x[0].numel()
    assert float(want) > 0
    torch.testing.assert_close(kl[i, k].double(), want, rtol=1e-4, atol=0.0)


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    config = _config(ema_every=1, epochs=3)
    straight = _trainer(config)
    straight.epoch()
    save_trainer_state(straight.state_dict(), tmp_path / "ckpt")
    expected = straight.epoch()

    resumed = _trainer(config)
    resumed.load_state_dict(load_trainer_state(tmp_path / "ckpt"))
    assert resumed.epoch_index == 1 and resumed.optimizer_steps == 2
    got = resumed.epoch()
    for name in ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "grad_norm", "reward_mean"):
        assert getattr(got, name) == getattr(expected, name), name
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    ema_a, ema_b = straight.ema_state(), resumed.ema_state()
    assert all(torch.equal(ema_a[n], ema_b[n]) for n in ema_a)
    assert not all(torch.equal(ema_a[n], straight.params[n]) for n in ema_a)  # EMA is not the live weights
    state_a, state_b = straight.state_dict(), resumed.state_dict()
    assert state_a.meta == state_b.meta and state_a.tensors.keys() == state_b.tensors.keys()
    assert all(torch.equal(state_a.tensors[k], state_b.tensors[k]) for k in state_a.tensors)
    with pytest.raises(ValueError, match="different config"):
        _trainer(_config(lr=1e-3)).load_state_dict(load_trainer_state(tmp_path / "ckpt"))


def test_balance_templates_draws_every_category_each_epoch():
    specs = [PromptSpec(f"{k} {i}", task="compose", spec={"template": k}) for k in ("single", "position")
             for i in range(2 if k == "single" else 20)]
    trainer = _trainer(_config(balance_templates=True, prompts_per_epoch=4), prompts=PromptSet(tuple(specs)))
    for _ in range(3):
        drawn = trainer._draw_prompts()
        assert sorted(p.spec["template"] for p in drawn) == ["position", "position", "single", "single"]
    plain = _trainer(_config(prompts_per_epoch=4), prompts=PromptSet(tuple(specs)))
    assert any(all(p.spec["template"] == "position" for p in plain._draw_prompts()) for _ in range(10))
    with pytest.raises(ValueError, match="single"):  # 2 single prompts cannot fill a share of 3
        _trainer(_config(balance_templates=True, prompts_per_epoch=6), prompts=PromptSet(tuple(specs)))


def test_fast_window_step_subset_and_task_cycling(tmp_path):
    prompts = PromptSet(PROMPTS.prompts + (PromptSpec('the word "AC"', task="text"),
                                           PromptSpec('the word "HE"', task="text")))
    config = _config(sde_window=1, step_subset=1, task_cycling=True, prompts_per_epoch=2, epochs=2)
    trainer = _trainer(config, prompts=prompts)
    batch = trainer.collect()
    (j,) = batch.rollout.sde_steps
    assert 0 <= j < 2  # window range (0, T // 2)
    assert torch.equal(batch.train_steps, torch.full((8, 1), j))
    assert (
        (batch.rollout.log_probs[:, [i for i in range(4) if i != j]] == 0).all()
        and (batch.rollout.log_probs[:, j] != 0).all()
    )
    assert {p.task for p in batch.prompts} == {"compose"}
    trainer.epoch_index = 1
    assert {p.task for p in trainer.collect().prompts} == {"text"}
    history = trainer.train()  # resumes at epoch 1 and stops at config.epochs
    assert [m.epoch for m in history] == [1] and history[0].first_update_ratio_dev == 0
    folder = trainer.save_adapter(tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").is_file()


def test_cps_never_trains_the_near_deterministic_step_onto_sigma_min():
    """CPS's step onto the schedule's last sigma (1e-3) has noise std ~1e-3: after one AdamW step its exact
    log-prob ratio is far outside any clip range, so the trainer leaves it out (min_step_std), and says so
    before anything runs when nothing would be left to train."""
    cps = dict(kind="cps", noise_level=0.8, updates_per_epoch=1)
    trainer = _trainer(_config(**cps))
    assert trainer.sigmas[-2].item() == pytest.approx(1e-3)
    near = len(trainer.sigmas) - 3  # the step onto sigma_min, below trainable_steps (int(4 * 0.99) = 3)
    assert near < trainer.config.trainable_steps
    assert noisy_steps(trainer.sigmas, 0.8, "cps", 0.01) == tuple(range(near))
    assert set(trainer.collect().train_steps.unique().tolist()) == set(range(near))
    # without the floor that step is trained, and one optimizer step moves its ratio by orders of magnitude more
    loose = _trainer(_config(**cps, min_step_std=0.0))
    batch = loose.collect()
    assert set(batch.train_steps.unique().tolist()) == set(range(near + 1))
    loose._update(batch)
    rows = torch.arange(len(batch))
    dev = {j: loose.step_loss(batch, rows, torch.full((len(batch),), j)).ppo.ratio.log().abs().max().item()
           for j in (0, near)}
    assert dev[near] > 100 * dev[0], dev
    with pytest.raises(ValueError, match="no step to train"):
        _trainer(_config(kind="cps", noise_level=0.8, steps=2))  # its one trainable step lands on sigma_min
    with pytest.raises(ValueError, match="no step to train in the window 2..2"):  # a window of the near step
        _trainer(_config(kind="cps", noise_level=0.8, sde_window=1, window_range=(0, 3)))
    with pytest.raises(ValueError, match="min_step_std"):
        GRPOConfig(min_step_std=-1.0)


def test_same_initial_noise_shares_x_T_within_each_group_only():
    batch = _trainer(_config(same_initial_noise=True, group_size=3, batch_size=4)).collect()  # groups straddle chunks
    x_T = batch.rollout.latents[:, 0]
    for g in range(2):
        rows = (batch.group_ids == g).nonzero().flatten()
        assert len(rows) == 3 and all(torch.equal(x_T[rows[0]], x_T[r]) for r in rows[1:])
        # the SDE steps differ
        assert not torch.equal(batch.rollout.latents[rows[0], -1], batch.rollout.latents[rows[1], -1])
    assert not torch.equal(x_T[0], x_T[3])
    default = _trainer(_config(group_size=3, batch_size=4)).collect().rollout.latents[:, 0]
    assert not torch.equal(default[0], default[1])  # off: every sample draws its own


def test_cosine_lr_schedule_sets_each_optimizer_step_and_resumes(tmp_path):
    """lr_schedule: every optimizer step runs at lr * lr_factor(step); the constant schedule is Flow-GRPO's; a
    cosine run resumed from a checkpoint repeats the uninterrupted one; a state saved before the setting existed
    loads as the constant schedule it ran with."""
    from flowopd_core.training.config import LR_FINAL_RATIO, lr_factor

    assert lr_factor("constant", 7, 8) == 1.0
    assert lr_factor("cosine", 0, 8) == 1.0 and lr_factor("cosine", 4, 8) == pytest.approx(0.55)
    assert lr_factor("cosine", 8, 8) == pytest.approx(LR_FINAL_RATIO) == lr_factor("cosine", 20, 8)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", 0, 8)
    with pytest.raises(ValueError, match="lr_schedule"):
        _config(lr_schedule="step")

    config = _config(lr_schedule="cosine", epochs=2, updates_per_epoch=2, ema_decay=0.0)
    trainer = _trainer(config)
    seen = []
    step = trainer.optimizer.step

    def spy(*args, **kwargs):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.optimizer.step = spy
    trainer.epoch()
    save_trainer_state(trainer.state_dict(), tmp_path / "ckpt")
    trainer.epoch()
    assert seen == pytest.approx([config.lr * lr_factor("cosine", k, 4) for k in range(4)])
    resumed = _trainer(config)
    resumed.load_state_dict(load_trainer_state(tmp_path / "ckpt"))
    resumed.epoch()
    assert all(torch.equal(p, resumed.params[n]) for n, p in trainer.params.items())

    plain = _trainer(_config(epochs=2))
    plain.epoch()
    state = plain.state_dict()
    del state.meta["config"]["lr_schedule"]  # as written before the setting existed
    _trainer(_config(epochs=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="different config"):
        _trainer(_config(epochs=2, lr_schedule="cosine")).load_state_dict(state)
