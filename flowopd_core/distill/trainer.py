"""Flow-OPD stage 2b: multi-teacher on-policy distillation of a student LoRA, with MAR (docs/method.md §4, §5).

All networks share ONE base transformer (a :class:`~flowopd_core.models.policy.Policy`): the student, every teacher
and an optional anchor are LoRA adapters on it (the anchor may also be the base itself, ``BASE_ADAPTER``).
Never a full copy of a model.

One epoch (:meth:`OPDTrainer.epoch`):

1. Rollouts (no grad, student adapter = on-policy): ``prompts_per_epoch`` prompts x ``group_size`` samples,
   SDE (or CPS) with per-step log-probs. Optional task rewards are scored in a thread pool, for logging only
   (or, with ``drop_equal_reward_groups``, to drop flat groups as the authors' code does).
2. Targets, once per rollout (§4): every trained state (sample i, step j) is routed (:func:`route`: hard by
   task tag, or soft blends) and the teachers' CFG-combined velocities at it are computed in batched no-grad
   passes whose rows mix teachers (peft's per-sample ``adapter_names``). The anchor's velocities (MAR, §5)
   ride in the same passes. Nothing of the teachers runs inside the training loop.
3. ``updates_per_epoch`` AdamW steps: per micro-batch and trained step the student velocity is re-evaluated
   with grad and :func:`flowopd_core.distill.loss.distill_loss` (mode ``paper`` / ``authors`` / ``direct`` + MAR)
   is accumulated; gradient clipping, EMA of the LoRA.

Everything random comes from the trainer's generator (checkpointed): resumed runs repeat exactly on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.distill.config import OPDConfig as OPDConfig
from flowopd_core.distill.loss import ROUTE_MODES, DistillLoss, RoutePlan, distill_loss, route
from flowopd_core.distill.routing import own_reward_problems
from flowopd_core.grpo.loss import group_advantages
from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.pipeline import TextEmbeddings, velocity
from flowopd_core.models.policy import BASE_ADAPTER, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.names import TASK_REWARDS
from flowopd_core.sampling.samplers import Rollout, transition_logprob
from flowopd_core.training.base import LoraTrainer, RewardFn, TrainerMetrics, mean_or_nan, nan_stats
from flowopd_core.training.draws import balanced_draw, small_strata, task_strata


@dataclass
class OPDBatch:
    """One epoch's rollouts and their distillation targets. N samples, K trained steps per sample.

    latents ``(N, T+1, C, H, W)``; log_probs ``(N, T)``; train_steps ``(N, K)`` long;
    targets ``(N, K, C, H, W)`` routed/blended teacher velocity at each trained state;
    anchors ``(N, K, C, H, W)`` anchor velocity, or None without MAR; keep ``(N,)`` bool samples trained;
    plan: the routing of the N samples; rewards: name -> ``(N,)`` (NaN = unscored), for logging.
    """

    prompts: list[PromptSpec]
    group_ids: torch.Tensor
    rollout: Rollout
    train_steps: torch.Tensor
    targets: torch.Tensor
    anchors: torch.Tensor | None
    keep: torch.Tensor
    plan: RoutePlan
    images: torch.Tensor
    rewards: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class OPDEpochMetrics(TrainerMetrics):
    """What one distillation epoch did: :class:`~flowopd_core.training.base.TrainerMetrics` (sample_seconds: the
    rollouts alone) plus kl / anchor_kl: mean per-step KL (the mode's form) to the target / anchor over the
    trained terms, measured on the student BEFORE each optimizer step (the rollout policy for the first);
    kl_by_task: the same per task tag; opd_loss / anchor_loss: the two terms of the loss; reward_mean: logging
    rewards (NaN-aware); target_seconds: the teacher (and anchor) passes."""

    kl: float
    kl_by_task: dict[str, float]
    anchor_kl: float
    opd_loss: float
    anchor_loss: float
    reward_mean: dict[str, float]
    target_seconds: float


STATE_FORMAT = "flowopd-opd-state/1"


TEACHER_PREFIX = "teacher_"
"""Adapter name of the teacher of task ``x`` in a policy built by :meth:`TeacherRefs.load_into`."""


@dataclass(frozen=True)
class TeacherRefs:
    """A serialisable teacher pool with its routing: one teacher (a LoRA adapter on one shared base) per task.

    teachers: ``(task, ModelRef)`` pairs, each ModelRef with an ``adapter``; route / task_weights: see
    :func:`flowopd_core.distill.loss.route`.
    """

    teachers: tuple[tuple[str, ModelRef], ...]
    route: str = "hard"
    task_weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tasks = [task for task, _ in self.teachers]
        problems = []
        if not tasks:
            problems.append("no teachers")
        if len(set(tasks)) != len(tasks) or not all(tasks):
            problems.append(f"task names must be distinct and non-empty, got {tasks}")
        no_adapter = [task for task, ref in self.teachers if not ref.adapter]
        if no_adapter:
            problems.append(f"teachers {no_adapter} have no adapter (a teacher is a LoRA on the shared base)")
        bases = {ref.base_key for _, ref in self.teachers}
        if len(bases) > 1:
            problems.append(f"teachers must share ONE base model (path, dtype, device, text length), got "
                            f"{sorted(bases)}")
        if self.route not in ROUTE_MODES:
            problems.append(f"route must be one of {ROUTE_MODES}, got {self.route!r}")
        if problems:
            raise ValueError("invalid teacher pool: " + "; ".join(problems))
        if self.task_weights or self.route == "soft":
            route([], tasks, self.route, self.task_weights)  # checks the weights

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, _ in self.teachers)

    @property
    def base(self) -> ModelRef:
        return self.teachers[0][1].base()

    def check_base(self, ref: ModelRef, what: str) -> None:
        """Raise unless ``ref`` (a student or anchor) sits on the teachers' base."""
        base = self.base
        if ref.base_key != base.base_key:
            raise ValueError(f"{what} must use the teachers' base {base.path} ({base.dtype}, {base.device}, "
                             f"T5 length {base.max_sequence_length}), got {ref.path} ({ref.dtype}, {ref.device}, "
                             f"T5 length {ref.max_sequence_length})")

    def load_into(self, policy: Policy, anchor: ModelRef | None = None) -> TeacherPool:
        """Load every teacher adapter (as ``teacher_<task>``) and the anchor's (as ``anchor``; an anchor without
        adapter = the base) into ``policy``; returns the pool."""
        for task, ref in self.teachers:
            policy.load_adapter(TEACHER_PREFIX + task, ref.adapter)
        anchor_name = None
        if anchor is not None:
            self.check_base(anchor, "the anchor")
            anchor_name = BASE_ADAPTER
            if anchor.adapter:
                policy.load_adapter("anchor", anchor.adapter)
                anchor_name = "anchor"
        return TeacherPool(policy, {task: TEACHER_PREFIX + task for task in self.tasks}, anchor=anchor_name)

    def with_route(self, mode: str, task_weights: Mapping[str, Mapping[str, float]] | None = None) -> TeacherRefs:
        return TeacherRefs(self.teachers, mode, {k: dict(v) for k, v in (task_weights or {}).items()})


class TeacherPool:
    """K teacher adapters (and an optional anchor) on the policy's ONE base; batched velocities whose rows
    mix teachers.

    teachers: task tag -> adapter name in ``policy`` (the teacher that serves the task).
    anchor: adapter name, ``BASE_ADAPTER`` (the base model, the authors' default) or None (no MAR).
    """

    def __init__(self, policy: Policy, teachers: Mapping[str, str], anchor: str | None = None) -> None:
        missing = sorted({a for a in teachers.values() if a not in policy.adapters})
        if anchor not in (None, BASE_ADAPTER) and anchor not in policy.adapters:
            missing.append(anchor)
        if missing:
            raise KeyError(f"teacher/anchor adapters {missing} are not loaded (have {list(policy.adapters)})")
        if not teachers:
            raise ValueError("a teacher pool needs at least one teacher")
        self.policy, self.teachers, self.anchor = policy, dict(teachers), anchor

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.teachers)

    @torch.no_grad()
    def velocities(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: TextEmbeddings,
        uncond: TextEmbeddings | None,
        plan: RoutePlan,
        guidance_scale: float,
        batch_size: int,
        with_anchor: bool = True,
        precision: str = "fp32",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target (and anchor) velocities at states ``x`` ``(B, C, H, W)``, times ``t`` ``(B,)``.

        Every (row, teacher) pair with weight > 0 in ``plan`` (and every row once more for the anchor) becomes
        one row of a mixed batch with its own adapter name; the batches run ``batch_size`` rows at a time.
        Returns ``(target (B, C, H, W), anchor (B, C, H, W) or None)``, float32; no anchor rows run when the
        pool has no anchor or ``with_anchor`` is False. precision: of the forwards (see
        :func:`~flowopd_core.models.pipeline.velocity`).
        """
        rows, names, weights = [], [], []
        for k, task in enumerate(plan.teachers):
            for i in plan.rows(k).tolist():
                rows.append(i)
                names.append(self.teachers[task])
                weights.append(float(plan.weights[i, k]))
        n_target = len(rows)
        with_anchor = with_anchor and self.anchor is not None
        if with_anchor:
            rows += list(range(x.shape[0]))
            names += [self.anchor] * x.shape[0]
        out = torch.empty((len(rows), *x.shape[1:]), dtype=torch.float32, device=x.device)
        index = torch.tensor(rows, dtype=torch.long, device=x.device)
        for start in range(0, len(rows), batch_size):
            sel = index[start : start + batch_size]
            c = TextEmbeddings(cond.prompt_embeds[sel], cond.pooled[sel])
            u = TextEmbeddings(uncond.prompt_embeds[sel], uncond.pooled[sel]) if uncond is not None else None
            out[start : start + len(sel)] = velocity(
                self.policy, x[sel], t[sel], c, u, guidance_scale, adapter_names=names[start : start + len(sel)],
                precision=precision,
            )
        w = torch.tensor(weights, dtype=torch.float32, device=x.device).view(-1, *([1] * (x.ndim - 1)))
        target = torch.zeros((x.shape[0], *x.shape[1:]), dtype=torch.float32, device=x.device)
        # a one-hot row gets 0 + 1.0 * v: exactly the teacher's velocity
        target.index_add_(0, index[:n_target], w * out[:n_target])
        anchor = out[n_target:] if with_anchor else None
        return target, anchor


def own_task_scores(
    prompts: list[PromptSpec], scores: Mapping[str, torch.Tensor], task_rewards: Mapping[str, str]
) -> torch.Tensor:
    """Each sample's score by its own task's reward ``(N,)`` (NaN where that reward did not score it).

    prompts: the N samples' prompts; scores: reward name -> ``(N,)``. Other rewards never mix in: a reward that
    cannot score a task gives NaN there, and a sum over rewards would make every sample NaN."""
    if not prompts:
        return torch.empty(0)
    first = next(iter(scores.values()))
    out = torch.full((len(prompts),), float("nan"), dtype=torch.float64, device=first.device)
    for i, spec in enumerate(prompts):
        out[i] = scores[task_rewards[spec.task]][i]
    return out


class OPDTrainer(LoraTrainer):
    """On-policy distillation of the student adapter ``student`` of ``pool.policy`` (module doc).

    The student is created from the config's rank/alpha (zero B: starts as the base) unless it exists, e.g.
    from a cold start (merge or SFT). rewards: optional name -> reward for logging (or for
    ``drop_equal_reward_groups``). prompts: the training prompts of all tasks (their tags route them).
    task_rewards: task -> the name of its own reward, over :data:`TASK_REWARDS` (``drop_equal_reward_groups``
    judges each group by its prompt's own task reward only, as the authors' code does).
    """

    STATE_FORMAT = STATE_FORMAT
    LOSS_NAME = "OPD"
    EXTRA_UNITS = 1  # the teacher pass of collect()

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        pool: TeacherPool,
        student: str,
        config: OPDConfig = OPDConfig(),
        prompts: PromptSet | None = None,
        rewards: Mapping[str, RewardFn] | None = None,
        task_rewards: Mapping[str, str] | None = None,
    ) -> None:
        if prompts is None or len(prompts) == 0:
            raise ValueError("OPDTrainer needs a non-empty PromptSet")
        if len(prompts) < config.prompts_per_epoch:
            raise ValueError(f"prompts_per_epoch {config.prompts_per_epoch} exceeds the {len(prompts)} prompts")
        strata = task_strata(prompts) if config.balance_tasks else None
        if strata and (small := small_strata(strata, config.prompts_per_epoch)):
            raise ValueError(f"balance_tasks draws ceil({config.prompts_per_epoch} / {len(strata)}) prompts of each "
                             f"task per epoch; too few prompts of {small}")
        if student in pool.teachers.values() or student == pool.anchor:
            raise ValueError(f"the student {student!r} cannot also be a teacher or the anchor")
        self.task_rewards = {**TASK_REWARDS, **(task_rewards or {})}
        if config.drop_equal_reward_groups:
            missing = own_reward_problems((p.task for p in prompts), self.task_rewards, rewards or {})
            if missing:
                raise ValueError(f"drop_equal_reward_groups judges each group by its task's own reward: {missing}")
        route(list(prompts), pool.tasks, config.route, config.task_weights)  # every prompt has a route: fail now
        super().__init__(pipe, pool.policy, student, config)
        self.pool, self.prompts, self.rewards = pool, prompts, dict(rewards or {})
        self._strata = strata  # task -> prompt indices (balance_tasks), else None

    @torch.no_grad()
    def collect(self) -> OPDBatch:
        """Student rollouts of the epoch, routed, with teacher (and anchor) velocities at every trained state."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        if self._strata is not None:
            order = balanced_draw(self._strata, cfg.prompts_per_epoch, self.epoch_index, self.generator)
        else:
            order = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_epoch].tolist()
        drawn = [self.prompts[i] for i in order]
        generator = self._epoch_generator()
        start_time = time.perf_counter()
        out = self.rollout_and_score(drawn, self.rewards, generator)
        self._sample_seconds = time.perf_counter() - start_time
        scores, specs = out.scores, out.prompts
        keep = torch.ones(len(specs), dtype=torch.bool)
        if cfg.drop_equal_reward_groups:
            own = own_task_scores(specs, scores, self.task_rewards)
            keep = group_advantages(own, out.group_ids) != 0
        plan = route(specs, self.pool.tasks, cfg.route, cfg.task_weights)
        train_steps = self.draw_train_steps(len(specs), out.rollout.sde_steps, generator)
        targets, anchors = self._targets(out.rollout, specs, plan, train_steps)
        self._tick("sample")  # the teacher pass: EXTRA_UNITS
        if self.world.size > 1:  # the logging rewards of the whole epoch (keep above used this share's groups)
            scores = {name: self._gather_groups(r, len(drawn), cfg.group_size) for name, r in scores.items()}
        return OPDBatch(
            prompts=specs, group_ids=out.group_ids, rollout=out.rollout, train_steps=train_steps, targets=targets,
            anchors=anchors, keep=keep, plan=plan, images=out.images, rewards=scores,
        )

    def _targets(
        self, rollout: Rollout, specs: list[PromptSpec], plan: RoutePlan, train_steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher targets (and anchors) ``(N, K, C, H, W)`` at every trained state, in mixed no-grad batches."""
        n, k = train_steps.shape
        start_time = time.perf_counter()
        rows = torch.arange(n, device=train_steps.device).repeat_interleave(k)
        steps = train_steps.reshape(-1)
        x = rollout.latents[rows, steps]
        t = self.sigmas[steps]
        flat_specs = [specs[i] for i in rows.tolist()]
        cond, uncond = self._conditioning(flat_specs)
        flat_plan = RoutePlan(plan.mode, plan.teachers, plan.weights[rows.cpu()], plan.index[rows.cpu()])
        target, anchor = self.pool.velocities(x, t, cond, uncond, flat_plan, self.config.guidance_scale,
                                              self.config.batch_size, precision=self.precision)
        self._target_seconds = time.perf_counter() - start_time
        shape = (n, k, *x.shape[1:])
        return target.reshape(shape), (anchor.reshape(shape) if anchor is not None else None)

    # ------------------------------------------------------------------------------------------- training

    def step_loss(self, batch: OPDBatch, rows: torch.Tensor, k: int) -> DistillLoss:
        """:class:`~flowopd_core.distill.loss.DistillLoss` of trained step column ``k`` of the samples ``rows``
        ``(b,)``, with the student re-evaluated (with grad) at the stored states."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        steps = batch.train_steps[rows, k]
        sub = batch.rollout.subset(rows)
        index = torch.arange(len(rows), device=steps.device)
        cond, uncond = self._conditioning([batch.prompts[i] for i in rows.tolist()])
        t, t_next = self.sigmas[steps], self.sigmas[steps + 1]
        v = self._velocity(sub.latents[index, steps], t, cond, uncond)
        logp_new = logp_old = None
        if cfg.mode != "direct":
            logp_new = transition_logprob(sub, steps, v).log_prob
            logp_old = sub.log_probs[index, steps]
        return distill_loss(
            cfg.mode, v_student=v, v_target=batch.targets[rows, k], t=t, t_next=t_next, noise_level=cfg.noise_level,
            kind=cfg.kind, logp_new=logp_new, logp_old=logp_old, clip_range=cfg.clip_range,
            form=cfg.kl_form or None, adv_clip=cfg.adv_clip or None,
            v_anchor=batch.anchors[rows, k] if batch.anchors is not None else None,
            anchor_weight=cfg.anchor_weight if batch.anchors is not None else 0.0,
        )

    def _update(self, batch: OPDBatch) -> dict[str, Any]:
        cfg = self.config
        keep = torch.nonzero(batch.keep).flatten()
        order = keep[torch.randperm(len(keep), generator=self._local_generator)]
        log: dict[str, Any] = {
            key: [] for key in ("loss", "opd", "anchor", "kl", "anchor_kl", "clip_fraction", "grad_norm")}
        log.update(first_dev=0.0, trained=len(keep), task_kl={})
        self.skipped_steps = 0
        if cfg.drop_equal_reward_groups and self._skip_unscored_epoch(batch.rewards):
            log["trained"] = 0  # the rewards pick the groups: nothing scored, nothing to train
            return log

        def record(terms: DistillLoss, rows: torch.Tensor, update: int) -> None:
            for key, value in (("loss", terms.total), ("opd", terms.opd), ("anchor", terms.anchor),
                               ("kl", terms.kl_mean), ("clip_fraction", terms.clip_fraction)):
                log[key].append(value.item())
            if terms.anchor_kl is not None:
                log["anchor_kl"].append(terms.anchor_kl.mean().item())
            for i, value in zip(rows.tolist(), terms.kl.tolist()):
                log["task_kl"].setdefault(batch.prompts[i].task, []).append(value)
            if update == 0 and terms.ratio is not None:
                log["first_dev"] = max(log["first_dev"], (terms.ratio - 1).abs().max().item())

        log["grad_norm"] = self._optimise(order, batch.train_steps.shape[1],
                                          lambda rows, k: self.step_loss(batch, rows, k), record)
        if self.world.size > 1:  # per-task KL of the whole epoch: one list per task tag of the prompt set
            for task in sorted({p.task for p in self.prompts}):
                log[f"task_kl/{task}"] = log["task_kl"].pop(task, [])
            tasks = [k for k in log if k.startswith("task_kl/")]
            self._reduce_log(log, ("loss", "opd", "anchor", "kl", "anchor_kl", "clip_fraction", *tasks), ("first_dev",),
                             ("trained",))
            log["task_kl"] = {k.removeprefix("task_kl/"): log.pop(k) for k in tasks if log[k]}
        return log

    def _metrics(self, batch: OPDBatch, log: dict[str, Any], sample_seconds: float,
                 train_seconds: float) -> OPDEpochMetrics:
        return OPDEpochMetrics(
            **{**self._common_metrics(log, sample_seconds, train_seconds), "sample_seconds": self._sample_seconds},
            kl=mean_or_nan(log["kl"]),
            kl_by_task={task: mean_or_nan(values) for task, values in sorted(log["task_kl"].items())},
            anchor_kl=mean_or_nan(log["anchor_kl"]),
            opd_loss=mean_or_nan(log["opd"]),
            anchor_loss=mean_or_nan(log["anchor"]),
            reward_mean={name: nan_stats(r)[0] for name, r in batch.rewards.items()},
            target_seconds=self._target_seconds,
        )
