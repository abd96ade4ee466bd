"""Shared machinery of the trainers that optimise ONE LoRA adapter of a :class:`~flowopd_core.models.policy.Policy` by
sampling epochs (Flow-GRPO teachers, the Flow-OPD student): adapter creation, AdamW over the adapter's LoRA
parameters only, EMA of the LoRA weights, the trainer's own random generator, CFG velocities with the text
cache, the epoch loop, and exact, atomic checkpoints (safetensors + JSON only).

The settings every trainer shares are :class:`~flowopd_core.training.config.TrainerConfig`. A subclass
implements :meth:`LoraTrainer.collect` (the epoch's rollouts, with :meth:`LoraTrainer.rollout_and_score`),
``_update`` (its optimizer steps, with :meth:`LoraTrainer._optimise`) and ``_metrics``, and names its checkpoint
format ``STATE_FORMAT``. Everything random must come from ``self.generator`` (its state is checkpointed): then a
resumed run repeats the uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from flowopd_core.models.pipeline import (
    TextEmbeddingCache,
    TextEmbeddings,
    decode,
    initial_noise,
    resolve_precision,
    velocity,
)
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.sampling.samplers import Rollout, flow_sigmas, noisy_steps, sample
from flowopd_core.training.checkpoint import read_checkpoint, write_checkpoint
from flowopd_core.training.config import TrainerConfig, lr_factor, use_checkpointing
from flowopd_core.training.distributed import World
from flowopd_core.training.ema import EMA


@dataclass
class TrainerState:
    """A checkpoint: ``tensors`` (LoRA, EMA, optimizer moments, generator state as uint8) for safetensors and
    ``meta`` (format, epoch, step counts, config, optimizer hyper-parameters) for JSON."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


RewardFn = Callable[[torch.Tensor, Sequence[PromptSpec]], RewardResult]
"""``reward(images (B, 3, H, W) in [0, 1], prompts) -> RewardResult`` (flowopd_core.rewards contract)."""


def submit_reward(pool: ThreadPoolExecutor | None, fn: RewardFn, images: torch.Tensor,
                  prompts: list[PromptSpec]) -> Future:
    """Score ``images`` with ``fn`` in ``pool`` (concurrently with the caller) or now, as a completed future."""
    if pool is not None:
        return pool.submit(fn, images, prompts)
    future: Future = Future()
    future.set_result(fn(images, prompts))
    return future


def reward_scores(result: RewardResult, name: str, batch: int) -> torch.Tensor:
    """The ``(batch,)`` float32 CPU scores of reward ``name``'s result (NaN = unscored); raises on a reward that
    breaks the contract."""
    if not isinstance(result, RewardResult) or tuple(result.scores.shape) != (batch,):
        got = tuple(result.scores.shape) if isinstance(result, RewardResult) else type(result).__name__
        raise ValueError(f"reward {name!r} must return a RewardResult with ({batch},) scores, got {got}")
    return result.scores.detach().to(torch.float32).cpu()


def nan_stats(values: torch.Tensor) -> tuple[float, float]:
    """(mean, population std) of the finite entries of ``values``; (NaN, NaN) when there is none."""
    finite = values[torch.isfinite(values)].double()
    if not finite.numel():
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(correction=0))


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean of ``values``; NaN for an empty list (an epoch that trained nothing)."""
    return sum(values) / len(values) if values else math.nan


@dataclass
class TrainerMetrics:
    """What every trainer's epoch reports (the trainers' metrics extend it). Means are over the epoch's trained
    (micro-batch, step) terms; NaN when nothing was trained.

    loss: mean total loss; grad_norm: mean pre-clip gradient norm; clip_fraction: mean fraction of policy
    ratios outside the PPO clip (0 for losses without one); first_update_ratio_dev: max |rho - 1| in the
    epoch's first optimizer step (before it, the policy is the sampler: 0 when re-evaluation reproduces
    sampling exactly); trained_samples: samples trained on; optimizer_steps: total since the start;
    skipped_steps: steps of this epoch not taken for non-finite values (``max_bad_steps``); sample_seconds,
    train_seconds, seconds: wall time of the rollouts, the update and the epoch.
    """

    epoch: int
    loss: float
    grad_norm: float
    clip_fraction: float
    first_update_ratio_dev: float
    trained_samples: int
    optimizer_steps: int
    skipped_steps: int
    sample_seconds: float
    train_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Rollouts:
    """This process's share of one epoch's on-policy samples, scored.

    prompts: n ``PromptSpec``, group by group (each drawn prompt ``group_size`` times); group_ids: ``(n,)`` long,
    the group (= index of the drawn prompt in the epoch) of each sample; rollout: the trajectories, latents
    ``(n, T+1, C, H, W)`` and log-probs ``(n, T)``; images: ``(n, 3, H, W)`` in [0, 1]; scores: reward name ->
    ``(n,)`` float32 (NaN = unscored); groups: the epoch's drawn prompts (all processes).
    """

    prompts: list[PromptSpec]
    group_ids: torch.Tensor
    rollout: Rollout
    images: torch.Tensor
    scores: dict[str, torch.Tensor]
    groups: int


STATE_TENSORS = "trainer_state.safetensors"
STATE_META = "trainer_state.json"


class LoraTrainer:
    """Trains the LoRA adapter ``adapter_name`` of ``policy`` (on ``pipe.transformer``) epoch by epoch.

    The adapter is created (rank/alpha of the config, zero-init B: starts as the base, A drawn from the
    config's seed) unless it exists, in which case it is trained as it is. Only its LoRA parameters are
    optimised (AdamW); the base and every other adapter stay frozen.
    """

    STATE_FORMAT: ClassVar[str] = ""
    FREE_CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("epochs", "reward_workers", "max_bad_steps")
    """Config fields a checkpoint may differ in (they do not change the results)."""

    def __init__(
        self, pipe: StableDiffusion3Pipeline, policy: Policy, adapter_name: str, config: TrainerConfig
    ) -> None:
        self.pipe, self.policy, self.adapter, self.config = pipe, policy, adapter_name, config
        self.sigmas = flow_sigmas(config.steps, scheduler=pipe.scheduler).to(policy.device)
        noisy = noisy_steps(self.sigmas, config.noise_level, config.kind, config.min_step_std)
        # the steps samples may be trained on: below trainable_steps (train_fraction), noise std >= min_step_std
        self.trained_steps = tuple(j for j in noisy if j < config.trainable_steps)
        if not self.trained_steps:
            raise ValueError(f"no step to train: none of the steps below {config.trainable_steps} (train_fraction) "
                             f"has a transition noise std >= min_step_std {config.min_step_std} (kind "
                             f"{config.kind!r}, noise_level {config.noise_level}, {config.steps} steps)")
        if adapter_name not in policy.adapters:
            with torch.random.fork_rng(devices=[]):  # LoRA A is drawn from the seed, not the global RNG
                torch.manual_seed(config.seed)
                policy.add_adapter(adapter_name, LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha))
        policy.set_active(adapter_name)
        self.precision = resolve_precision(config.precision, policy.device)  # of every model call (autocast)
        self.gradient_checkpointing = use_checkpointing(config.gradient_checkpointing, policy.base_parameters)
        policy.set_gradient_checkpointing(self.gradient_checkpointing)
        self.params = policy.adapter_parameters(adapter_name)
        trainable = policy.trainable_parameters(adapter_name)
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMA(self.params, config.ema_decay, config.ema_every) if config.ema_decay > 0 else None
        self.cache = TextEmbeddingCache(pipe)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._local_generator = self.generator  # this epoch's per-rank draws (see _epoch_generator)
        self.world = World.current()
        if getattr(config, "prompts_per_epoch", self.world.size) < self.world.size:
            raise ValueError(f"prompts_per_epoch {config.prompts_per_epoch} must be >= the {self.world.size} "
                             "processes (each samples a share of the epoch's prompts)")
        self.epoch_index = 0
        self.optimizer_steps = 0
        self.bad_streak = 0  # consecutive skipped optimizer steps (checkpointed)
        self.skipped_steps = 0  # skipped steps of the current epoch (the subclass resets it per epoch)
        self.on_unit: Callable[[str], None] | None = None
        """Called with ``"sample"`` after each sampling batch, ``"step"`` after each optimizer step (taken or
        skipped) and ``"check"`` after each denoising step of a rollout and each backward pass (no unit of
        progress, a point to stop at within seconds): :func:`~flowopd_core.training.fit.fit` uses it for its
        progress bar and stop checks. It may raise to stop training; the unfinished epoch is then lost (this
        trainer is left in the middle of it: resume from a checkpoint)."""

    # ------------------------------------------------------------------------------------------- progress

    EXTRA_UNITS: ClassVar[int] = 0
    """Further :attr:`on_unit` calls per epoch of a subclass (the distiller's teacher pass)."""

    def _tick(self, unit: str) -> None:
        if self.on_unit is not None:
            self.on_unit(unit)

    def units_per_epoch(self) -> int:
        """How many times :attr:`on_unit` is called in one epoch of this process: its sampling batches plus the
        optimizer steps. Exact unless samples are dropped before the update (``drop_zero_advantage``,
        ``drop_equal_reward_groups``) or an epoch is skipped unscored (then fewer)."""
        cfg = self.config
        groups = min(getattr(cfg, "prompts_per_epoch", 1), len(getattr(self, "prompts", ())) or 10**9)
        samples = len(self.world.shard(groups)) * cfg.group_size
        batches = -(-samples // cfg.batch_size)
        steps = cfg.updates_per_epoch if self.world.size > 1 else min(cfg.updates_per_epoch, samples)
        return batches + steps + self.EXTRA_UNITS

    # ------------------------------------------------------------------------------------------- forwards

    def _conditioning(self, specs: list[PromptSpec]) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        cond = self.cache.encode([p.text for p in specs])
        return cond, (self.cache.negative(len(specs)) if self.config.guidance_scale != 1.0 else None)

    def _velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: TextEmbeddings,
                  uncond: TextEmbeddings | None, adapter_names: list[str] | None = None) -> torch.Tensor:
        return velocity(self.policy, x, t, cond, uncond, self.config.guidance_scale, adapter_names=adapter_names,
                        precision=self.precision)

    def _optimizer_step(self) -> float | None:
        """Clip the gradient norm (``config.grad_clip``, 0 = none), step AdamW and the EMA; returns the pre-clip
        norm. A non-finite norm skips the step instead (:meth:`_skip_step`) and returns None."""
        norm = torch.nn.utils.clip_grad_norm_(
            list(self.params.values()), getattr(self.config, "grad_clip", 0) or float("inf")
        )
        if not torch.isfinite(norm):
            self._skip_step(f"gradient norm {float(norm)}")
            return None
        if self.config.lr_schedule != "constant":  # constant: the optimizer's lr is never touched
            factor = lr_factor(self.config.lr_schedule, self.optimizer_steps,
                               self.config.epochs * self.config.updates_per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr * factor
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.params, self.optimizer_steps)
        self.optimizer_steps += 1
        self.bad_streak = 0
        return float(norm)

    def _skip_step(self, why: str) -> None:
        """Do not take this optimizer step (a non-finite loss, gradient norm or an epoch without one finite
        reward): the gradients are dropped, parameters, optimizer and EMA stay as they are; counted in
        ``skipped_steps``. After ``config.max_bad_steps`` consecutive skipped steps raise FloatingPointError."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_streak += 1
        limit = getattr(self.config, "max_bad_steps", 1)
        if self.bad_streak >= limit:
            raise FloatingPointError(
                f"{self.bad_streak} consecutive optimizer steps skipped for non-finite values at epoch "
                f"{self.epoch_index} (last: {why}; max_bad_steps = {limit})"
            )

    # ------------------------------------------------------------------------------------------- rollouts

    @torch.no_grad()
    def rollout_and_score(
        self,
        drawn: Sequence[PromptSpec],
        rewards: Mapping[str, RewardFn],
        generator: torch.Generator,
        *,
        sde_window: Sequence[int] | None = None,
        same_initial_noise: bool = False,
    ) -> Rollouts:
        """Sample ``group_size`` trajectories of this process's share of the ``drawn`` prompts with the active
        adapter (SDE / CPS with per-step log-probs; Flow-GRPO-Fast with ``sde_window``), ``batch_size`` at a
        time, and score each decoded batch with ``rewards`` in a thread pool while the next batch samples.
        ``same_initial_noise``: a group's samples start from one x_T. All draws come from ``generator``."""
        cfg = self.config
        share = self.world.shard(len(drawn))  # every group in a single process
        specs = [drawn[g] for g in share for _ in range(cfg.group_size)]
        group_ids = torch.tensor(list(share), dtype=torch.long).repeat_interleave(cfg.group_size)
        size = cfg.resolution or None
        shared = None
        if same_initial_noise:  # one draw per group, repeated over its samples
            shared = initial_noise(self.pipe, len(share), generator=generator, height=size, width=size)
            shared = shared.repeat_interleave(cfg.group_size, dim=0)
        parts: list[Rollout] = []
        images: list[torch.Tensor] = []
        pending: list[dict[str, Future]] = []
        pool = ThreadPoolExecutor(cfg.reward_workers) if cfg.reward_workers and rewards else None
        with pool or nullcontext():
            for start in range(0, len(specs), cfg.batch_size):
                chunk = specs[start : start + cfg.batch_size]
                cond, uncond = self._conditioning(chunk)
                if shared is None:
                    noise = initial_noise(self.pipe, len(chunk), generator=generator, height=size, width=size)
                else:
                    noise = shared[start : start + len(chunk)]
                parts.append(sample(
                    lambda x, t: self._velocity(x, t, cond, uncond),  # noqa: B023  (called within this iteration)
                    noise, self.sigmas, kind=cfg.kind, noise_level=cfg.noise_level, generator=generator,
                    sde_window=sde_window, logprob_reduce=cfg.logprob_reduce,
                    progress=lambda j, steps: self._tick("check"),
                ))
                images.append(decode(self.pipe, parts[-1].latents[:, -1]))
                pending.append({name: submit_reward(pool, fn, images[-1], chunk) for name, fn in rewards.items()})
                self._tick("sample")
            scores = {name: torch.cat([reward_scores(p[name].result(), name, len(i)) for p, i in zip(pending, images)])
                      for name in rewards}
        rollout = Rollout(
            latents=torch.cat([p.latents for p in parts]), log_probs=torch.cat([p.log_probs for p in parts]),
            sigmas=self.sigmas, kind=cfg.kind, noise_level=cfg.noise_level, logprob_reduce=cfg.logprob_reduce,
            sde_steps=parts[0].sde_steps,
        )
        return Rollouts(prompts=specs, group_ids=group_ids, rollout=rollout, images=torch.cat(images),
                        scores=scores, groups=len(drawn))

    def draw_train_steps(self, n: int, sde_steps: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``(n, K)`` trained steps per sample: the drawn-with-SDE steps among :attr:`trained_steps` (a random
        subset of ``step_subset`` of them), in a random order per sample with ``shuffle_steps``."""
        cfg = self.config
        candidates = torch.tensor([j for j in sde_steps if j in self.trained_steps], dtype=torch.long)
        k = min(cfg.step_subset or len(candidates), len(candidates))
        rows = []
        for _ in range(n):
            pick = candidates
            if cfg.shuffle_steps or k < len(candidates):
                pick = candidates[torch.randperm(len(candidates), generator=generator)][:k]
            rows.append(pick if cfg.shuffle_steps else pick.sort().values)
        return torch.stack(rows).to(self.sigmas.device)

    # ------------------------------------------------------------------------------------------- data parallel

    def _epoch_generator(self) -> torch.Generator:
        """The generator of this epoch's per-rank draws (initial and SDE noise, trained steps, shuffles): the
        shared one in a single process; with several processes a fresh one per rank, seeded from one draw of
        the shared generator (which so stays in step on every rank: a resumed run redraws the same)."""
        if self.world.size == 1:
            self._local_generator = self.generator
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._local_generator = torch.Generator(self.generator.device).manual_seed(seed + self.world.rank)
        return self._local_generator

    def _gather_groups(self, values: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
        """``values`` ``(local samples, ...)`` of this rank's share of ``groups`` groups -> the whole epoch's
        ``(groups * group_size, ...)`` in group order, on every rank (identity in a single process)."""
        return self.world.all_gather_cat(values, self.world.shard_sizes(groups, group_size))

    def _update_parts(self, order: torch.Tensor) -> list[torch.Tensor]:
        """The epoch's optimizer-step parts of the shuffled (local) samples ``order``: the non-empty ones of
        ``updates_per_epoch`` in a single process; all of them with several processes (a part may be empty on
        one rank: every rank still takes part in each step)."""
        parts = order.tensor_split(self.config.updates_per_epoch)
        return list(parts) if self.world.size > 1 else [p for p in parts if len(p)]

    def _finish_update(self, samples: int, bad: str) -> float | None:
        """After one part's backward passes (``samples`` of this rank's samples; ``bad``: why this rank's loss
        is unusable, "" if it is fine): average the gradients over the ranks (weighted by samples), then step
        or skip. Returns the pre-clip gradient norm, None if no step was taken."""
        if self.world.size > 1:
            grads = [p.grad if p.grad is not None and not bad else torch.zeros_like(p) for p in self.params.values()]
            flat = torch.cat([g.detach().reshape(-1).float() for g in grads]) * samples
            extra = torch.tensor([float(samples), float(bool(bad))], device=flat.device)
            total = self.world.all_reduce(torch.cat([flat, extra]))
            count, bad_ranks = float(total[-2]), float(total[-1])
            if bad_ranks:
                return self._skip_step(bad or "a non-finite loss on another process")
            if count == 0:  # no process had samples in this part (a single process skips such parts)
                self.optimizer.zero_grad(set_to_none=True)
                return None
            mean = total[:-2] / count
            offset = 0
            for p in self.params.values():
                p.grad = mean[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()
        elif bad:
            return self._skip_step(bad)
        return self._optimizer_step()

    def _reduce_log(self, log: dict[str, Any], means: Sequence[str], maxes: Sequence[str] = (),
                    sums: Sequence[str] = ()) -> None:
        """With several processes, turn ``log``'s per-rank lists ``means`` into one-element lists holding the
        mean over all ranks (empty if no rank has a value), ``maxes`` / ``sums`` (numbers) into their max / sum
        over ranks: the epoch metrics are then the whole epoch's and the same on every rank."""
        if self.world.size == 1:
            return
        flat = [float(v) for key in means for v in (sum(log[key]), len(log[key]))] + [float(log[k]) for k in sums]
        total = self.world.all_reduce(torch.tensor(flat, dtype=torch.float64)).tolist()
        for i, key in enumerate(means):
            value, count = total[2 * i], total[2 * i + 1]
            log[key] = [value / count] if count else []
        for i, key in enumerate(sums):
            log[key] = type(log[key])(total[2 * len(means) + i])
        if maxes:
            top = self.world.all_reduce(torch.tensor([float(log[k]) for k in maxes], dtype=torch.float64), "max")
            for key, value in zip(maxes, top.tolist()):
                log[key] = value

    # ------------------------------------------------------------------------------------------- loop

    LOSS_NAME: ClassVar[str] = "training"
    """Named in the reason of a step skipped for a non-finite loss."""

    def collect(self) -> Any:
        """The epoch's rollouts (no grad, current adapter) and what the update needs of them."""
        raise NotImplementedError

    def _update(self, batch: Any) -> dict[str, Any]:
        """The epoch's optimizer steps on ``batch``; returns the logging lists for :meth:`_metrics`."""
        raise NotImplementedError

    def _metrics(self, batch: Any, log: dict[str, Any], sample_seconds: float, train_seconds: float) -> Any:
        """The epoch's metrics (a dataclass) from its batch and update log."""
        raise NotImplementedError

    def _common_metrics(self, log: dict[str, Any], sample_seconds: float, train_seconds: float) -> dict[str, Any]:
        """The :class:`TrainerMetrics` fields of an epoch from its update log (lists ``loss``, ``grad_norm``,
        ``clip_fraction``; numbers ``first_dev``, ``trained``)."""
        return dict(
            epoch=self.epoch_index, loss=mean_or_nan(log["loss"]), grad_norm=mean_or_nan(log["grad_norm"]),
            clip_fraction=mean_or_nan(log["clip_fraction"]), first_update_ratio_dev=log["first_dev"],
            trained_samples=log["trained"], optimizer_steps=self.optimizer_steps, skipped_steps=self.skipped_steps,
            sample_seconds=sample_seconds, train_seconds=train_seconds, seconds=sample_seconds + train_seconds,
        )

    def epoch(self) -> Any:
        """One sampling epoch plus its optimizer steps; advances ``epoch_index``; returns its metrics."""
        start = time.perf_counter()
        batch = self.collect()
        sampled = time.perf_counter()
        log = self._update(batch)
        metrics = self._metrics(batch, log, sampled - start, time.perf_counter() - sampled)
        self.epoch_index += 1
        return metrics

    def _skip_unscored_epoch(self, rewards: Mapping[str, torch.Tensor]) -> bool:
        """True (and every optimizer step of the epoch skipped) when no reward scored any sample: an epoch
        whose training signal comes from the rewards has none."""
        if any(bool(torch.isfinite(r).any()) for r in rewards.values()):
            return False
        for _ in range(self.config.updates_per_epoch):
            self._skip_step("no finite reward in the epoch")
        return True

    def _optimise(self, order: torch.Tensor, steps_per_sample: int, loss: Callable[[torch.Tensor, int], Any],
                  record: Callable[[Any, torch.Tensor, int], None]) -> list[float]:
        """``updates_per_epoch`` optimizer steps over this process's shuffled samples ``order`` ``(n,)``.

        Each step's part is split into micro-batches of ``batch_size`` samples; for each micro-batch and
        trained-step column k, ``loss(rows, k)`` returns the terms of that step (a ``total`` 0-dim loss with
        grad); the mean over the part's terms is back-propagated and ``record(terms, rows, update)`` logs a
        finite one. A non-finite loss skips the step (:meth:`_skip_step`). Returns the pre-clip gradient norms
        of the steps taken."""
        norms = []
        for update, part in enumerate(self._update_parts(order)):
            micro = part.split(self.config.batch_size) if len(part) else ()  # empty: another process has this part
            self.optimizer.zero_grad(set_to_none=True)
            bad = ""
            for rows in micro:
                for k in range(steps_per_sample):
                    terms = loss(rows, k)
                    if not torch.isfinite(terms.total):
                        bad = f"{self.LOSS_NAME} loss {terms.total.item()}"
                        break
                    (terms.total / (len(micro) * steps_per_sample)).backward()
                    record(terms, rows, update)
                    self._tick("check")
                if bad:
                    break
            norm = self._finish_update(len(part), bad)
            if norm is not None:
                norms.append(norm)
            self._tick("step")
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    def train(self, callback: Callable[[Any], bool | None] | None = None) -> list[Any]:
        """Run epochs until ``config.epochs`` (counting resumed ones); ``callback(metrics)`` after each (e.g. to
        log or checkpoint) may return True to stop early."""
        history = []
        while self.epoch_index < self.config.epochs:
            history.append(self.epoch())
            if callback is not None and callback(history[-1]):
                break
        return history

    # ------------------------------------------------------------------------------------------- EMA, adapter

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA LoRA weights by peft parameter name (the live weights when EMA is off); copies."""
        if self.ema is None:
            return {name: p.detach().clone() for name, p in self.params.items()}
        return self.ema.state_dict()

    @contextmanager
    def use_ema(self) -> Iterator[None]:
        """Inside the block the adapter holds its EMA weights (for evaluation); restored afterwards."""
        with self.ema.swapped_in(self.params) if self.ema is not None else nullcontext():
            yield

    def save_adapter(self, directory: str | Path, ema: bool = True) -> Path:
        """Write the adapter (EMA weights by default) in peft's format (see :meth:`Policy.save_adapter`)."""
        with self.use_ema() if ema else nullcontext():
            return self.policy.save_adapter(self.adapter, directory)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> TrainerState:
        """Everything a resumed run needs (between epochs): LoRA, optimizer, EMA, generator, counters, config."""
        tensors = {f"lora/{name}": p.detach().clone() for name, p in self.params.items()}
        if self.ema is not None:
            tensors.update({f"ema/{name}": t for name, t in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        names = {index[id(p)]: name for name, p in self.params.items()}
        scalars: dict[str, dict[str, Any]] = {}
        for i, entry in optim["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{names[i]}/{key}"] = value.detach().clone()
                else:
                    scalars.setdefault(names[i], {})[key] = value
        tensors["rng/generator"] = self.generator.get_state()
        meta = {
            "format": self.STATE_FORMAT,
            "adapter": self.adapter,
            "epoch": self.epoch_index,
            "optimizer_steps": self.optimizer_steps,
            "bad_streak": self.bad_streak,
            "world_size": self.world.size,
            "config": self.config.to_json(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]],
            "optimizer_scalars": scalars,
        }
        return TrainerState(tensors=tensors, meta=json.loads(json.dumps(meta)))

    def load_state_dict(self, state: TrainerState) -> None:
        """Restore a :meth:`state_dict`. The config must match except ``FREE_CONFIG_KEYS`` (they do not change
        the results); the adapter's parameter names must be the same."""
        meta, tensors = state.meta, state.tensors
        if meta.get("format") != self.STATE_FORMAT:
            raise ValueError(
                f"not a {type(self).__name__} state: format {meta.get('format')!r} (want {self.STATE_FORMAT!r})"
            )
        current = self.config.to_json()
        defaults = {f.name: f.default for f in dataclasses.fields(self.config) if f.default is not dataclasses.MISSING}
        # a setting added since the state was saved compares as its default (the behaviour the run had)
        saved = {**{k: v for k, v in defaults.items() if k in current and k not in meta["config"]}, **meta["config"]}
        free = self.FREE_CONFIG_KEYS
        diff = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
        if diff:
            raise ValueError(f"trainer state was saved with a different config: {diff}")
        lora = {k.removeprefix("lora/"): v for k, v in tensors.items() if k.startswith("lora/")}
        if set(lora) != set(self.params):
            raise KeyError(f"saved LoRA parameters differ from adapter {self.adapter!r}'s")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(lora[name])
        if self.ema is not None:
            self.ema.load_state_dict({k.removeprefix("ema/"): v for k, v in tensors.items() if k.startswith("ema/")})
        order = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        optim_state: dict[int, dict[str, Any]] = {}
        for name, p in self.params.items():
            entry = {key.rsplit("/", 1)[1]: v for key, v in tensors.items() if key.startswith(f"optimizer/{name}/")}
            entry.update(meta["optimizer_scalars"].get(name, {}))
            if entry:
                optim_state[order[id(p)]] = entry
        groups = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in meta["param_groups"]]
        for group, live in zip(groups, self.optimizer.state_dict()["param_groups"]):
            group["params"] = live["params"]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        self.generator.set_state(tensors["rng/generator"])
        self.epoch_index = int(meta["epoch"])
        self.optimizer_steps = int(meta["optimizer_steps"])
        self.bad_streak = int(meta.get("bad_streak", 0))



def state_files(state: TrainerState) -> dict[str, bytes]:
    """``state`` as checkpoint files: ``trainer_state.safetensors`` (tensors) and ``trainer_state.json`` (meta)."""
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    return {
        STATE_TENSORS: safetensors_save(tensors, metadata={"format": "pt"}),
        STATE_META: json.dumps(state.meta, indent=1).encode(),
    }


def state_from_files(files: Mapping[str, bytes]) -> TrainerState:
    """The inverse of :func:`state_files` (extra files are ignored)."""
    missing = [name for name in (STATE_TENSORS, STATE_META) if name not in files]
    if missing:
        raise KeyError(f"not a trainer state: {missing} missing")
    return TrainerState(tensors=safetensors_load(files[STATE_TENSORS]), meta=json.loads(files[STATE_META]))


def save_trainer_state(state: TrainerState, directory: str | Path) -> Path:
    """Write ``state`` into the checkpoint folder ``directory`` (atomic, with a verified manifest: see
    :mod:`flowopd_core.training.checkpoint`); an existing ``directory`` is replaced."""
    return write_checkpoint(directory, state_files(state), epoch=int(state.meta.get("epoch", 0)))


def load_trainer_state(directory: str | Path) -> TrainerState:
    """Read and verify a state written by :func:`save_trainer_state` (raises
    :class:`~flowopd_core.training.checkpoint.CheckpointError` for a broken or partial one)."""
    return state_from_files(read_checkpoint(directory).files)
