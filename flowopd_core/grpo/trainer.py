"""Flow-GRPO trainer: single- and multi-reward GRPO of a LoRA adapter on a flow-matching model (docs/method.md §2).

Notation (docs/method.md): time t = scheduler sigma, t = 1 is noise; a step j goes from t_j to t_{j+1} < t_j
with dt = t_{j+1} - t_j < 0; sigma_t = a sqrt(t / (1 - t)); s = sigma_t sqrt(|dt|) is the per-element std of
the SDE transition; D = elements of one latent; G = group size (samples per prompt); N = samples per epoch.

One epoch (:meth:`GRPOTrainer.epoch`):

1. Rollouts (no grad, adapter enabled = on-policy): ``prompts_per_epoch`` prompts x G samples, SDE (or CPS)
   sampling with per-step log-probs (§1); rewards are scored in a thread pool while the next rollout batch
   samples (:meth:`~flowopd_core.training.base.LoraTrainer.rollout_and_score`, shared with Flow-OPD).
2. Advantages (§2): A_i = (r_i - mean_group) / (std + 1e-4), optional global std, clamped to +-5; several
   rewards are combined by :func:`~flowopd_core.grpo.loss.multi_reward_advantages` (raw weighted sum or
   normalise-then-weight).
3. ``updates_per_epoch`` AdamW steps. Samples are shuffled and split into that many parts; each part
   accumulates, over its samples and its trained steps j, the per-step loss
   L_j = mean_i max(-A_i rho_ij, -A_i clip(rho_ij, 1 - eps, 1 + eps)) + beta KL_j(pi_theta || pi_ref),
   rho_ij = exp(logp_theta - logp_old), with log-probs re-evaluated on the stored transitions and the
   reference means from the same network with the adapter disabled (one extra no-grad forward per step).
   Gradient-norm clipping, then an EMA of the LoRA weights (decay 0.9 every 8 optimizer steps).

Everything random (prompt choice, noise, SDE noise, shuffles, step subsets, windows) comes from one
``torch.Generator`` owned by the trainer, whose state is part of :meth:`GRPOTrainer.state_dict`: a resumed
run repeats the uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.grpo.config import GRPOConfig as GRPOConfig
from flowopd_core.grpo.config import parse_window_range as parse_window_range
from flowopd_core.grpo.loss import (
    PPOLoss,
    group_best,
    kl_to_reference,
    multi_reward_advantages,
    ppo_clip_loss,
)
from flowopd_core.models.policy import Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.sampling.samplers import Rollout, transition_logprob
from flowopd_core.training.base import LoraTrainer, RewardFn, TrainerMetrics, mean_or_nan, nan_stats
from flowopd_core.training.draws import balanced_draw, small_strata, template_strata

# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GRPOBatch:
    """One sampling epoch: N = prompts x G samples, ordered group by group.

    prompts: N ``PromptSpec``; group_ids: ``(N,)`` long, the group (= prompt draw) of each sample.
    rollout: the trajectories, latents ``(N, T+1, C, H, W)`` (visited states) and log_probs ``(N, T)``
    (log pi_old of each transition); its sde_steps: the steps drawn with the SDE (all, or the Flow-GRPO-Fast
    window). images: ``(N, 3, H, W)`` in [0, 1]; rewards: name -> ``(N,)`` raw scores (NaN = unscored).
    advantages: ``(N,)``; train_steps: ``(N, K)`` long, each sample's trained steps in training order.
    With several processes the batch holds this rank's share of the groups (group_ids stay the epoch's);
    epoch_rewards / epoch_advantages / epoch_group_ids are the whole epoch's (None in a single process).
    """

    prompts: list[PromptSpec]
    group_ids: torch.Tensor
    rollout: Rollout
    images: torch.Tensor
    rewards: dict[str, torch.Tensor]
    advantages: torch.Tensor
    train_steps: torch.Tensor
    epoch_rewards: dict[str, torch.Tensor] | None = None
    epoch_advantages: torch.Tensor | None = None
    epoch_group_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class StepLoss:
    """Loss of one trained step of a micro-batch: ``total`` (0-dim, with grad) = ppo.loss + beta mean(kl);
    ``kl``: ``(b,)`` detached KL to the reference in ``kl_form`` (None when beta = 0)."""

    total: torch.Tensor
    ppo: PPOLoss
    kl: torch.Tensor | None


@dataclass
class EpochMetrics(TrainerMetrics):
    """What one GRPO epoch did: :class:`~flowopd_core.training.base.TrainerMetrics` plus

    reward_mean / reward_std: per reward, NaN-aware over the epoch's samples; reward_best: per reward, the mean
    over groups of each group's best sample (:func:`~flowopd_core.grpo.loss.group_best`); unscored: samples that
    no reward scored; groups; zero_std_groups: groups whose advantages are all 0 (identical rewards: no signal);
    policy_loss: the mean PPO term; kl: mean KL to the reference (``kl_form``), NaN when beta = 0; approx_kl:
    Flow-GRPO's diagnostic; sde_steps: the steps drawn with the SDE. When every group is flat (all advantages 0)
    nothing is trained: the loss terms are NaN and no step is taken.
    """

    reward_mean: dict[str, float]
    reward_std: dict[str, float]
    reward_best: dict[str, float]
    unscored: int
    groups: int
    zero_std_groups: int
    policy_loss: float
    kl: float
    approx_kl: float
    sde_steps: tuple[int, ...]


STATE_FORMAT = "flowopd-grpo-state/1"


class GRPOTrainer(LoraTrainer):
    """Flow-GRPO on the LoRA adapter ``adapter_name`` of ``policy`` (see the module doc for one epoch).

    pipe: the pipeline whose ``transformer`` the policy wraps (text encoders, scheduler sigmas, decode).
    policy: a :class:`Policy` on ``pipe.transformer``; the adapter is created (rank/alpha of the config,
    zero-init B: starts as the base) unless it exists, in which case it is trained as it is.
    rewards: name -> reward callable (``flowopd_core.rewards`` contract); config.reward_weights by name.
    prompts: the training prompts; each epoch draws ``prompts_per_epoch`` of them.
    Only the adapter's LoRA parameters are optimised (AdamW); the base stays frozen.
    """

    STATE_FORMAT = STATE_FORMAT
    LOSS_NAME = "GRPO"

    def __init__(
        self,
        pipe: StableDiffusion3Pipeline,
        policy: Policy,
        adapter_name: str,
        rewards: Mapping[str, RewardFn],
        config: GRPOConfig = GRPOConfig(),
        prompts: PromptSet | None = None,
    ) -> None:
        if not rewards:
            raise ValueError("GRPOTrainer needs at least one reward")
        unknown = sorted(set(config.reward_weights) - set(rewards))
        if unknown:
            raise KeyError(f"reward_weights name unknown rewards {unknown}; rewards: {sorted(rewards)}")
        if not any(config.reward_weights.get(name, 1.0) for name in rewards):
            raise ValueError(f"every reward weighs 0 ({config.reward_weights}): the advantages would all be 0 and "
                             "nothing would train; give the training reward a non-zero weight")
        if prompts is None or len(prompts) == 0:
            raise ValueError("GRPOTrainer needs a non-empty PromptSet")
        pools = [prompts.by_task(task) for task in prompts.tasks] if config.task_cycling else [prompts]
        strata = [template_strata(pool) for pool in pools] if config.balance_templates else None
        if strata is None:
            small = [(pool.name, len(pool)) for pool in pools if len(pool) < config.prompts_per_epoch]
        else:  # every category must hold its share (rounded up) of an epoch's prompts
            small = [(f"{pool.name}:{name}", size) for pool, by_name in zip(pools, strata)
                     for name, size in small_strata(by_name, config.prompts_per_epoch).items()]
        if small:
            raise ValueError(f"prompts_per_epoch {config.prompts_per_epoch} exceeds the prompts available: {small}")
        super().__init__(pipe, policy, adapter_name, config)
        self.rewards = dict(rewards)
        self.prompts = prompts
        self._pools = pools
        self._strata = strata  # per pool: category -> prompt indices (balance_templates), else None
        if config.sde_window:  # every window the trainer may draw must hold a step to train
            lo, hi = config.window_bounds
            for start in range(lo, hi - config.sde_window + 1):
                if not any(start <= j < start + config.sde_window for j in self.trained_steps):
                    raise ValueError(f"no step to train in the window {start}..{start + config.sde_window - 1}: "
                                     f"the trained steps are {list(self.trained_steps)} (train_fraction, min_step_std)")

    # ------------------------------------------------------------------------------------------- sampling

    def _draw_prompts(self) -> list[PromptSpec]:
        which = self.epoch_index % len(self._pools)
        pool, n = self._pools[which], self.config.prompts_per_epoch
        if self._strata is not None:
            return [pool[i] for i in balanced_draw(self._strata[which], n, self.epoch_index, self.generator)]
        order = torch.randperm(len(pool), generator=self.generator)[:n]
        return [pool[i] for i in order.tolist()]

    def _draw_window(self) -> tuple[int, ...] | None:
        width = self.config.sde_window
        if not width:
            return None
        lo, hi = self.config.window_bounds
        start = lo + int(torch.randint(0, hi - lo - width + 1, (1,), generator=self.generator))
        return tuple(range(start, start + width))

    @torch.no_grad()
    def collect(self) -> GRPOBatch:
        """Sample the epoch's rollouts with the current adapter, score them and compute advantages (no update)."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        drawn = self._draw_prompts()
        window = self._draw_window()
        generator = self._epoch_generator()
        out = self.rollout_and_score(drawn, self.rewards, generator, sde_window=window,
                                     same_initial_noise=cfg.same_initial_noise)
        epoch_scores = {name: self._gather_groups(r, len(drawn), cfg.group_size) for name, r in out.scores.items()}
        epoch_ids = torch.arange(len(drawn)).repeat_interleave(cfg.group_size)
        advantages = multi_reward_advantages(  # over the whole epoch (identical on every process)
            epoch_scores, epoch_ids, cfg.reward_weights, cfg.reward_mode, global_std=cfg.global_std, eps=cfg.adv_eps,
            clip=cfg.adv_clip,
        )
        start, stop = (g * cfg.group_size for g in self.world.shard_bounds(len(drawn)))
        device = self.sigmas.device
        several = self.world.size > 1
        return GRPOBatch(
            prompts=out.prompts, group_ids=out.group_ids.to(device), rollout=out.rollout, images=out.images,
            rewards=out.scores, advantages=advantages[start:stop].to(device),
            train_steps=self.draw_train_steps(len(out.prompts), out.rollout.sde_steps, generator),
            epoch_rewards=epoch_scores if several else None,
            epoch_advantages=advantages.to(device) if several else None,
            epoch_group_ids=epoch_ids.to(device) if several else None,
        )

    # ------------------------------------------------------------------------------------------- training

    def _step_terms(self, batch: GRPOBatch, rows: torch.Tensor, steps: torch.Tensor, with_kl: bool) -> StepLoss:
        cfg = self.config
        sub = batch.rollout.subset(rows)
        index = torch.arange(len(rows), device=steps.device)
        cond, uncond = self._conditioning([batch.prompts[i] for i in rows.tolist()])
        x, t = sub.latents[index, steps], self.sigmas[steps]
        step = transition_logprob(sub, steps, self._velocity(x, t, cond, uncond))
        ppo = ppo_clip_loss(step.log_prob, sub.log_probs[index, steps], batch.advantages[rows], cfg.clip_range)
        if not with_kl:
            return StepLoss(total=ppo.loss, ppo=ppo, kl=None)
        with torch.no_grad(), self.policy.disable():
            mean_ref = transition_logprob(sub, steps, self._velocity(x, t, cond, uncond)).mean
        dt = self.sigmas[steps + 1] - t
        kl = kl_to_reference(step.mean, mean_ref, step.std, dt, kind=cfg.kind, form=cfg.kl_form)
        return StepLoss(total=ppo.loss + cfg.beta * kl.mean(), ppo=ppo, kl=kl.detach())

    def step_loss(self, batch: GRPOBatch, rows: torch.Tensor, steps: torch.Tensor) -> StepLoss:
        """Loss of the stored transitions ``steps`` ``(b,)`` (per sample) of the samples ``rows`` ``(b,)``,
        re-evaluated with the current adapter (with grad); KL to the reference when beta > 0."""
        self.policy.set_active(self.adapter)
        return self._step_terms(batch, rows, steps, with_kl=self.config.beta > 0)

    @torch.no_grad()
    def reference_kl(self, batch: GRPOBatch) -> torch.Tensor:
        """KL to the reference (``kl_form``) of every trained transition of ``batch``: ``(N, K)``, no grad."""
        self.policy.set_active(self.adapter)
        out = torch.empty(batch.train_steps.shape, dtype=torch.float32, device=batch.train_steps.device)
        for rows in torch.arange(len(batch), device=out.device).split(self.config.batch_size):
            for k in range(out.shape[1]):
                out[rows, k] = self._step_terms(batch, rows, batch.train_steps[rows, k], with_kl=True).kl.float()
        return out

    def _update(self, batch: GRPOBatch) -> dict[str, Any]:
        """``updates_per_epoch`` optimizer steps on ``batch`` (see the module doc); returns logging lists."""
        cfg = self.config
        keep = torch.arange(len(batch), device=batch.advantages.device)
        if cfg.drop_zero_advantage:
            keep = keep[batch.advantages != 0]
        order = keep[torch.randperm(len(keep), generator=self._local_generator).to(keep.device)]
        log: dict[str, Any] = {k: [] for k in ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl", "grad_norm")}
        log["first_dev"], log["trained"] = 0.0, len(keep)
        self.skipped_steps = 0
        if self._skip_unscored_epoch(batch.epoch_rewards or batch.rewards):
            log["trained"] = 0
            return log
        self.policy.set_active(self.adapter)
        with_kl = cfg.beta > 0

        def loss(rows: torch.Tensor, k: int) -> StepLoss:
            return self._step_terms(batch, rows, batch.train_steps[rows, k], with_kl)

        def record(terms: StepLoss, rows: torch.Tensor, update: int) -> None:
            log["loss"].append(terms.total.item())
            log["policy_loss"].append(terms.ppo.loss.item())
            log["clip_fraction"].append(terms.ppo.clip_fraction.item())
            log["approx_kl"].append(terms.ppo.approx_kl.item())
            if terms.kl is not None:
                log["kl"].append(terms.kl.mean().item())
            if update == 0:
                log["first_dev"] = max(log["first_dev"], (terms.ppo.ratio - 1).abs().max().item())

        log["grad_norm"] = self._optimise(order, batch.train_steps.shape[1], loss, record)
        self._reduce_log(log, ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl"), ("first_dev",), ("trained",))
        return log

    def _metrics(self, batch: GRPOBatch, log: dict[str, Any], sample_seconds: float,
                 train_seconds: float) -> EpochMetrics:
        rewards = batch.epoch_rewards or batch.rewards
        advantages = batch.advantages if batch.epoch_advantages is None else batch.epoch_advantages
        group_ids = batch.group_ids if batch.epoch_group_ids is None else batch.epoch_group_ids
        stats = {name: nan_stats(r) for name, r in rewards.items()}
        scored = torch.stack([torch.isfinite(r) for r in rewards.values()]).any(0)
        groups = int(group_ids.max()) + 1
        nonzero = torch.zeros(groups, device=advantages.device)
        nonzero.index_add_(0, group_ids, (advantages != 0).float())
        return EpochMetrics(
            **self._common_metrics(log, sample_seconds, train_seconds),
            reward_mean={name: s[0] for name, s in stats.items()},
            reward_std={name: s[1] for name, s in stats.items()},
            reward_best={name: group_best(r, group_ids) for name, r in rewards.items()},
            unscored=int((~scored).sum()),
            groups=groups,
            zero_std_groups=int((nonzero == 0).sum()),
            policy_loss=mean_or_nan(log["policy_loss"]),
            kl=mean_or_nan(log["kl"]),
            approx_kl=mean_or_nan(log["approx_kl"]),
            sde_steps=batch.rollout.sde_steps,
        )
