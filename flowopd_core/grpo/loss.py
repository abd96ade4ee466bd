"""Flow-GRPO's objective as pure tensor functions (docs/method.md §2): group-relative advantages, several rewards
combined (GRPO-Mix), the PPO-clip surrogate and the KL to the reference policy. The trainer
(:mod:`flowopd_core.grpo.trainer`) owns rollouts, forwards and optimisers.

Notation (docs/method.md): time t = scheduler sigma, t = 1 is noise; a step j goes from t_j to t_{j+1} < t_j
with dt = t_{j+1} - t_j < 0; s = per-element std of the SDE transition; D = elements of one latent; N = samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flowopd_core.choices import KL_FORMS, REWARD_MODES
from flowopd_core.sampling.samplers import STOCHASTIC_KINDS

# REWARD_MODES (flowopd_core.choices, re-exported here): ``sum``: Flow-GRPO's raw weighted sum of the rewards, then
# group advantages; ``normalised``: group advantage of each reward separately, then their weighted sum (docs/method.md
# §2, GRPO-Mix). KL_FORMS: see :func:`kl_to_reference`.


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
) -> torch.Tensor:
    """GRPO advantages ``(N,)``: A_i = clamp((r_i - mean_g(i)) / (std + eps), -clip, clip) (docs/method.md §2).

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
    """Combine several rewards ``scores[name]`` ``(N,)`` into one signal ``(N,)`` (docs/method.md §2, GRPO-Mix).

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
    """Per-step clipped surrogate of a batch (docs/method.md §2).

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
    """The PPO-clip loss of one step for ``(B,)`` log-probs and advantages (docs/method.md §2); see :class:`PPOLoss`."""
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
    """KL(pi_theta || pi_ref) of one Gaussian transition per sample ``(B,)`` (docs/method.md §2).

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


def group_best(scores: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean over groups of the group's best score: ``scores`` ``(N,)`` (NaN = unscored), ``group_ids`` ``(N,)``
    in [0, G). Groups with no finite score are left out; NaN when none has one.

    Next to the mean reward it says whether the policy ever samples what the reward wants: GRPO can only make
    likelier what some sample of a group already does, so a best-of-group that stays near the mean (or a strict
    reward whose best is 0) means there is little to learn from (docs/experiments.md, the text teacher).
    """
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        return math.nan
    groups = int(group_ids.max()) + 1
    best = torch.full((groups,), -math.inf, dtype=torch.float64, device=scores.device)
    best = best.scatter_reduce(0, group_ids[finite], scores[finite].double(), reduce="amax")
    return float(best[torch.isfinite(best)].mean())
