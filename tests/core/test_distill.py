"""Flow-OPD trainer (docs/method.md §4, §5) on the tiny 16x16 pipeline: the teacher pool's mixed batches, targets,
distillation toward the teachers, on-policy ratios, MAR, resume."""

from __future__ import annotations

import pytest
import torch

from flowopd_core.distill.loss import route
from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.pipeline import TextEmbeddingCache, velocity
from flowopd_core.models.policy import BASE_ADAPTER, LoraSpec, Policy
from flowopd_core.prompts import UNTAGGED, PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.sampling.samplers import flow_sigmas, kl_weight
from flowopd_core.training.base import load_trainer_state, save_trainer_state

PROMPTS = PromptSet((
    PromptSpec("a red circle", task="compose"),
    PromptSpec("two blue squares", task="compose"),
    PromptSpec('the word "ACE"', task="text"),
    PromptSpec('the word "SEA"', task="text"),
))


def _pool(anchor: str | None = None, scale: float = 1.0):
    """Tiny pipeline + a policy with two random (non-zero) teacher adapters on one base."""
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(100 + seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=4.0 * scale, init=False))
    return pipe, TeacherPool(policy, {"compose": "t_compose", "text": "t_text"}, anchor=anchor)


def _config(**overrides) -> OPDConfig:
    base = dict(group_size=2, prompts_per_epoch=4, steps=4, batch_size=8, lora_rank=4, lora_alpha=8.0, lr=3e-2,
                epochs=3, reward_workers=0)
    return OPDConfig(**{**base, **overrides})


def test_pool_mixed_batches_equal_one_teacher_at_a_time():
    pipe, pool = _pool(anchor=BASE_ADAPTER)
    specs = [PROMPTS[0], PROMPTS[2], PromptSpec("a blue square"), PROMPTS[1]]
    cache = TextEmbeddingCache(pipe)
    cond, uncond = cache.encode([p.text for p in specs]), cache.negative(len(specs))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.5, 0.7, 0.3])
    plan = route(specs, pool.tasks, "soft", {"text": {"text": 3.0, "compose": 1.0}})
    target, anchor = pool.velocities(x, t, cond, uncond, plan, 4.5, batch_size=3)
    policy = pool.policy
    separate = {}
    for task, name in pool.teachers.items():
        policy.set_active(name)
        separate[task] = velocity(policy, x, t, cond, uncond, 4.5)
    with policy.disable():
        base = velocity(policy, x, t, cond, uncond, 4.5)
    want = torch.stack([
        separate["compose"][0],
        0.25 * separate["compose"][1] + 0.75 * separate["text"][1],
        0.5 * separate["compose"][2] + 0.5 * separate["text"][2],  # untagged: uniform blend
        separate["compose"][3],
    ])
    assert not torch.allclose(separate["compose"], separate["text"], atol=1e-3)
    torch.testing.assert_close(target, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(anchor, base, rtol=1e-5, atol=1e-5)


def test_pool_and_trainer_refuse_bad_setups():
    pipe, pool = _pool()
    with pytest.raises(KeyError, match="not loaded"):
        TeacherPool(pool.policy, {"compose": "nope"})
    with pytest.raises(ValueError, match="cannot also be a teacher"):
        OPDTrainer(pipe, pool, "t_text", _config(), PROMPTS)
    with pytest.raises(ValueError, match=r"no teacher for task\(s\) \['quality'\]"):
        OPDTrainer(pipe, pool, "student", _config(prompts_per_epoch=1), PromptSet((PromptSpec("x", task="quality"),)))
    with pytest.raises(ValueError, match="invalid OPDConfig: mode"):
        OPDConfig(mode="gkd")


def test_units_per_epoch_counts_the_sampling_batches_the_teacher_pass_and_the_optimizer_steps():
    pipe, pool = _pool()
    trainer = OPDTrainer(pipe, pool, "student", _config(epochs=1, batch_size=3, updates_per_epoch=2), PROMPTS)
    units: list[str] = []
    trainer.on_unit = units.append  # what fit() uses for its bar and stop checks
    trainer.train()
    counted = [u for u in units if u != "check"]
    assert counted == ["sample"] * 3 + ["sample"] + ["step"] * 2  # 8 samples in batches of 3, teachers, 2 steps
    assert trainer.units_per_epoch() == len(counted) == 6
    # checks: 4 denoising steps x 3 batches; per optimizer step (4 samples: micro-batches of 3 and 1) x 3 columns
    assert units.count("check") == 4 * 3 + 2 * (2 * 3)


def test_targets_are_the_routed_teachers_velocities_at_the_visited_states():
    pipe, pool = _pool()
    trainer = OPDTrainer(pipe, pool, "student", _config(), PROMPTS)
    batch = trainer.collect()
    n, k = batch.train_steps.shape
    assert (n, k) == (8, 3) and batch.targets.shape == (8, 3, 3, 16, 16) and batch.anchors is None
    i, j = 5, 1
    step = int(batch.train_steps[i, j])
    spec = batch.prompts[i]
    cond, uncond = trainer._conditioning([spec])
    pool.policy.set_active(pool.teachers[spec.task])
    want = velocity(pool.policy, batch.rollout.latents[i : i + 1, step], trainer.sigmas[step], cond, uncond, 4.5)
    torch.testing.assert_close(batch.targets[i, j], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["direct", "authors"])
def test_distillation_lowers_the_kl_to_the_teachers(mode):
    pipe, pool = _pool(scale=0.5)
    trainer = OPDTrainer(pipe, pool, "student", _config(mode=mode, epochs=8, lr=3e-3, clip_range=0.2), PROMPTS)
    history = trainer.train()
    assert history[-1].kl < 0.5 * history[0].kl, [m.kl for m in history]
    assert set(history[0].kl_by_task) == {"compose", "text"}


def test_paper_mode_starts_on_policy():
    pipe, pool = _pool(scale=0.5)
    trainer = OPDTrainer(pipe, pool, "student", _config(mode="paper", updates_per_epoch=2, epochs=1), PROMPTS)
    metrics = trainer.epoch()
    assert metrics.first_update_ratio_dev < 1e-5 and metrics.kl > 0  # rho == 1 before the first step


def test_student_equal_to_its_teacher_has_zero_kl_and_takes_no_step(tmp_path):
    pipe, pool = _pool()
    policy = pool.policy
    policy.load_adapter("student", policy.save_adapter("t_compose", tmp_path / "copy"))
    one_task = PromptSet(tuple(p for p in PROMPTS if p.task == "compose"))
    # batch_size 1: the teacher pass and the student's re-evaluation see equal shapes, so the CPU's BLAS takes the
    # same kernels and the velocities agree bit for bit (batches of other sizes agree only to rounding)
    config = _config(prompts_per_epoch=2, weight_decay=0.0, batch_size=1)
    trainer = OPDTrainer(pipe, pool, "student", config, one_task)
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    metrics = trainer.epoch()
    assert metrics.kl == 0.0 and metrics.grad_norm == 0.0
    assert all(torch.equal(before[k], v) for k, v in trainer.params.items())


def test_mar_alone_moves_a_student_that_equals_its_teacher_toward_the_anchor(tmp_path):
    """No distillation signal (student = its teacher), MAR on: every step comes from the anchor term, and the
    anchor KL falls. A student velocity detached in the MAR term would leave the adapter unchanged."""
    pipe, pool = _pool(anchor=BASE_ADAPTER)
    pool.policy.load_adapter("student", pool.policy.save_adapter("t_compose", tmp_path / "copy"))
    one_task = PromptSet(tuple(p for p in PROMPTS if p.task == "compose"))
    config = _config(prompts_per_epoch=2, weight_decay=0.0, batch_size=1, anchor_weight=1.0, lr=1e-2, epochs=4)
    trainer = OPDTrainer(pipe, pool, "student", config, one_task)
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    history = trainer.train()
    assert history[0].kl == 0.0 and history[0].anchor_kl > 0 and history[0].grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.params.items())
    assert history[-1].anchor_kl < history[0].anchor_kl, [m.anchor_kl for m in history]


def test_mar_pulls_the_student_toward_the_anchor():
    pipe, pool = _pool(anchor=BASE_ADAPTER, scale=0.5)
    trainer = OPDTrainer(pipe, pool, "student", _config(anchor_weight=1.0, epochs=2), PROMPTS)
    first = trainer.epoch()
    # The student starts as the base = the anchor: anchor KL 0 at first, positive once it moves to the teachers.
    assert first.anchor_kl == 0.0 and first.anchor_loss == 0.0
    second = trainer.epoch()
    assert second.anchor_kl > 0.0 and second.loss > second.opd_loss


def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    def run(split: bool):
        pipe, pool = _pool()
        trainer = OPDTrainer(pipe, pool, "student", _config(epochs=3, ema_decay=0.5, ema_every=1), PROMPTS)
        if split:
            trainer.train(lambda m: m.epoch == 0)
            save_trainer_state(trainer.state_dict(), tmp_path / "state")
            pipe, pool = _pool()
            trainer = OPDTrainer(pipe, pool, "student", _config(epochs=3, ema_decay=0.5, ema_every=1), PROMPTS)
            trainer.load_state_dict(load_trainer_state(tmp_path / "state"))
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.params.items()}, trainer.ema_state()

    (a, ema_a), (b, ema_b) = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_untagged_prompts_distil_from_the_uniform_blend():
    pipe, pool = _pool()
    prompts = PromptSet((PromptSpec("a red circle", task=UNTAGGED), PromptSpec("a blue square", task=UNTAGGED)))
    trainer = OPDTrainer(pipe, pool, "student", _config(prompts_per_epoch=2), prompts)
    batch = trainer.collect()
    assert torch.allclose(batch.plan.weights, torch.full((4, 2), 0.5))


def test_resolution_sets_the_rollout_size():
    pipe, pool = _pool()
    trainer = OPDTrainer(pipe, pool, "student", _config(resolution=8, prompts_per_epoch=2), PROMPTS)
    batch = trainer.collect()
    assert batch.rollout.latents.shape[-2:] == (8, 8) and batch.targets.shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="resolution must be >= 0"):
        _config(resolution=-1)


def test_cps_distillation_leaves_out_the_step_onto_sigma_min():
    """The KL weight of CPS's step onto sigma_min (std ~1e-3) is ~1e5 times the others': not trained."""
    pipe, pool = _pool()
    s = flow_sigmas(4)
    w = kl_weight(s[:-2], s[1:-1], 0.8, "cps")  # steps 0, 1 and the one onto sigma_min
    assert w[2] > 1e4 * w[:2].max()
    trainer = OPDTrainer(pipe, pool, "student", _config(kind="cps", noise_level=0.8), PROMPTS)
    assert trainer.sigmas[-2].item() == pytest.approx(1e-3) and trainer.config.trainable_steps == 3
    assert set(trainer.collect().train_steps.unique().tolist()) == {0, 1}
    loose = OPDTrainer(pipe, pool, "student2", _config(kind="cps", noise_level=0.8, min_step_std=0.0), PROMPTS)
    assert set(loose.collect().train_steps.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="no step to train"):
        OPDTrainer(pipe, pool, "student3", _config(kind="cps", noise_level=0.8, steps=2), PROMPTS)


class OneTaskBrightness:
    """Mean pixel value on the prompts of one task, NaN on the others (as a task reward that cannot score them);
    ``flat``: the same score for every image it scores."""

    def __init__(self, task: str, flat: bool = False) -> None:
        self.task, self.flat = task, flat

    def __call__(self, images, prompts):
        scores = torch.full((len(prompts),), 0.5) if self.flat else images.float().mean((1, 2, 3))
        own = torch.tensor([p.task == self.task for p in prompts])
        return RewardResult(scores=torch.where(own, scores, torch.full_like(scores, float("nan"))),
                            details=[{} for _ in prompts])


def test_drop_equal_reward_groups_judges_each_group_by_its_own_task_reward():
    """With two task rewards logged, each NaN on the other task's prompts, a sum over rewards is NaN everywhere and
    dropped every group; each group is judged by its own task's reward instead (the authors' filter)."""
    pipe, pool = _pool()
    rewards = {"compose": OneTaskBrightness("compose"), "ocr": OneTaskBrightness("text", flat=True)}
    trainer = OPDTrainer(pipe, pool, "student", _config(drop_equal_reward_groups=True), PROMPTS, rewards)
    batch = trainer.collect()
    tasks = [p.task for p in batch.prompts]
    assert batch.keep.tolist() == [task == "compose" for task in tasks]  # flat text groups dropped, compose kept
    metrics = trainer.epoch()
    assert metrics.grad_norm > 0


def test_drop_equal_reward_groups_refuses_a_task_without_its_own_reward():
    pipe, pool = _pool()
    only_compose = {"compose": OneTaskBrightness("compose")}
    with pytest.raises(ValueError, match=r"task 'text' needs reward 'ocr', which is not among the rewards \['compose"):
        OPDTrainer(pipe, pool, "student", _config(drop_equal_reward_groups=True), PROMPTS, only_compose)
    untagged = PromptSet((PromptSpec("a red circle"),) * 4)
    with pytest.raises(ValueError, match="untagged prompts have no own reward"):
        OPDTrainer(pipe, pool, "student", _config(drop_equal_reward_groups=True), untagged, only_compose)
    renamed = {"geneval": OneTaskBrightness("compose"), "ocr": OneTaskBrightness("text")}
    trainer = OPDTrainer(pipe, pool, "student", _config(drop_equal_reward_groups=True), PROMPTS, renamed,
                         task_rewards={"compose": "geneval"})
    assert trainer.collect().keep.all()


class _Drawn(Exception):
    """Raised by a stand-in for the rollouts: the test needs only which prompts an epoch drew."""


def test_balance_tasks_draws_every_task_equally_however_many_prompts_it_has(monkeypatch):
    many = PromptSet((*(PromptSpec(f"a red circle {i}", task="compose") for i in range(10)),
                      PromptSpec('the word "ACE"', task="text"), PromptSpec('the word "SEA"', task="text")))
    pipe, pool = _pool()

    def stop(self, drawn, *args, **kwargs):
        raise _Drawn(sorted(p.task for p in drawn))

    monkeypatch.setattr(OPDTrainer, "rollout_and_score", stop)

    def drawn_tasks(balance: bool) -> list[list[str]]:
        trainer = OPDTrainer(pipe, pool, "student", _config(balance_tasks=balance), many)
        out = []
        for epoch in range(6):
            trainer.epoch_index = epoch
            with pytest.raises(_Drawn) as drawn:
                trainer.collect()
            out.append(drawn.value.args[0])
        return out

    assert drawn_tasks(True) == [["compose", "compose", "text", "text"]] * 6
    assert sum(tasks.count("text") for tasks in drawn_tasks(False)) < 12  # uniform: 2 of 12 prompts are text
    with pytest.raises(ValueError, match=r"balance_tasks draws ceil\(6 / 2\).*'text': 2"):
        OPDTrainer(pipe, pool, "student", _config(balance_tasks=True, prompts_per_epoch=6), many)
