"""Flow-OPD stage 2b: multi-teacher on-policy distillation of a student LoRA, with MAR (method.md §4, §5).

All networks share ONE base transformer (a :class:`~flowopd_core.policy.Policy`): the student, every teacher
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
   with grad and :func:`flowopd_core.opd.distill_loss` (mode ``paper`` / ``authors`` / ``direct`` + MAR)
   is accumulated; gradient clipping, EMA of the LoRA.

Everything random comes from the trainer's generator (checkpointed): resumed runs repeat exactly on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.grpo import KL_FORMS, RewardFn, _nan_stats, _scores, _submit, group_advantages
from flowopd_core.lora_trainer import LoraTrainer, range_errors
from flowopd_core.modelref import ModelRef
from flowopd_core.opd import DISTILL_MODES, ROUTE_MODES, RoutePlan, distill_loss, route
from flowopd_core.pipeline import TextEmbeddings, decode, initial_noise, velocity
from flowopd_core.policy import BASE_ADAPTER, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.samplers import LOGPROB_REDUCES, STOCHASTIC_KINDS, Rollout, sample, transition_logprob


@dataclass(frozen=True)
class OPDConfig:
    """Flow-OPD distillation settings (method.md §4, §5). Defaults: the mini-world's (see the help)."""

    mode: str = field(
        default="direct",
        metadata={"help": "paper (detached -KL as PPO advantage), authors (not detached, clamped, mean form) or "
                          "direct (minimise KL_t pathwise); direct is the default: it is the one the mini-world "
                          "results favour (README)"},
    )
    kl_form: str = field(default="", metadata={"help": "true | mean | flow_grpo; empty = the mode's default"})
    route: str = field(default="hard", metadata={"help": "hard (task tag picks the teacher) or soft (task_weights)"})
    task_weights: dict[str, dict[str, float]] = field(
        default_factory=dict,
        metadata={"help": "soft routing: task -> {teacher: weight}; '' (untagged) -> blend; default: own teacher"},
    )
    anchor_weight: float = field(
        default=0.0, metadata={"help": "MAR lambda (paper 0.02, authors' code 0.04); 0 = no anchor term"}
    )
    group_size: int = field(default=2, metadata={"help": "student samples per drawn prompt"})
    prompts_per_epoch: int = field(default=16, metadata={"help": "prompts drawn per epoch (without replacement)"})
    steps: int = field(default=10, metadata={"help": "sampling steps T of the student's rollouts"})
    resolution: int = field(
        default=0, metadata={"help": "image height = width in pixels; 0 = the model's native size (paper: 512)"}
    )
    train_fraction: float = field(
        default=0.99, metadata={"help": "train the first int(T * fraction) steps (the last step is deterministic)"}
    )
    step_subset: int = field(default=0, metadata={"help": "train k random steps per sample and epoch; 0 = all"})
    kind: str = field(default="sde", metadata={"help": "sde or cps rollouts"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a"})
    min_step_std: float = field(
        default=0.01,
        metadata={"help": "train only steps whose transition noise std is at least this (cps: skips the step onto "
                          "the schedule's last sigma, std ~1e-3, where the KL weight 1 / std^2 explodes); 0 = no floor"},
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "CFG w of student and teachers (KL on CFG-combined velocities); 1 = off"}
    )
    logprob_reduce: str = field(default="mean", metadata={"help": "log-prob over D: mean (Flow-GRPO) or sum"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip eps (paper/authors modes)"})
    advantage_clip: float = field(
        default=0.0, metadata={"help": "clamp of the dense advantages; 0 = the mode's default (authors 5, paper none)"}
    )
    drop_equal_reward_groups: bool = field(
        default=False,
        metadata={"help": "authors' code: skip groups whose task rewards are all equal (needs rewards)"},
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = no clipping"})
    updates_per_epoch: int = field(default=1, metadata={"help": "optimizer steps per sampling epoch"})
    batch_size: int = field(default=32, metadata={"help": "rows per transformer batch (CFG doubles them)"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the student's LoRA; 0 = no EMA"})
    ema_every: int = field(default=8, metadata={"help": "optimizer steps between EMA updates"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank if the trainer creates the student"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha if the trainer creates the student"})
    epochs: int = field(default=30, metadata={"help": "sampling epochs"})
    seed: int = field(default=0, metadata={"help": "seed of the trainer's generator"})
    reward_workers: int = field(default=1, metadata={"help": "threads scoring logging rewards; 0 = inline"})
    max_bad_steps: int = field(
        default=3,
        metadata={"help": "an optimizer step with a non-finite loss or gradient norm (or, with "
                          "drop_equal_reward_groups, in an epoch without one finite reward) is skipped; this many "
                          "consecutive skipped steps stop training"},
    )

    def __post_init__(self) -> None:
        errors = range_errors(
            self,
            at_least_one=("group_size", "prompts_per_epoch", "steps", "updates_per_epoch", "batch_size", "ema_every",
                          "lora_rank", "epochs", "max_bad_steps"),
            non_negative=("step_subset", "reward_workers", "weight_decay", "grad_clip", "anchor_weight",
                          "advantage_clip", "resolution", "min_step_std"),
            positive=("clip_range", "lr", "lora_alpha", "noise_level"),
        )
        if self.mode not in DISTILL_MODES:
            errors.append(f"mode must be one of {DISTILL_MODES}, got {self.mode!r}")
        if self.kl_form and self.kl_form not in KL_FORMS:
            errors.append(f"kl_form must be empty or one of {KL_FORMS}, got {self.kl_form!r}")
        if self.route not in ROUTE_MODES:
            errors.append(f"route must be one of {ROUTE_MODES}, got {self.route!r}")
        if self.route == "hard" and self.task_weights:
            errors.append("task_weights are for route='soft'")
        if not 0 < self.train_fraction <= 1 or int(self.steps * self.train_fraction) < 1:
            errors.append(f"train_fraction {self.train_fraction} must be in (0, 1] and leave >= 1 trained step")
        if self.kind not in STOCHASTIC_KINDS:
            errors.append(f"kind must be one of {STOCHASTIC_KINDS}, got {self.kind!r}")
        if self.kind == "cps" and self.noise_level > 1:
            errors.append(f"kind='cps' needs noise_level <= 1, got {self.noise_level}")
        if self.logprob_reduce not in LOGPROB_REDUCES:
            errors.append(f"logprob_reduce must be one of {LOGPROB_REDUCES}, got {self.logprob_reduce!r}")
        if self.guidance_scale < 0 or not 0 <= self.ema_decay < 1:
            errors.append("guidance_scale must be >= 0 and ema_decay in [0, 1)")
        if errors:
            raise ValueError("invalid OPDConfig: " + "; ".join(errors))

    @property
    def trainable_steps(self) -> int:
        """int(T * train_fraction): steps 0 .. this - 1 are trained (cps: never the last, deterministic one)."""
        last = self.steps - 1 if self.kind == "cps" else self.steps
        return max(1, min(int(self.steps * self.train_fraction), last))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


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
class OPDEpochMetrics:
    """What one distillation epoch did. kl / anchor_kl: mean per-step KL (the mode's form) to the target /
    anchor over the trained terms, measured on the student BEFORE each optimizer step (the rollout policy for
    the first); kl_by_task: the same per task tag. reward_mean: logging rewards (NaN-aware). skipped_steps:
    optimizer steps of this epoch not taken for non-finite values (``max_bad_steps``)."""

    epoch: int
    kl: float
    kl_by_task: dict[str, float]
    anchor_kl: float
    loss: float
    opd_loss: float
    anchor_loss: float
    clip_fraction: float
    first_update_ratio_dev: float
    grad_norm: float
    trained_samples: int
    reward_mean: dict[str, float]
    optimizer_steps: int
    skipped_steps: int
    sample_seconds: float
    target_seconds: float
    train_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STATE_FORMAT = "flowopd-opd-state/1"


TEACHER_PREFIX = "teacher_"
"""Adapter name of the teacher of task ``x`` in a policy built by :meth:`TeacherRefs.load_into`."""


@dataclass(frozen=True)
class TeacherRefs:
    """A serialisable teacher pool with its routing: one teacher (a LoRA adapter on one shared base) per task.

    teachers: ``(task, ModelRef)`` pairs, each ModelRef with an ``adapter``; route / task_weights: see
    :func:`flowopd_core.opd.route`.
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
        bases = {(str(ref.path), ref.dtype, ref.device) for _, ref in self.teachers}
        if len(bases) > 1:
            problems.append(f"teachers must share ONE base model (path, dtype, device), got {sorted(bases)}")
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
        if (str(ref.path), ref.dtype, ref.device) != (str(base.path), base.dtype, base.device):
            raise ValueError(f"{what} must use the teachers' base {base.path} ({base.dtype}, {base.device}), "
                             f"got {ref.path} ({ref.dtype}, {ref.device})")

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target (and anchor) velocities at states ``x`` ``(B, C, H, W)``, times ``t`` ``(B,)``.

        Every (row, teacher) pair with weight > 0 in ``plan`` (and every row once more for the anchor) becomes
        one row of a mixed batch with its own adapter name; the batches run ``batch_size`` rows at a time.
        Returns ``(target (B, C, H, W), anchor (B, C, H, W) or None)``, float32; no anchor rows run when the
        pool has no anchor or ``with_anchor`` is False.
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
                self.policy, x[sel], t[sel], c, u, guidance_scale, adapter_names=names[start : start + len(sel)]
            )
        w = torch.tensor(weights, dtype=torch.float32, device=x.device).view(-1, *([1] * (x.ndim - 1)))
        target = torch.zeros((x.shape[0], *x.shape[1:]), dtype=torch.float32, device=x.device)
        # a one-hot row gets 0 + 1.0 * v: exactly the teacher's velocity
        target.index_add_(0, index[:n_target], w * out[:n_target])
        anchor = out[n_target:] if with_anchor else None
        return target, anchor


class OPDTrainer(LoraTrainer):
    """On-policy distillation of the student adapter ``student`` of ``pool.policy`` (module doc).

    The student is created from the config's rank/alpha (zero B: starts as the base) unless it exists, e.g.
    from a cold start (merge or SFT). rewards: optional name -> reward for logging (or for
    ``drop_equal_reward_groups``). prompts: the training prompts of all tasks (their tags route them).
    """

    STATE_FORMAT = STATE_FORMAT
    FREE_CONFIG_KEYS = ("epochs", "reward_workers", "max_bad_steps")

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        pool: TeacherPool,
        student: str,
        config: OPDConfig = OPDConfig(),
        prompts: PromptSet | None = None,
        rewards: Mapping[str, RewardFn] | None = None,
    ) -> None:
        if prompts is None or len(prompts) == 0:
            raise ValueError("OPDTrainer needs a non-empty PromptSet")
        if len(prompts) < config.prompts_per_epoch:
            raise ValueError(f"prompts_per_epoch {config.prompts_per_epoch} exceeds the {len(prompts)} prompts")
        if student in pool.teachers.values() or student == pool.anchor:
            raise ValueError(f"the student {student!r} cannot also be a teacher or the anchor")
        if config.drop_equal_reward_groups and not rewards:
            raise ValueError("drop_equal_reward_groups needs task rewards")
        route(list(prompts), pool.tasks, config.route, config.task_weights)  # every prompt has a route: fail now
        super().__init__(pipe, pool.policy, student, config)
        self.pool, self.prompts, self.rewards = pool, prompts, dict(rewards or {})

    # ------------------------------------------------------------------------------------------- sampling

    def _draw_train_steps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        candidates = torch.tensor(self.trained_steps, dtype=torch.long)
        k = min(cfg.step_subset or len(candidates), len(candidates))
        rows = [candidates[torch.randperm(len(candidates), generator=generator or self.generator)][:k] for _ in range(n)]
        return torch.stack(rows).to(self.sigmas.device)

    @torch.no_grad()
    def collect(self) -> OPDBatch:
        """Student rollouts of the epoch, routed, with teacher (and anchor) velocities at every trained state."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        order = torch.randperm(len(self.prompts), generator=self.generator)[: cfg.prompts_per_epoch]
        drawn = [self.prompts[i] for i in order.tolist()]
        generator = self._epoch_generator()
        share = self.world.shard(len(drawn))  # every group in a single process
        specs = [drawn[g] for g in share for _ in range(cfg.group_size)]
        group_ids = torch.tensor(list(share), dtype=torch.long).repeat_interleave(cfg.group_size)
        start_time = time.perf_counter()
        parts, images, pending = [], [], []
        pool = ThreadPoolExecutor(cfg.reward_workers) if cfg.reward_workers and self.rewards else None
        with pool or nullcontext():
            for start in range(0, len(specs), cfg.batch_size):
                chunk = specs[start : start + cfg.batch_size]
                cond, uncond = self._conditioning(chunk)
                size = cfg.resolution or None
                noise = initial_noise(self.pipe, len(chunk), generator=generator, height=size, width=size)
                rollout = sample(
                    lambda x, t: self._velocity(x, t, cond, uncond), noise, self.sigmas, kind=cfg.kind,
                    noise_level=cfg.noise_level, generator=generator, logprob_reduce=cfg.logprob_reduce,
                )
                chunk_images = decode(self.pipe, rollout.latents[:, -1])
                parts.append(rollout)
                images.append(chunk_images)
                pending.append({name: _submit(pool, fn, chunk_images, chunk) for name, fn in self.rewards.items()})
            scores = {name: torch.cat([_scores(p[name].result(), name, len(i)) for p, i in zip(pending, images)])
                      for name in self.rewards}
        self._sample_seconds = time.perf_counter() - start_time
        rollout = Rollout(
            latents=torch.cat([p.latents for p in parts]), log_probs=torch.cat([p.log_probs for p in parts]),
            sigmas=self.sigmas, kind=cfg.kind, noise_level=cfg.noise_level, logprob_reduce=cfg.logprob_reduce,
            sde_steps=parts[0].sde_steps,
        )
        keep = torch.ones(len(specs), dtype=torch.bool)
        if cfg.drop_equal_reward_groups:
            total = sum(scores.values())
            keep = group_advantages(total, group_ids) != 0
        plan = route(specs, self.pool.tasks, cfg.route, cfg.task_weights)
        train_steps = self._draw_train_steps(len(specs), generator)
        targets, anchors = self._targets(rollout, specs, plan, train_steps)
        if self.world.size > 1:  # the logging rewards of the whole epoch (keep above used this share's groups)
            scores = {name: self._gather_groups(r, len(drawn), cfg.group_size) for name, r in scores.items()}
        return OPDBatch(
            prompts=specs, group_ids=group_ids, rollout=rollout, train_steps=train_steps, targets=targets,
            anchors=anchors, keep=keep, plan=plan, images=torch.cat(images), rewards=scores,
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
                                              self.config.batch_size)
        self._target_seconds = time.perf_counter() - start_time
        shape = (n, k, *x.shape[1:])
        return target.reshape(shape), (anchor.reshape(shape) if anchor is not None else None)

    # ------------------------------------------------------------------------------------------- training

    def step_loss(self, batch: OPDBatch, rows: torch.Tensor, k: int):
        """:class:`~flowopd_core.opd.DistillLoss` of trained step column ``k`` of the samples ``rows`` ``(b,)``,
        with the student re-evaluated (with grad) at the stored states."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        steps = batch.train_steps[rows, k]
        sub = Rollout(
            latents=batch.rollout.latents[rows], log_probs=batch.rollout.log_probs[rows], sigmas=self.sigmas,
            kind=cfg.kind, noise_level=cfg.noise_level, logprob_reduce=cfg.logprob_reduce,
            sde_steps=batch.rollout.sde_steps,
        )
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
            form=cfg.kl_form or None, advantage_clip=cfg.advantage_clip or None,
            v_anchor=batch.anchors[rows, k] if batch.anchors is not None else None,
            anchor_weight=cfg.anchor_weight if batch.anchors is not None else 0.0,
        )

    def _update(self, batch: OPDBatch) -> dict[str, Any]:
        cfg = self.config
        keep = torch.nonzero(batch.keep).flatten()
        order = keep[torch.randperm(len(keep), generator=self._local_generator)]
        log: dict[str, Any] = {key: [] for key in ("loss", "opd", "anchor", "kl", "anchor_kl", "clip", "grad_norm")}
        log.update(first_dev=0.0, trained=len(keep), task_kl={})
        self.skipped_steps = 0
        if cfg.drop_equal_reward_groups and not any(bool(torch.isfinite(r).any()) for r in batch.rewards.values()):
            for _ in range(cfg.updates_per_epoch):  # the rewards pick the groups: nothing scored, nothing to train
                self._skip_step("no finite reward in the epoch")
            log["trained"] = 0
            return log
        n_steps = batch.train_steps.shape[1]
        for update, part in enumerate(self._update_parts(order)):
            micro = part.split(cfg.batch_size) if len(part) else ()  # empty: another process has this part
            self.optimizer.zero_grad(set_to_none=True)
            bad = ""
            for rows in micro:
                for k in range(n_steps):
                    terms = self.step_loss(batch, rows, k)
                    if not torch.isfinite(terms.total):
                        bad = f"OPD loss {terms.total.item()}"
                        break
                    (terms.total / (len(micro) * n_steps)).backward()
                    log["loss"].append(terms.total.item())
                    log["opd"].append(terms.opd.item())
                    log["anchor"].append(terms.anchor.item())
                    log["kl"].append(terms.kl_mean.item())
                    log["clip"].append(terms.clip_fraction.item())
                    if terms.anchor_kl is not None:
                        log["anchor_kl"].append(terms.anchor_kl.mean().item())
                    for i, value in zip(rows.tolist(), terms.kl.tolist()):
                        log["task_kl"].setdefault(batch.prompts[i].task, []).append(value)
                    if update == 0 and terms.ratio is not None:
                        log["first_dev"] = max(log["first_dev"], (terms.ratio - 1).abs().max().item())
                if bad:
                    break
            norm = self._finish_update(len(part), bad)
            if norm is not None:
                log["grad_norm"].append(norm)
        self.optimizer.zero_grad(set_to_none=True)
        if self.world.size > 1:  # per-task KL of the whole epoch: one list per task tag of the prompt set
            for task in sorted({p.task for p in self.prompts}):
                log[f"task_kl/{task}"] = log["task_kl"].pop(task, [])
            tasks = [k for k in log if k.startswith("task_kl/")]
            self._reduce_log(log, ("loss", "opd", "anchor", "kl", "anchor_kl", "clip", *tasks), ("first_dev",),
                             ("trained",))
            log["task_kl"] = {k.removeprefix("task_kl/"): log.pop(k) for k in tasks if log[k]}
        return log

    def epoch(self) -> OPDEpochMetrics:
        start = time.perf_counter()
        batch = self.collect()
        sampled = time.perf_counter()
        log = self._update(batch)
        done = time.perf_counter()
        metrics = OPDEpochMetrics(
            epoch=self.epoch_index,
            kl=_mean(log["kl"]),
            kl_by_task={task: _mean(values) for task, values in sorted(log["task_kl"].items())},
            anchor_kl=_mean(log["anchor_kl"]),
            loss=_mean(log["loss"]),
            opd_loss=_mean(log["opd"]),
            anchor_loss=_mean(log["anchor"]),
            clip_fraction=_mean(log["clip"]),
            first_update_ratio_dev=log["first_dev"],
            grad_norm=_mean(log["grad_norm"]),
            trained_samples=log["trained"],
            reward_mean={name: _nan_stats(r)[0] for name, r in batch.rewards.items()},
            optimizer_steps=self.optimizer_steps,
            skipped_steps=self.skipped_steps,
            sample_seconds=self._sample_seconds,
            target_seconds=self._target_seconds,
            train_seconds=done - sampled,
            seconds=done - start,
        )
        self.epoch_index += 1
        return metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
