"""Flow-matching samplers with per-step log-probabilities (docs/method.md §1) and the Gaussian-transition
helpers that the GRPO and OPD losses reuse (§2, §4).

Notation (docs/method.md): time ``t`` is the scheduler sigma in [0, 1], t = 1 is noise; x_t = (1 - t) x0 + t eps;
velocity v ~ eps - x0; a step goes from ``t`` to ``t_next`` < t, ``dt = t_next - t < 0``; ``D`` = number of
elements of one sample (C * H * W); ``a`` = ``noise_level``.

Everything here is model-agnostic: a model enters as a velocity callable ``velocity_fn(x, t) -> v`` with
``x`` ``(B, C, H, W)`` and ``t`` a python float (CFG, LoRA adapters and dtype casts live in the model layer).

Precision: the step arithmetic runs in float32 even when ``x`` or ``v`` are half precision (bf16 overflows in
the SDE mean), and in float64 when ``x`` is float64 (tests). Steps return their states in that compute
dtype, and :func:`sample` stores all states in it: like Flow-GRPO, latents stay float32 so that re-evaluating
a stored transition reproduces its log-prob bit for bit; the velocity callable casts to the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from flowopd_core.choices import LOGPROB_REDUCES, SAMPLER_KINDS, STOCHASTIC_KINDS

# SAMPLER_KINDS, STOCHASTIC_KINDS, LOGPROB_REDUCES: see flowopd_core.choices (re-exported here).

Time = float | torch.Tensor
"""A python float, a 0-dim tensor, or a ``(B,)`` tensor of per-sample times."""
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
"""``velocity_fn(x, t) -> v`` with ``x``, ``v`` ``(B, C, H, W)`` and ``t`` the sigma as a python float."""


@dataclass
class StepResult:
    """One stochastic transition x_t -> x_{t_next} (docs/method.md §1).

    prev_sample: ``(B, C, H, W)`` the new state x_{t_next} (compute dtype; reparameterised, keeps grad).
    log_prob: ``(B,)`` log pi(prev_sample | x), reduced over D by ``mean`` or ``sum``; computed on the
        detached prev_sample, so its gradient is the score-function one.
    mean: ``(B, C, H, W)`` the Gaussian mean mu.
    std: per-element standard deviation s, broadcastable to ``mean``: 0-dim or ``(B, 1, 1, 1)``.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class Rollout:
    """A sampled trajectory batch: all visited states and the log-prob of every transition.

    latents: ``(B, T+1, C, H, W)`` states x_{sigmas[0]} (= x_T, noise) ... x_{sigmas[T]} (= x_0), compute dtype.
    log_probs: ``(B, T)`` log pi of transition j (latents[:, j] -> latents[:, j+1]); 0 for deterministic steps.
    sigmas: ``(T+1,)`` the times of the states, decreasing from 1 to 0 (compute dtype).
    kind, noise_level, logprob_reduce: how the stochastic steps were drawn and scored.
    sde_steps: indices j of the steps drawn with the SDE (the others are Euler ODE steps).
    prompt_ids: per-sample prompt identifiers, filled by the caller.
    images: ``(B, 3, H, W)`` decoded images in [0, 1], filled by the caller.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    kind: str
    noise_level: float
    logprob_reduce: str
    sde_steps: tuple[int, ...]
    prompt_ids: list | torch.Tensor | None = None
    images: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        """T, the number of transitions."""
        return self.sigmas.numel() - 1

    def subset(self, rows: torch.Tensor) -> Rollout:
        """The trajectories ``rows`` ``(b,)`` (latents and log-probs; schedule and kind shared)."""
        return dataclasses.replace(self, latents=self.latents[rows], log_probs=self.log_probs[rows],
                                   prompt_ids=None, images=None)


# ----------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------


def flow_sigmas(
    num_steps: int,
    shift: float = 1.0,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """The sampling times ``(T+1,)`` float32, decreasing from 1 and ending with 0, as diffusers makes them.

    With ``scheduler``: calls ``scheduler.set_timesteps(num_steps)`` (this sets the scheduler's state) and
    returns a copy of ``scheduler.sigmas``; ``shift`` is then ignored. Without: rebuilds the sigmas of a
    default-config ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift=shift)``, bit for bit,
    including a diffusers quirk: the linspace runs from 1 to the *shifted* training sigma_min and is then
    shifted again, so the last non-zero sigma is shift(shift(1 / num_train_timesteps)).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if scheduler is not None:
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas.detach().to(device="cpu", dtype=torch.float32).clone()
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # Training sigma_min as diffusers computes it (float32 ops), then set_timesteps (float64 numpy).
    train_min = torch.tensor([1.0], dtype=torch.float32) / num_train_timesteps
    train_min = (shift * train_min / (1 + (shift - 1) * train_min)).item()
    sig = np.linspace(1.0 * num_train_timesteps, train_min * num_train_timesteps, num_steps) / num_train_timesteps
    sig = shift * sig / (1 + (shift - 1) * sig)
    sig = torch.from_numpy(sig).to(torch.float32)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float32)])


# ----------------------------------------------------------------------------------------------------------
# Step helpers
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _time(t: Time, ref: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of ``ref``'s dtype and device, broadcastable to ``ref`` ``(B, ...)``."""
    t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != ref.shape[0]:
        raise ValueError(f"per-sample times must have shape ({ref.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (ref.ndim - 1)))


def _check_kind(kind: str, noise_level: float) -> None:
    if kind not in STOCHASTIC_KINDS:
        raise ValueError(f"kind must be one of {STOCHASTIC_KINDS}, got {kind!r}")
    if kind == "sde" and not noise_level > 0:
        raise ValueError(f"kind='sde' needs noise_level > 0, got {noise_level}")
    if kind == "cps" and not 0 < noise_level <= 1:
        raise ValueError(f"kind='cps' needs 0 < noise_level <= 1, got {noise_level}")


def _sde_sigma(t: torch.Tensor, t_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """sigma_t = a * sqrt(t / (1 - t)) (docs/method.md §1).

    At t = 1 the denominator uses t_next instead of t. Flow-GRPO uses ``sigmas[1]`` (the schedule's second
    value) there; on a decreasing schedule t = 1 only occurs at step 0, whose t_next *is* ``sigmas[1]``, so
    the two are identical for every step of a schedule (also for per-sample step subsets).
    """
    return noise_level * torch.sqrt(t / (1 - torch.where(t == 1, t_next, t)))


def _mean_std(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian transition mean ``(B, ...)`` and per-element std (docs/method.md §1), all in one dtype."""
    dt = t_next - t
    if kind == "sde":
        sigma = _sde_sigma(t, t_next, noise_level)
        mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
        return mean, sigma * torch.sqrt(-dt)
    std = t_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - t * v
    x1_hat = x + (1 - t) * v
    return x0_hat * (1 - t_next) + x1_hat * torch.sqrt(t_next**2 - std**2), std


def _per_sample(s: torch.Tensor, batch: int) -> torch.Tensor:
    """A 0-dim or ``(B, 1, ..., 1)`` tensor as ``(B,)``."""
    return s.reshape(-1).expand(batch) if s.numel() == 1 else s.reshape(batch)


def gaussian_logprob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean"
) -> torch.Tensor:
    """log N(sample; mean, std^2 I) ``(B,)``, summed over D (``sum``) or divided by D (``mean``).

    ``sample``, ``mean`` ``(B, ...)``; ``std`` 0-dim or ``(B, 1, ..., 1)``. A sample with std 0 is a
    deterministic step and gets log-prob 0 (CPS onto t_next = 0).
    """
    if reduce not in LOGPROB_REDUCES:
        raise ValueError(f"logprob_reduce must be one of {LOGPROB_REDUCES}, got {reduce!r}")
    batch, d = sample.shape[0], sample[0].numel()
    s = _per_sample(std, batch)
    positive = s > 0
    s = torch.where(positive, s, torch.ones_like(s))
    sq = (sample - mean).square().flatten(1).sum(1)
    lp = -sq / (2 * s**2) - d * torch.log(s) - d * 0.5 * math.log(2 * math.pi)
    lp = torch.where(positive, lp, torch.zeros_like(lp))
    return lp / d if reduce == "mean" else lp


# ----------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------


def ode_step(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """Euler step x + (t_next - t) v ``(B, C, H, W)``, as ``FlowMatchEulerDiscreteScheduler.step``.

    Unlike diffusers, the result stays in the compute dtype (float32 for half inputs).
    """
    dtype = _compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    return x + (_time(t_next, x) - _time(t, x)) * v


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: Time,
    t_next: Time,
    *,
    noise_level: float = 0.7,
    kind: str = "sde",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    logprob_reduce: str = "mean",
) -> StepResult:
    """One SDE transition with its log-prob (docs/method.md §1, Flow-GRPO ``sde_step_with_logprob``).

    ``kind="sde"``: mu = x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt,
    s = sigma_t sqrt(|dt|), sigma_t = a sqrt(t / (1 - t)) (t_next replaces t in the denominator at t = 1).
    ``kind="cps"``: s = t_next sin(a pi / 2), mu = (x - t v)(1 - t_next) + (x + (1 - t) v) sqrt(t_next^2 - s^2).

    x, v: ``(B, C, H, W)`` (any ``(B, ...)``); t, t_next: floats, 0-dim or ``(B,)`` tensors.
    prev_sample given: re-evaluate the log-prob of that stored transition (PPO ratios); otherwise draw
    prev_sample = mu + s * noise, ``noise`` ``(B, ...)`` given or drawn with ``generator``.
    log_prob is the exact Gaussian log-density, for CPS too (Flow-GRPO's CPS code instead returns
    -mean((x' - mu)^2), which drops the constants and the 1 / (2 s^2) factor).
    """
    _check_kind(kind, noise_level)
    dtype = _compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    t, t_next = _time(t, x), _time(t_next, x)
    mean, std = _mean_std(x, v, t, t_next, noise_level, kind)
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=dtype)
        prev_sample = mean + std * noise.to(dtype)
    else:
        prev_sample = prev_sample.to(dtype)
    log_prob = gaussian_logprob(prev_sample.detach(), mean, std, logprob_reduce)
    return StepResult(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def sde_noise_std(t: Time, t_next: Time, noise_level: float = 0.7, kind: str = "sde") -> torch.Tensor:
    """Per-element std s of the transition t -> t_next (docs/method.md §1), shaped like ``t`` / ``t_next``.

    ``sde``: sigma_t sqrt(|dt|); ``cps``: t_next sin(a pi / 2). float32 unless a tensor input is float64.
    """
    _check_kind(kind, noise_level)
    t, t_next = _time_pair(t, t_next)
    if kind == "sde":
        return _sde_sigma(t, t_next, noise_level) * torch.sqrt(t - t_next)
    return t_next * math.sin(noise_level * math.pi / 2)


def noisy_steps(sigmas: torch.Tensor, noise_level: float, kind: str, min_std: float) -> tuple[int, ...]:
    """The steps j of the schedule ``sigmas`` ``(T+1,)`` whose transition sigmas[j] -> sigmas[j+1] has noise
    std (:func:`sde_noise_std`) of at least ``min_std`` and above 0: the steps a trainer may train on.

    The others are (near-)deterministic, and an exact Gaussian log-prob or KL there is ill-conditioned: it
    scales with 1 / std^2. diffusers schedules end ..., sigma_min, 0 with sigma_min = 1e-3 at shift 1, so CPS
    (std = t_next sin(a pi / 2)) gives the step onto sigma_min a std of about 1e-3; one AdamW step at lr 1e-3
    then moves its per-element log-ratio by ~6 (measured on the mini-world, 8 steps), which no PPO clip range
    holds and which swamps the other steps' gradients and KL. Flow-GRPO's SDE stds stay above 0.1 there.
    """
    if kind not in STOCHASTIC_KINDS:
        raise ValueError(f"kind must be one of {STOCHASTIC_KINDS}, got {kind!r}")
    std = sde_noise_std(sigmas[:-1].double(), sigmas[1:].double(), noise_level, kind)
    return tuple(j for j in range(len(std)) if float(std[j]) >= min_std and float(std[j]) > 0)


def kl_weight(t: Time, t_next: Time, noise_level: float = 0.7, kind: str = "sde") -> torch.Tensor:
    """w(t) with KL(N(mu_p, s^2 I) || N(mu_q, s^2 I)) = w(t) ||v_p - v_q||^2 (summed over D), docs/method.md §4.

    ``sde``: w = (|dt| / 2) (sigma_t (1 - t) / (2t) + 1 / sigma_t)^2.
    ``cps``: w = c^2 / (2 s^2) with c = d mu / d v = (1 - t) sqrt(t_next^2 - s^2) - t (1 - t_next); infinite
    on the deterministic last step (t_next = 0), which has no KL.
    Shaped like ``t`` / ``t_next``; float32 unless a tensor input is float64.
    """
    _check_kind(kind, noise_level)
    t, t_next = _time_pair(t, t_next)
    if kind == "sde":
        sigma = _sde_sigma(t, t_next, noise_level)
        return (t - t_next) / 2 * (sigma * (1 - t) / (2 * t) + 1 / sigma) ** 2
    s = t_next * math.sin(noise_level * math.pi / 2)
    c = (1 - t) * torch.sqrt(t_next**2 - s**2) - t * (1 - t_next)
    return c**2 / (2 * s**2)


def _time_pair(t: Time, t_next: Time) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [u for u in (t, t_next) if isinstance(u, torch.Tensor)]
    dtype = torch.float64 if any(u.dtype == torch.float64 for u in tensors) else torch.float32
    device = tensors[0].device if tensors else None
    return (torch.as_tensor(t, dtype=dtype, device=device), torch.as_tensor(t_next, dtype=dtype, device=device))


def gaussian_kl(
    mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor, reduce: str = "sum"
) -> torch.Tensor:
    """KL(N(mean_p, s^2 I) || N(mean_q, s^2 I)) = ||mean_p - mean_q||^2 / (2 s^2) ``(B,)`` (docs/method.md §2, §4).

    ``mean_p``, ``mean_q`` ``(B, ...)``; ``std`` a float, 0-dim or ``(B, 1, ..., 1)``; ``reduce``: ``sum``
    over D (the true KL) or ``mean`` (divided by D).
    """
    if reduce not in LOGPROB_REDUCES:
        raise ValueError(f"reduce must be one of {LOGPROB_REDUCES}, got {reduce!r}")
    s = _per_sample(torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device), mean_p.shape[0])
    kl = (mean_p - mean_q).square().flatten(1).sum(1) / (2 * s**2)
    return kl / mean_p[0].numel() if reduce == "mean" else kl


# ----------------------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------------------


def _sde_steps(kind: str, num_steps: int, sde_window: Iterable[int] | None) -> tuple[int, ...]:
    if kind == "ode":
        if sde_window is not None:
            raise ValueError("sde_window needs kind 'sde' or 'cps', got kind='ode'")
        return ()
    steps = tuple(range(num_steps)) if sde_window is None else tuple(sorted(set(int(j) for j in sde_window)))
    bad = [j for j in steps if not 0 <= j < num_steps]
    if bad:
        raise ValueError(f"sde_window steps {bad} outside [0, {num_steps})")
    return steps


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    kind: str = "sde",
    noise_level: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_window: Iterable[int] | None = None,
    logprob_reduce: str = "mean",
    progress: Callable[[int, int], None] | None = None,
) -> Rollout:
    """Sample a trajectory from noise ``x_T`` ``(B, C, H, W)`` over ``sigmas`` ``(T+1,)`` (docs/method.md §1).

    ``kind``: ``sde`` / ``cps`` (stochastic, with log-probs) or ``ode`` (deterministic Euler, log-probs 0).
    ``sde_window``: step indices drawn with the SDE; the other steps are ODE steps with log-prob 0
    (Flow-GRPO-Fast); None = all steps. ``progress(j, T)`` is called after step j. Runs under no_grad;
    states are stored in a preallocated ``(B, T+1, C, H, W)`` buffer in the compute dtype.
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"kind must be one of {SAMPLER_KINDS}, got {kind!r}")
    if kind != "ode":
        _check_kind(kind, noise_level)
    if logprob_reduce not in LOGPROB_REDUCES:
        raise ValueError(f"logprob_reduce must be one of {LOGPROB_REDUCES}, got {logprob_reduce!r}")
    dtype = _compute_dtype(x_T)
    sigmas = torch.as_tensor(sigmas).to(device=x_T.device, dtype=dtype)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be a 1-D strictly decreasing tensor with at least 2 values")
    num_steps = sigmas.numel() - 1
    sde_steps = _sde_steps(kind, num_steps, sde_window)
    stochastic, times = set(sde_steps), sigmas.tolist()

    latents = torch.empty((x_T.shape[0], num_steps + 1, *x_T.shape[1:]), dtype=dtype, device=x_T.device)
    log_probs = torch.zeros((x_T.shape[0], num_steps), dtype=dtype, device=x_T.device)
    x = x_T.to(dtype)
    latents[:, 0] = x
    for j in range(num_steps):
        v = velocity_fn(x, times[j])
        if j in stochastic:
            step = sde_step(
                x, v, sigmas[j], sigmas[j + 1], noise_level=noise_level, kind=kind, generator=generator,
                logprob_reduce=logprob_reduce,
            )
            x = step.prev_sample
            log_probs[:, j] = step.log_prob
        else:
            x = ode_step(x, v, sigmas[j], sigmas[j + 1])
        latents[:, j + 1] = x
        if progress is not None:
            progress(j, num_steps)
    return Rollout(
        latents=latents, log_probs=log_probs, sigmas=sigmas, kind=kind, noise_level=noise_level,
        logprob_reduce=logprob_reduce, sde_steps=sde_steps,
    )


def transition_logprob(rollout: Rollout, step: int | torch.Tensor, v: torch.Tensor) -> StepResult:
    """Re-evaluate stored transition(s) of ``rollout`` under velocity ``v`` ``(B, C, H, W)`` (PPO ratios, §2).

    ``step``: one index j for the whole batch, or a ``(B,)`` long tensor of per-sample indices (random step
    subsets); ``v`` must be the velocity at the state(s) ``latents[:, j]`` and time(s) ``sigmas[j]``. With
    unchanged weights and the same batch composition, log_prob equals ``rollout.log_probs`` bit for bit.
    """
    if rollout.kind not in STOCHASTIC_KINDS:
        raise ValueError(f"rollout of kind {rollout.kind!r} has no stochastic transitions")
    lat, sig = rollout.latents, rollout.sigmas
    if isinstance(step, torch.Tensor) and step.ndim == 1:
        idx = step.to(lat.device)
        bad = sorted(set(idx.tolist()) - set(rollout.sde_steps))
        rows = torch.arange(lat.shape[0], device=lat.device)
        x, prev, t, t_next = lat[rows, idx], lat[rows, idx + 1], sig[idx], sig[idx + 1]
    else:
        j = int(step)
        bad = [] if j in rollout.sde_steps else [j]
        x, prev, t, t_next = lat[:, j], lat[:, j + 1], sig[j], sig[j + 1]
    if bad:
        raise ValueError(f"steps {bad} were not drawn with the SDE (rollout.sde_steps={rollout.sde_steps})")
    return sde_step(
        x, v, t, t_next, noise_level=rollout.noise_level, kind=rollout.kind, prev_sample=prev,
        logprob_reduce=rollout.logprob_reduce,
    )


def rollout_logprobs(
    velocity_fn: VelocityFn, rollout: Rollout, steps: Iterable[int] | None = None
) -> torch.Tensor:
    """Log-probs ``(B, len(steps))`` of the stored transitions ``steps`` (default: ``rollout.sde_steps``)
    recomputed with ``velocity_fn`` (grad follows the caller's mode)."""
    steps = rollout.sde_steps if steps is None else tuple(steps)
    if not steps:
        raise ValueError("no steps to re-evaluate (an ODE rollout, or an empty step list)")
    times = rollout.sigmas.tolist()
    out = [
        transition_logprob(rollout, j, velocity_fn(rollout.latents[:, j].contiguous(), times[j])).log_prob
        for j in steps
    ]
    return torch.stack(out, dim=1)
