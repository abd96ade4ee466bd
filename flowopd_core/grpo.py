"""Flow-GRPO: single- and multi-reward GRPO of a LoRA adapter on a flow-matching model (shared/docs/method.md §2).

Notation (method.md): time t = scheduler sigma, t = 1 is noise; a step j goes from t_j to t_{j+1} < t_j with
dt = t_{j+1} - t_j < 0; sigma_t = a sqrt(t / (1 - t)); s = sigma_t sqrt(|dt|) is the per-element std of the
SDE transition; D = elements of one latent; G = group size (samples per prompt); N = samples per epoch.

One epoch (:meth:`GRPOTrainer.epoch`):

1. Rollouts (no grad, adapter enabled = on-policy): ``prompts_per_epoch`` prompts x G samples, SDE (or CPS)
   sampling with per-step log-probs (§1); rewards are scored in a thread pool while the next rollout batch
   samples.
2. Advantages (§2): A_i = (r_i - mean_group) / (std + 1e-4), optional global std, clamped to +-5; several
   rewards are combined by :func:`multi_reward_advantages` (raw weighted sum or normalise-then-weight).
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

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.lora_trainer import (  # noqa: F401  (checkpoint helpers re-exported for callers)
    LoraTrainer,
    TrainerState,
    range_errors,
    load_trainer_state,
    save_trainer_state,
)
from flowopd_core.pipeline import decode, initial_noise
from flowopd_core.policy import Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.samplers import (
    LOGPROB_REDUCES,
    STOCHASTIC_KINDS,
    Rollout,
    sample,
    transition_logprob,
)

REWARD_MODES = ("sum", "normalised")
"""``sum``: Flow-GRPO's raw weighted sum of the rewards, then group advantages; ``normalised``: group advantage
of each reward separately, then their weighted sum (method.md §2, GRPO-Mix)."""
KL_FORMS = ("flow_grpo", "true", "mean")
"""See :func:`kl_to_reference`."""
RewardFn = Callable[[torch.Tensor, Sequence[PromptSpec]], RewardResult]
"""``reward(images (B, 3, H, W) in [0, 1], prompts) -> RewardResult`` (flowopd_core.rewards contract)."""


@dataclass(frozen=True)
class GRPOConfig:
    """Flow-GRPO settings. Defaults follow method.md §2 (the paper / Flow-GRPO) unless the help says otherwise."""

    group_size: int = field(
        default=8, metadata={"help": "G samples per prompt (paper 24, authors' OPD config 16; 8 on the CPU mini-world)"}
    )
    prompts_per_epoch: int = field(
        default=8, metadata={"help": "prompts (groups) per sampling epoch, drawn at random without replacement"}
    )
    task_cycling: bool = field(
        default=False,
        metadata={"help": "epoch e draws its prompts from task e mod n of the prompt set's tasks (authors' GRPO-Mix)"},
    )
    balance_templates: bool = field(
        default=False,
        metadata={"help": "spread each epoch's prompts evenly over the prompts' categories (spec 'template', e.g. "
                          "compose's single / count / pair / position), which the evaluator weighs equally; else "
                          "uniform over prompts"},
    )
    same_initial_noise: bool = field(
        default=False,
        metadata={"help": "the samples of a group start from the same initial noise, so their rewards differ only "
                          "through the SDE steps the policy is trained on (DanceGRPO; Flow-GRPO's same_latent); "
                          "else each sample draws its own"},
    )
    steps: int = field(default=10, metadata={"help": "sampling steps T of the rollouts"})
    resolution: int = field(
        default=0, metadata={"help": "image height = width in pixels; 0 = the model's native size (paper: 512)"}
    )
    train_fraction: float = field(
        default=0.99, metadata={"help": "train the first int(T * fraction) steps (Flow-GRPO: 9 of 10; never the last)"}
    )
    step_subset: int = field(
        default=0, metadata={"help": "train k random trainable steps per sample and epoch (DanceGRPO-style); 0 = all"}
    )
    shuffle_steps: bool = field(
        default=True, metadata={"help": "train each sample's steps in a random order (else in sampling order)"}
    )
    sde_window: int = field(
        default=0,
        metadata={"help": "Flow-GRPO-Fast: SDE (and training) only on a random window of this many consecutive "
                          "steps per epoch, ODE elsewhere; 0 = SDE on every step"},
    )
    window_range: tuple[int, int] = field(
        default=(0, 0),
        metadata={"help": "[lo, hi) steps a window may cover; hi = 0 means T // 2 (Flow-GRPO-Fast)"},
    )
    kind: str = field(default="sde", metadata={"help": "sde (Flow-GRPO) or cps (coefficients-preserving)"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (0.8 recommended for cps)"})
    min_step_std: float = field(
        default=0.01,
        metadata={"help": "train only steps whose transition noise std is at least this (cps: skips the step onto "
                          "the schedule's last sigma, std ~1e-3, whose log-prob ratio explodes); 0 = no floor"},
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "CFG w in rollouts and training forwards; 1 = no CFG (one forward, cheaper)"}
    )
    logprob_reduce: str = field(
        default="mean", metadata={"help": "mean over D (Flow-GRPO; clip_range 1e-4 assumes it) or sum (true)"}
    )
    clip_range: float = field(default=1e-4, metadata={"help": "PPO clip eps of the ratio"})
    adv_clip: float = field(default=5.0, metadata={"help": "advantages are clamped to +-adv_clip"})
    adv_eps: float = field(default=1e-4, metadata={"help": "A = (r - mean) / (std + adv_eps)"})
    global_std: bool = field(
        default=False, metadata={"help": "divide by the std of all the epoch's rewards instead of the group's"}
    )
    beta: float = field(
        default=0.04, metadata={"help": "KL-to-reference weight (0.04 GenEval/OCR, 0.01 PickScore); 0 = no ref pass"}
    )
    kl_form: str = field(
        default="flow_grpo",
        metadata={"help": "flow_grpo (true KL x |dt| / D, the scale beta was tuned for), true, or mean (true / D)"},
    )
    drop_zero_advantage: bool = field(
        default=True, metadata={"help": "skip samples whose advantage is 0 (flat groups) in training, as Flow-GRPO"}
    )
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (paper 1e-4 to 3e-4)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 = no clipping"})
    updates_per_epoch: int = field(default=2, metadata={"help": "optimizer steps per sampling epoch"})
    batch_size: int = field(
        default=16, metadata={"help": "samples per transformer batch in rollouts and training (CFG doubles rows)"}
    )
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay of the LoRA weights; 0 = no EMA"})
    ema_every: int = field(default=8, metadata={"help": "optimizer steps between EMA updates"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank when the trainer creates the adapter"})
    lora_alpha: float = field(default=64.0, metadata={"help": "LoRA alpha when the trainer creates the adapter"})
    epochs: int = field(default=100, metadata={"help": "sampling epochs of train()"})
    seed: int = field(default=0, metadata={"help": "seed of the trainer's generator (everything random)"})
    reward_weights: dict[str, float] = field(
        default_factory=dict, metadata={"help": "weight per reward name; rewards not listed weigh 1.0"}
    )
    reward_mode: str = field(
        default="sum", metadata={"help": "multi-reward: sum (Flow-GRPO raw weighted sum) or normalised"}
    )
    reward_workers: int = field(
        default=1, metadata={"help": "threads scoring rewards during the next rollout batch; 0 = score inline"}
    )
    max_bad_steps: int = field(
        default=3,
        metadata={"help": "an optimizer step with a non-finite loss or gradient norm, or in an epoch without one "
                          "finite reward, is skipped; this many consecutive skipped steps stop training"},
    )

    def __post_init__(self) -> None:
        errors = range_errors(
            self,
            at_least_one=("group_size", "prompts_per_epoch", "steps", "updates_per_epoch", "batch_size", "ema_every",
                          "lora_rank", "epochs", "max_bad_steps"),
            non_negative=("step_subset", "sde_window", "reward_workers", "beta", "weight_decay", "grad_clip",
                          "resolution", "min_step_std"),
            positive=("clip_range", "adv_clip", "adv_eps", "lr", "lora_alpha", "noise_level"),
        )
        if self.group_size < 2:
            errors.append(f"group_size must be >= 2 (a group of one has no advantage), got {self.group_size}")
        if not 0 < self.train_fraction <= 1 or self.trainable_steps < 1:
            errors.append(f"train_fraction {self.train_fraction} must be in (0, 1] and leave >= 1 trained step")
        if self.kind not in STOCHASTIC_KINDS:
            errors.append(f"kind must be one of {STOCHASTIC_KINDS}, got {self.kind!r}")
        if self.kind == "cps" and self.noise_level > 1:
            errors.append(f"kind='cps' needs noise_level <= 1, got {self.noise_level}")
        if self.logprob_reduce not in LOGPROB_REDUCES:
            errors.append(f"logprob_reduce must be one of {LOGPROB_REDUCES}, got {self.logprob_reduce!r}")
        if self.kl_form not in KL_FORMS:
            errors.append(f"kl_form must be one of {KL_FORMS}, got {self.kl_form!r}")
        if self.reward_mode not in REWARD_MODES:
            errors.append(f"reward_mode must be one of {REWARD_MODES}, got {self.reward_mode!r}")
        if self.guidance_scale < 0 or not 0 <= self.ema_decay < 1:
            errors.append("guidance_scale must be >= 0 and ema_decay in [0, 1)")
        if self.sde_window:
            lo, hi = self.window_bounds
            if not (0 <= lo < self.trainable_steps and hi <= self.steps and hi - lo >= self.sde_window):
                errors.append(f"window_range {self.window_range} (resolved [{lo}, {hi})) must hold a window of "
                              f"{self.sde_window} steps, start below {self.trainable_steps} and end by {self.steps}")
        if errors:
            raise ValueError("invalid GRPOConfig: " + "; ".join(errors))

    @property
    def trainable_steps(self) -> int:
        """int(T * train_fraction): steps 0 .. this - 1 may be trained."""
        return int(self.steps * self.train_fraction)

    @property
    def window_bounds(self) -> tuple[int, int]:
        """``window_range`` with hi = 0 resolved to T // 2."""
        lo, hi = self.window_range
        return lo, hi or self.steps // 2

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------------------------------------
# Pure functions (method.md §2)
# ----------------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> torch.Tensor:
    """GRPO advantages ``(N,)``: A_i = clamp((r_i - mean_g(i)) / (std + eps), -clip, clip) (method.md §2).

    rewards: ``(N,)``; NaN = could not be scored: such samples are left out of every statistic and get A = 0.
    group_ids: ``(N,)`` integers, one id per prompt group. mean_g is the group's mean; std is the population
    std (ddof 0, as Flow-GRPO's numpy) of the group, or with ``global_std`` of all finite rewards of the batch.
    A group whose finite rewards are all equal (zero std, or fewer than two scored) gets A = 0 exactly.
    ``clip = math.inf`` disables the clamp. Computed in float64, returned in float32.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        shapes = f"{tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        raise ValueError(f"rewards and group_ids must both be (N,), got {shapes}")
    r = rewards.detach().to(torch.float64)
    finite = torch.isfinite(r)
    _, inv = torch.unique(group_ids, return_inverse=True)
    groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(groups, dtype=r.dtype, device=r.device).index_add_(0, inv, finite.to(r.dtype))
    r0 = torch.where(finite, r, torch.zeros_like(r))
    mean = torch.zeros_like(count).index_add_(0, inv, r0) / count.clamp(min=1)
    dev = torch.where(finite, r - mean[inv], torch.zeros_like(r))
    if global_std:
        std = r[finite].std(correction=0) if finite.sum() > 1 else r.new_zeros(())
        std = std.expand_as(r)
    else:
        std = (torch.zeros_like(count).index_add_(0, inv, dev.square()) / count.clamp(min=1)).sqrt()[inv]
    hi = torch.full_like(count, -math.inf).scatter_reduce(0, inv, torch.where(finite, r, -math.inf), "amax")
    lo = torch.full_like(count, math.inf).scatter_reduce(0, inv, torch.where(finite, r, math.inf), "amin")
    flat = (hi <= lo)[inv]  # all finite rewards equal, or fewer than two of them
    adv = torch.where(finite & ~flat, dev / (std + eps), torch.zeros_like(r))
    return adv.clamp(-clip, clip).to(torch.float32)


def combine_rewards(
    scores: Mapping[str, torch.Tensor],
    weights: Mapping[str, float] | None = None,
    mode: str = "sum",
    group_ids: torch.Tensor | None = None,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Combine several rewards ``scores[name]`` ``(N,)`` into one signal ``(N,)`` (method.md §2, GRPO-Mix).

    ``sum``: c_i = sum_k w_k r_ik (Flow-GRPO's raw weighted sum; a reward, turn it into advantages with
    :func:`group_advantages`). ``normalised``: c_i = sum_k w_k A_ik with A_k = :func:`group_advantages` of
    reward k alone, unclamped (``group_ids`` needed); the result is already an advantage. Rewards with very
    different scales weigh by their scale in ``sum`` but only by w_k in ``normalised``.
    NaN: a reward that cannot score sample i contributes nothing to c_i; c_i is NaN only when no reward scored it.
    Weights default to 1 for every reward.
    """
    if not scores:
        raise ValueError("combine_rewards needs at least one reward")
    if mode not in REWARD_MODES:
        raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise KeyError(f"weights for unknown rewards {unknown}; rewards: {sorted(scores)}")
    if mode == "normalised" and group_ids is None:
        raise ValueError("mode 'normalised' needs group_ids")
    total, scored = None, None
    for name, r in scores.items():
        r = r.detach().to(torch.float64)
        finite = torch.isfinite(r)
        if mode == "sum":
            term = torch.where(finite, r, torch.zeros_like(r))
        else:
            term = group_advantages(r, group_ids, global_std=global_std, eps=eps, clip=math.inf).to(torch.float64)
        term = weights.get(name, 1.0) * term
        total = term if total is None else total + term
        scored = finite if scored is None else scored | finite
    return torch.where(scored, total, torch.full_like(total, math.nan)).to(torch.float32)


def multi_reward_advantages(
    scores: Mapping[str, torch.Tensor],
    group_ids: torch.Tensor,
    weights: Mapping[str, float] | None = None,
    mode: str = "sum",
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> torch.Tensor:
    """Advantages ``(N,)`` from one or more rewards ``(N,)`` each: ``sum`` = group advantages of the weighted sum
    (for one reward of weight 1: Flow-GRPO exactly); ``normalised`` = the weighted sum of per-reward group
    advantages, clamped to +-clip. Unscored samples (NaN) get 0."""
    combined = combine_rewards(scores, weights, mode, group_ids, global_std=global_std, eps=eps)
    if mode == "sum":
        return group_advantages(combined, group_ids, global_std=global_std, eps=eps, clip=clip)
    return torch.nan_to_num(combined, nan=0.0).clamp(-clip, clip)


@dataclass
class PPOLoss:
    """Per-step clipped surrogate of a batch (method.md §2).

    loss: 0-dim, mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - eps, 1 + eps)) (keeps the graph of logp_new).
    ratio: ``(B,)`` rho = exp(logp_new - logp_old), detached.
    clip_fraction: 0-dim, fraction of samples with |rho - 1| > eps.
    approx_kl: 0-dim, 0.5 mean((logp_new - logp_old)^2) (Flow-GRPO's diagnostic).
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_clip_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> PPOLoss:
    """The PPO-clip loss of one step for ``(B,)`` log-probs and advantages (method.md §2); see :class:`PPOLoss`."""
    if not logp_new.shape == logp_old.shape == advantages.shape or logp_new.ndim != 1:
        raise ValueError(f"need (B,) tensors, got {tuple(logp_new.shape)}, {tuple(logp_old.shape)}, "
                         f"{tuple(advantages.shape)}")
    delta = logp_new - logp_old
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    detached = ratio.detach()
    return PPOLoss(
        loss=loss,
        ratio=detached,
        clip_fraction=((detached - 1.0).abs() > clip_range).float().mean(),
        approx_kl=0.5 * delta.detach().square().mean(),
    )


def kl_to_reference(
    mean_theta: torch.Tensor,
    mean_ref: torch.Tensor,
    std: torch.Tensor | float,
    dt: torch.Tensor | float,
    *,
    kind: str = "sde",
    form: str = "flow_grpo",
) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of one Gaussian transition per sample ``(B,)`` (method.md §2).

    mean_theta, mean_ref: ``(B, C, H, W)`` transition means; std: the per-element std s (0-dim, float or
    ``(B, 1, 1, 1)``); dt: t_{j+1} - t_j (float, 0-dim or ``(B,)``), used by ``flow_grpo`` with kind ``sde``.

    - ``true``: ||mu_theta - mu_ref||^2 / (2 s^2), summed over D (the exact KL of the two Gaussians).
    - ``mean``: the true KL / D.
    - ``flow_grpo`` (default: beta = 0.04 was tuned on this scale): Flow-GRPO's
      mean_D((mu_theta - mu_ref)^2) / (2 sigma^2) with its step's ``std_dev_t``: sigma = sigma_t = s / sqrt(|dt|)
      for ``sde``, so it is the true KL x |dt| / D; sigma = s for ``cps``, so it is the true KL / D.
    """
    if form not in KL_FORMS:
        raise ValueError(f"form must be one of {KL_FORMS}, got {form!r}")
    if kind not in STOCHASTIC_KINDS:
        raise ValueError(f"kind must be one of {STOCHASTIC_KINDS}, got {kind!r}")
    batch, d = mean_theta.shape[0], mean_theta[0].numel()
    s = torch.as_tensor(std, dtype=mean_theta.dtype, device=mean_theta.device).reshape(-1).expand(batch)
    true = (mean_theta - mean_ref).square().flatten(1).sum(1) / (2 * s.square())
    if form == "true":
        return true
    if form == "mean" or kind == "cps":
        return true / d
    step = torch.as_tensor(dt, dtype=mean_theta.dtype, device=mean_theta.device).abs().reshape(-1).expand(batch)
    return true * step / d


# ----------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------


@dataclass
class GRPOBatch:
    """One sampling epoch: N = prompts x G samples, ordered group by group.

    prompts: N ``PromptSpec``; group_ids: ``(N,)`` long, the group (= prompt draw) of each sample.
    latents: ``(N, T+1, C, H, W)`` float32 visited states; log_probs: ``(N, T)`` log pi_old of each transition.
    sigmas: ``(T+1,)``; sde_steps: the steps drawn with the SDE (all, or the Flow-GRPO-Fast window).
    images: ``(N, 3, H, W)`` in [0, 1]; rewards: name -> ``(N,)`` raw scores (NaN = unscored).
    advantages: ``(N,)``; train_steps: ``(N, K)`` long, each sample's trained steps in training order.
    With several processes the batch holds this rank's share of the groups (group_ids stay the epoch's);
    epoch_rewards / epoch_advantages / epoch_group_ids are the whole epoch's (None in a single process).
    """

    prompts: list[PromptSpec]
    group_ids: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sde_steps: tuple[int, ...]
    images: torch.Tensor
    rewards: dict[str, torch.Tensor]
    advantages: torch.Tensor
    train_steps: torch.Tensor
    kind: str
    noise_level: float
    logprob_reduce: str
    epoch_rewards: dict[str, torch.Tensor] | None = None
    epoch_advantages: torch.Tensor | None = None
    epoch_group_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def rollout(self, rows: torch.Tensor) -> Rollout:
        """The stored trajectories of ``rows`` ``(b,)`` as a :class:`Rollout` (for re-evaluating transitions)."""
        return Rollout(
            latents=self.latents[rows], log_probs=self.log_probs[rows], sigmas=self.sigmas, kind=self.kind,
            noise_level=self.noise_level, logprob_reduce=self.logprob_reduce, sde_steps=self.sde_steps,
        )


@dataclass
class StepLoss:
    """Loss of one trained step of a micro-batch: ``loss`` (0-dim, with grad) = ppo.loss + beta mean(kl);
    ``kl``: ``(b,)`` detached KL to the reference in ``kl_form`` (None when beta = 0)."""

    loss: torch.Tensor
    ppo: PPOLoss
    kl: torch.Tensor | None


@dataclass
class EpochMetrics:
    """What one epoch did. Means are over the epoch's trained (micro-batch, step) terms.

    reward_mean / reward_std: per reward, NaN-aware over the epoch's samples; reward_best: per reward, the mean
    over groups of each group's best sample (:func:`group_best`); unscored: samples that no reward scored.
    zero_std_groups: groups whose advantages are all 0 (identical rewards: no signal).
    kl: mean KL to the reference (``kl_form``), NaN when beta = 0. grad_norm: mean pre-clip gradient norm.
    first_update_ratio_dev: max |rho - 1| in the epoch's first optimizer step (before it, the policy is the
    sampler: 0 when re-evaluation reproduces sampling exactly). optimizer_steps: total since the start.
    skipped_steps: steps of this epoch not taken for non-finite values (``max_bad_steps``).
    When every group is flat (all advantages 0) nothing is trained: the loss terms are NaN and no step is taken.
    """

    epoch: int
    reward_mean: dict[str, float]
    reward_std: dict[str, float]
    reward_best: dict[str, float]
    unscored: int
    groups: int
    zero_std_groups: int
    trained_samples: int
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    approx_kl: float
    grad_norm: float
    first_update_ratio_dev: float
    optimizer_steps: int
    skipped_steps: int
    sde_steps: tuple[int, ...]
    sample_seconds: float
    train_seconds: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STATE_FORMAT = "flowopd-grpo-state/1"


def _nan_stats(values: torch.Tensor) -> tuple[float, float]:
    finite = values[torch.isfinite(values)].double()
    if not finite.numel():
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(correction=0))


def parse_window_range(text: str) -> tuple[int, int]:
    """``"lo, hi"`` (or ``"lo hi"``) -> ``(lo, hi)`` for :attr:`GRPOConfig.window_range`; ValueError otherwise."""
    parts = text.replace(",", " ").split()
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"window_range must be two whole numbers 'lo, hi' (hi 0 = T // 2), got {text!r}") from None
    return lo, hi


def group_best(scores: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean over groups of the group's best score: ``scores`` ``(N,)`` (NaN = unscored), ``group_ids`` ``(N,)``
    in [0, G). Groups with no finite score are left out; NaN when none has one.

    Next to the mean reward it says whether the policy ever samples what the reward wants: GRPO can only make
    likelier what some sample of a group already does, so a best-of-group that stays near the mean (or a strict
    reward whose best is 0) means there is little to learn from (README, the text teacher).
    """
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        return math.nan
    groups = int(group_ids.max()) + 1
    best = torch.full((groups,), -math.inf, dtype=torch.float64, device=scores.device)
    best = best.scatter_reduce(0, group_ids[finite], scores[finite].double(), reduce="amax")
    return float(best[torch.isfinite(best)].mean())


def template_strata(prompts: PromptSet) -> dict[str, list[int]]:
    """Indices of ``prompts`` per category (:attr:`PromptSpec.category`), in order of first appearance."""
    strata: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        strata.setdefault(prompt.category, []).append(index)
    return strata


def balanced_draw(strata: Mapping[str, Sequence[int]], n: int, epoch: int, generator: torch.Generator) -> list[int]:
    """``n`` indices spread evenly over ``strata`` (category -> its indices): each of the k categories gets
    n // k, drawn at random without replacement; the n % k left over go to the next categories in a rotation
    that moves on with ``epoch``, so over k epochs every category gets the same number of draws.

    Each category must hold at least ceil(n / k) indices (checked by the trainer)."""
    names = list(strata)
    k = len(names)
    extra = n % k
    lucky = {names[(epoch * extra + j) % k] for j in range(extra)}
    out: list[int] = []
    for name in names:
        rows = strata[name]
        take = n // k + (name in lucky)
        out += [rows[i] for i in torch.randperm(len(rows), generator=generator)[:take].tolist()]
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


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
    FREE_CONFIG_KEYS = ("epochs", "reward_workers", "max_bad_steps")

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
        if prompts is None or len(prompts) == 0:
            raise ValueError("GRPOTrainer needs a non-empty PromptSet")
        pools = [prompts.by_task(task) for task in prompts.tasks] if config.task_cycling else [prompts]
        strata = [template_strata(pool) for pool in pools] if config.balance_templates else None
        if strata is None:
            small = [(pool.name, len(pool)) for pool in pools if len(pool) < config.prompts_per_epoch]
        else:  # every category must hold its share (rounded up) of an epoch's prompts
            small = [(f"{pool.name}:{name}", len(rows)) for pool, by_name in zip(pools, strata)
                     for name, rows in by_name.items() if len(rows) < -(-config.prompts_per_epoch // len(by_name))]
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

    def _draw_train_steps(self, n: int, sde_steps: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, K)`` trained steps per sample: the SDE steps below ``trainable_steps`` whose noise std is at
        least ``min_step_std`` (a random subset of ``step_subset`` of them), in a random order per sample with
        ``shuffle_steps``."""
        cfg = self.config
        candidates = torch.tensor([j for j in sde_steps if j in self.trained_steps], dtype=torch.long)
        k = min(cfg.step_subset or len(candidates), len(candidates))
        rows = []
        for _ in range(n):
            pick = candidates
            if cfg.shuffle_steps or k < len(candidates):
                pick = candidates[torch.randperm(len(candidates), generator=generator or self.generator)][:k]
            rows.append(pick if cfg.shuffle_steps else pick.sort().values)
        return torch.stack(rows).to(self.sigmas.device)

    @torch.no_grad()
    def collect(self) -> GRPOBatch:
        """Sample the epoch's rollouts with the current adapter, score them and compute advantages (no update)."""
        cfg = self.config
        self.policy.set_active(self.adapter)
        drawn = self._draw_prompts()
        window = self._draw_window()
        generator = self._epoch_generator()
        share = self.world.shard(len(drawn))  # every group in a single process
        specs = [drawn[g] for g in share for _ in range(cfg.group_size)]
        group_ids = torch.tensor(list(share), dtype=torch.long).repeat_interleave(cfg.group_size)
        parts: list[Rollout] = []
        images: list[torch.Tensor] = []
        pending: list[dict[str, Future]] = []
        pool = ThreadPoolExecutor(cfg.reward_workers) if cfg.reward_workers else None
        size = cfg.resolution or None
        shared = None
        if cfg.same_initial_noise:  # one draw per group, repeated over its samples
            shared = initial_noise(self.pipe, len(share), generator=generator, height=size, width=size)
            shared = shared.repeat_interleave(cfg.group_size, dim=0)
        with pool or nullcontext():
            for start in range(0, len(specs), cfg.batch_size):
                chunk = specs[start : start + cfg.batch_size]
                cond, uncond = self._conditioning(chunk)

                def velocity_fn(x: torch.Tensor, t: float) -> torch.Tensor:
                    return self._velocity(x, t, cond, uncond)

                if shared is None:
                    noise = initial_noise(self.pipe, len(chunk), generator=generator, height=size, width=size)
                else:
                    noise = shared[start : start + len(chunk)]
                rollout = sample(
                    velocity_fn, noise, self.sigmas, kind=cfg.kind, noise_level=cfg.noise_level, generator=generator, sde_window=window,
                    logprob_reduce=cfg.logprob_reduce,
                )
                chunk_images = decode(self.pipe, rollout.latents[:, -1])
                parts.append(rollout)
                images.append(chunk_images)
                pending.append({name: _submit(pool, fn, chunk_images, chunk) for name, fn in self.rewards.items()})
            scores = {name: torch.cat([_scores(p[name].result(), name, len(p_imgs))
                                       for p, p_imgs in zip(pending, images)]) for name in self.rewards}
        epoch_scores = {name: self._gather_groups(r, len(drawn), cfg.group_size) for name, r in scores.items()}
        epoch_ids = torch.arange(len(drawn)).repeat_interleave(cfg.group_size)
        advantages = multi_reward_advantages(  # over the whole epoch (identical on every process)
            epoch_scores, epoch_ids, cfg.reward_weights, cfg.reward_mode, global_std=cfg.global_std, eps=cfg.adv_eps,
            clip=cfg.adv_clip,
        )
        start, stop = (g * cfg.group_size for g in self.world.shard_bounds(len(drawn)))
        device = self.sigmas.device
        several = self.world.size > 1
        return GRPOBatch(
            prompts=specs, group_ids=group_ids.to(device), latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]), sigmas=self.sigmas, sde_steps=parts[0].sde_steps,
            images=torch.cat(images), rewards=scores, advantages=advantages[start:stop].to(device),
            train_steps=self._draw_train_steps(len(specs), parts[0].sde_steps, generator), kind=cfg.kind,
            noise_level=cfg.noise_level, logprob_reduce=cfg.logprob_reduce,
            epoch_rewards=epoch_scores if several else None, epoch_advantages=advantages.to(device) if several else None,
            epoch_group_ids=epoch_ids.to(device) if several else None,
        )

    # ------------------------------------------------------------------------------------------- training

    def _step_terms(self, batch: GRPOBatch, rows: torch.Tensor, steps: torch.Tensor, with_kl: bool) -> StepLoss:
        cfg = self.config
        sub = batch.rollout(rows)
        index = torch.arange(len(rows), device=steps.device)
        cond, uncond = self._conditioning([batch.prompts[i] for i in rows.tolist()])
        x, t = sub.latents[index, steps], self.sigmas[steps]
        step = transition_logprob(sub, steps, self._velocity(x, t, cond, uncond))
        ppo = ppo_clip_loss(step.log_prob, sub.log_probs[index, steps], batch.advantages[rows], cfg.clip_range)
        if not with_kl:
            return StepLoss(loss=ppo.loss, ppo=ppo, kl=None)
        with torch.no_grad(), self.policy.disable():
            mean_ref = transition_logprob(sub, steps, self._velocity(x, t, cond, uncond)).mean
        dt = self.sigmas[steps + 1] - t
        kl = kl_to_reference(step.mean, mean_ref, step.std, dt, kind=cfg.kind, form=cfg.kl_form)
        return StepLoss(loss=ppo.loss + cfg.beta * kl.mean(), ppo=ppo, kl=kl.detach())

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
        rewards = batch.epoch_rewards or batch.rewards
        if not any(bool(torch.isfinite(r).any()) for r in rewards.values()):
            for _ in range(cfg.updates_per_epoch):  # nothing was scored: no signal, every step of the epoch is bad
                self._skip_step("no finite reward in the epoch")
            log["trained"] = 0
            return log
        steps_per_sample = batch.train_steps.shape[1]
        self.policy.set_active(self.adapter)
        with_kl = cfg.beta > 0
        for update, part in enumerate(self._update_parts(order)):
            micro = part.split(cfg.batch_size) if len(part) else ()  # empty: another process has this part
            self.optimizer.zero_grad(set_to_none=True)
            bad = ""
            for rows in micro:
                for k in range(steps_per_sample):
                    terms = self._step_terms(batch, rows, batch.train_steps[rows, k], with_kl)
                    if not torch.isfinite(terms.loss):
                        bad = f"GRPO loss {terms.loss.item()}"
                        break
                    (terms.loss / (len(micro) * steps_per_sample)).backward()
                    log["loss"].append(terms.loss.item())
                    log["policy_loss"].append(terms.ppo.loss.item())
                    log["clip_fraction"].append(terms.ppo.clip_fraction.item())
                    log["approx_kl"].append(terms.ppo.approx_kl.item())
                    if terms.kl is not None:
                        log["kl"].append(terms.kl.mean().item())
                    if update == 0:
                        log["first_dev"] = max(log["first_dev"], (terms.ppo.ratio - 1).abs().max().item())
                if bad:
                    break
            norm = self._finish_update(len(part), bad)
            if norm is not None:
                log["grad_norm"].append(norm)
        self.optimizer.zero_grad(set_to_none=True)
        self._reduce_log(log, ("loss", "policy_loss", "kl", "clip_fraction", "approx_kl"), ("first_dev",), ("trained",))
        return log

    def epoch(self) -> EpochMetrics:
        """One sampling epoch plus its optimizer steps; advances ``epoch_index``."""
        start = time.perf_counter()
        batch = self.collect()
        sampled = time.perf_counter()
        log = self._update(batch)
        done = time.perf_counter()
        rewards = batch.epoch_rewards or batch.rewards
        advantages = batch.advantages if batch.epoch_advantages is None else batch.epoch_advantages
        group_ids = batch.group_ids if batch.epoch_group_ids is None else batch.epoch_group_ids
        stats = {name: _nan_stats(r) for name, r in rewards.items()}
        scored = torch.stack([torch.isfinite(r) for r in rewards.values()]).any(0)
        groups = int(group_ids.max()) + 1
        nonzero = torch.zeros(groups, device=advantages.device)
        nonzero.index_add_(0, group_ids, (advantages != 0).float())
        metrics = EpochMetrics(
            epoch=self.epoch_index,
            reward_mean={name: s[0] for name, s in stats.items()},
            reward_std={name: s[1] for name, s in stats.items()},
            reward_best={name: group_best(r, group_ids) for name, r in rewards.items()},
            unscored=int((~scored).sum()),
            groups=groups,
            zero_std_groups=int((nonzero == 0).sum()),
            trained_samples=log["trained"],
            loss=_mean(log["loss"]),
            policy_loss=_mean(log["policy_loss"]),
            kl=_mean(log["kl"]),
            clip_fraction=_mean(log["clip_fraction"]),
            approx_kl=_mean(log["approx_kl"]),
            grad_norm=_mean(log["grad_norm"]),
            first_update_ratio_dev=log["first_dev"],
            optimizer_steps=self.optimizer_steps,
            skipped_steps=self.skipped_steps,
            sde_steps=batch.sde_steps,
            sample_seconds=sampled - start,
            train_seconds=done - sampled,
            seconds=done - start,
        )
        self.epoch_index += 1
        return metrics


def _submit(pool: ThreadPoolExecutor | None, fn: RewardFn, images: torch.Tensor, prompts: list[PromptSpec]) -> Future:
    """Score in ``pool`` (concurrently with the caller) or now, as a completed future."""
    if pool is not None:
        return pool.submit(fn, images, prompts)
    future: Future = Future()
    future.set_result(fn(images, prompts))
    return future


def _scores(result: RewardResult, name: str, batch: int) -> torch.Tensor:
    if not isinstance(result, RewardResult) or tuple(result.scores.shape) != (batch,):
        got = tuple(result.scores.shape) if isinstance(result, RewardResult) else type(result).__name__
        raise ValueError(f"reward {name!r} must return a RewardResult with ({batch},) scores, got {got}")
    return result.scores.detach().to(torch.float32).cpu()
