"""Tests for flowopd_core.sampling.samplers (docs/method.md §1 samplers, §4 KL helpers).

Reference formulas here are written out independently from docs/method.md, in float64, so that a wrong
coefficient in the library makes them fail.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import stats

from flowopd_core.sampling.samplers import (
    Rollout,
    flow_sigmas,
    gaussian_kl,
    kl_weight,
    noisy_steps,
    ode_step,
    rollout_logprobs,
    sample,
    sde_noise_std,
    sde_step,
    transition_logprob,
)

F64 = torch.float64


def _ref_mean_std(x, v, t, t_next, a, kind, sigma_1):
    """docs/method.md §1 written out for python-float times; ``sigma_1`` = the schedule's second value."""
    dt = t_next - t
    if kind == "sde":
        sigma = a * math.sqrt(t / (1 - (sigma_1 if t == 1 else t)))
        mean = x * (1 + sigma**2 * dt / (2 * t)) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
        return mean, sigma * math.sqrt(-dt)
    std = t_next * math.sin(a * math.pi / 2)
    mean = (x - t * v) * (1 - t_next) + (x + (1 - t) * v) * math.sqrt(t_next**2 - std**2)
    return mean, std


# ----------------------------------------------------------------------------------------------------------
# 1. log-prob = Gaussian log-density of the drawn sample
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("cps", 0.8)])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("step", [0, 3])  # step 0 starts at t = 1 (the sigma_max rule)
def test_logprob_is_gaussian_density(kind, a, reduce, step):
    sig = flow_sigmas(8, shift=3.0).double()
    t, t_next = sig[step].item(), sig[step + 1].item()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)

    out = sde_step(x, v, t, t_next, noise_level=a, kind=kind, generator=g, logprob_reduce=reduce)

    mean, std = _ref_mean_std(x, v, t, t_next, a, kind, sig[1].item())
    density = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).flatten(1)
    expected = density.mean(1) if reduce == "mean" else density.sum(1)
    assert out.prev_sample.dtype == F64 and out.log_prob.shape == (3,)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-12)
    assert float(out.std) == pytest.approx(std, rel=1e-12)
    assert float(sde_noise_std(t, t_next, a, kind)) == pytest.approx(std, rel=1e-6)  # float32 helper


def test_per_sample_times_match_scalar_times():
    sig = flow_sigmas(6).double()
    idx = torch.tensor([0, 2, 5])
    g = torch.Generator().manual_seed(1)
    x, v, eps = (torch.randn(3, 2, 3, 3, generator=g, dtype=F64) for _ in range(3))
    for kind in ("sde", "cps"):
        batched = sde_step(x, v, sig[idx], sig[idx + 1], kind=kind, noise_level=0.7, noise=eps)
        for b in range(3):
            single = sde_step(x[b : b + 1], v[b : b + 1], sig[idx[b]].item(), sig[idx[b] + 1].item(),
                              kind=kind, noise_level=0.7, noise=eps[b : b + 1])
            torch.testing.assert_close(batched.prev_sample[b : b + 1], single.prev_sample, rtol=1e-14, atol=0)
            torch.testing.assert_close(batched.log_prob[b : b + 1], single.log_prob, rtol=1e-14, atol=0)


def test_cps_step_onto_zero_is_deterministic():
    x, v = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)
    out = sde_step(x, v, 0.1, 0.0, kind="cps", noise_level=0.8)
    assert torch.equal(out.prev_sample, out.mean)
    torch.testing.assert_close(out.mean, x - 0.1 * v)  # x0_hat
    assert torch.equal(out.log_prob, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="ddim"), dict(kind="sde", noise_level=0.0), dict(kind="cps", noise_level=1.2),
     dict(logprob_reduce="max")],
)
def test_sde_step_rejects_bad_arguments(kwargs):
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError):
        sde_step(x, x, 0.5, 0.4, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# 2. stored transitions re-evaluate to the same log-prob: PPO ratio exactly 1
# ----------------------------------------------------------------------------------------------------------


class _TinyVelocity(torch.nn.Module):
    """A deterministic time-conditioned velocity model; ``t`` a float or ``(B,)`` tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.conv(x) * (1 + t) - x * t


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("cps", 0.8)])
def test_rollout_reevaluation_gives_ratio_one(kind, a):
    model = _TinyVelocity()
    x_T = torch.randn(4, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    ro = sample(model, x_T, flow_sigmas(6, shift=3.0), kind=kind, noise_level=a,
                generator=torch.Generator().manual_seed(1))
    assert isinstance(ro, Rollout) and ro.num_steps == 6 and ro.latents.shape == (4, 7, 2, 6, 6)
    assert torch.equal(ro.latents[:, 0], x_T)

    with torch.no_grad():
        new = rollout_logprobs(model, ro)
        ratio = torch.exp(new - ro.log_probs)
        assert torch.equal(new, ro.log_probs) and torch.equal(ratio, torch.ones_like(ratio))

        # per-sample random step subset (same batch size), as the trainer draws it
        idx = torch.tensor([0, 3, 5, 2])
        rows = torch.arange(4)
        v = model(ro.latents[rows, idx], ro.sigmas[idx])
        assert torch.equal(transition_logprob(ro, idx, v).log_prob, ro.log_probs[rows, idx])

        # the check can fail: a slightly changed policy moves the ratio
        model.conv.bias.add_(1e-3)
        assert not torch.equal(rollout_logprobs(model, ro, steps=[1, 2]), ro.log_probs[:, 1:3])


def test_logprob_gradient_flows_to_the_velocity_only():
    model = _TinyVelocity()
    ro = sample(model, torch.randn(2, 2, 4, 4), flow_sigmas(4), kind="sde")
    lp = transition_logprob(ro, 1, model(ro.latents[:, 1], ro.sigmas[1].item())).log_prob
    lp.sum().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert not ro.latents.requires_grad


# ----------------------------------------------------------------------------------------------------------
# 3. marginals on an analytic Gaussian-to-Gaussian flow
# ----------------------------------------------------------------------------------------------------------
# x0 ~ N(m, s0^2) per dimension, eps ~ N(0, 1), x_t = (1 - t) x0 + t eps, so x_t ~ N((1 - t) m, V_t) with
# V_t = (1 - t)^2 s0^2 + t^2, Cov(eps, x_t) = t, Cov(x0, x_t) = (1 - t) s0^2, and the exact marginal velocity
#   v(x, t) = E[eps - x0 | x_t = x] = (t - (1 - t) s0^2) (x - (1 - t) m) / V_t - m.
M = torch.tensor([1.5, -0.5, 0.0, 0.8], dtype=F64).reshape(1, 4, 1, 1)
N_SAMPLES = 20_000


def _exact_velocity(s0):
    def velocity(x, t):
        var = (1 - t) ** 2 * s0**2 + t**2
        return (t - (1 - t) * s0**2) * (x - (1 - t) * M) / var - M

    return velocity


def _z_scores(x, mean, std):
    """Per-dimension z-scores of the sample mean and sample std of ``x`` ``(N, 4, 1, 1)`` against N(mean, std^2).

    For N Gaussian draws, mean_hat ~ N(mean, std^2 / N) and std_hat / std - 1 ~ N(0, 1 / (2 (N - 1))).
    """
    n = x.shape[0]
    z_mean = (x.mean(0) - mean) / (std / math.sqrt(n))
    z_std = (x.std(0) / std - 1) * math.sqrt(2 * (n - 1))
    return z_mean.flatten(), z_std.flatten()


def _final_state(velocity, x_T, sigmas, kind, generator, a=0.7):
    """Run the step functions over ``sigmas`` without storing the states (20k x 400 states would be 250 MB;
    ``test_sample_equals_the_step_loop`` ties :func:`sample` to these steps). ``kind="wrong"``: the Flow-GRPO
    SDE noise with the drift correction dropped, x' = x + v dt + s eps."""
    x = x_T
    for j in range(len(sigmas) - 1):
        t, t_next = sigmas[j], sigmas[j + 1]
        v = velocity(x, t.item())
        if kind == "ode":
            x = ode_step(x, v, t, t_next)
        elif kind == "wrong":
            x = ode_step(x, v, t, t_next) + sde_noise_std(t, t_next, a) * torch.randn(
                x.shape, generator=generator, dtype=F64
            )
        else:
            x = sde_step(x, v, t, t_next, noise_level=a, kind=kind, generator=generator).prev_sample
    return x


def test_sde_and_ode_share_the_data_marginal():
    """Tolerance: |z| < 5. With 20k samples each z-score has unit variance (checked over 30 seeds: sd 0.9 to
    1.15); the deterministic bias left at T = 400 steps is < 1.1 z units (std ratio 0.995 to 1.005, computed
    exactly by propagating the linear-Gaussian chain; Euler's O(1/T) bias would be ~10 z units at T = 40,
    hence T = 400). The Flow-GRPO SDE keeps a slowly vanishing bias from its singular sigma_t near t = 1 (its
    first step adds noise of std ~a whatever T is): std ratio 1.0052 at T = 400, 1.0030 at T = 2000 for s0 = 2.
    """
    s0 = torch.tensor([0.3, 0.6, 1.0, 1.5], dtype=F64).reshape(1, 4, 1, 1)
    velocity, sigmas = _exact_velocity(s0), flow_sigmas(400).double()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N_SAMPLES, 4, 1, 1, generator=g, dtype=F64)

    finals = {kind: _final_state(velocity, x_T, sigmas, kind, g) for kind in ("sde", "ode")}
    for kind, x0 in finals.items():
        z_mean, z_std = _z_scores(x0, M, s0)
        assert z_mean.abs().max() < 5 and z_std.abs().max() < 5, (kind, z_mean, z_std)
        for d in range(4):
            ref = (M.flatten()[d].item(), s0.flatten()[d].item())
            assert stats.kstest(x0[:, d, 0, 0].numpy(), "norm", args=ref).pvalue > 1e-4, (kind, d)
    for d in range(4):  # the two samplers against each other
        assert stats.ks_2samp(finals["sde"][:, d, 0, 0].numpy(), finals["ode"][:, d, 0, 0].numpy()).pvalue > 1e-4

    _, z_std = _z_scores(_final_state(velocity, x_T, sigmas, "wrong", g), M, s0)
    assert z_std.min() > 50  # the check detects a wrong drift (std ratio > 2 here)


def test_sample_equals_the_step_loop():
    """:func:`sample` is exactly the loop of step functions (so the marginal tests above cover it)."""
    velocity, sigmas = _exact_velocity(torch.full((1, 4, 1, 1), 0.5, dtype=F64)), flow_sigmas(5).double()
    x_T = torch.randn(6, 4, 1, 1, dtype=F64)
    for kind in ("sde", "cps", "ode"):
        ro = sample(velocity, x_T, sigmas, kind=kind, noise_level=0.7, generator=torch.Generator().manual_seed(3))
        loop = _final_state(velocity, x_T, sigmas, kind, torch.Generator().manual_seed(3))
        assert torch.equal(ro.latents[:, -1], loop), kind


def test_cps_preserves_coefficients():
    """CPS keeps x_t ~ N((1 - t) m, t^2) at every visited step when the data is a point (s0 = 0): with the
    exact velocity, x0_hat = m and x1_hat = eps exactly. Dropping the -s^2 under the square root breaks it."""
    s0 = torch.zeros(1, 4, 1, 1, dtype=F64)
    velocity, sigmas = _exact_velocity(s0), flow_sigmas(40).double()
    g = torch.Generator().manual_seed(0)
    ro = sample(velocity, torch.randn(N_SAMPLES, 4, 1, 1, generator=g, dtype=F64), sigmas, kind="cps",
                noise_level=0.8, generator=g)
    for j in (1, 10, 30, 39):
        t = sigmas[j].item()
        z_mean, z_std = _z_scores(ro.latents[:, j], (1 - t) * M, t)
        assert z_mean.abs().max() < 5 and z_std.abs().max() < 5, (j, z_mean, z_std)
    torch.testing.assert_close(ro.latents[:, -1], M.expand(N_SAMPLES, 4, 1, 1), rtol=0, atol=1e-12)

    # wrong coefficient: mu = x0_hat (1 - t') + x1_hat t'  -> std t' sqrt(1 + sin^2) at every step
    x, j = ro.latents[:, 9], 9
    t, t_next = sigmas[j].item(), sigmas[j + 1].item()
    v = velocity(x, t)
    wrong = (x - t * v) * (1 - t_next) + (x + (1 - t) * v) * t_next
    wrong = wrong + t_next * math.sin(0.8 * math.pi / 2) * torch.randn(x.shape, generator=g, dtype=F64)
    _, z_std = _z_scores(wrong, (1 - t_next) * M, t_next)
    assert z_std.min() > 50


def test_cps_shrinks_the_spread_of_non_point_data():
    """A property to know, not a bug: CPS re-noises from x0_hat = E[x0 | x_t] with a noise fraction that does
    not shrink with the step size, so with exact velocities it under-disperses spread-out data. Measured by
    exact propagation: final std / s0 = 0.80 at a = 0.8 for T = 40, 400 and 2000 alike. Means stay exact."""
    s0 = torch.tensor([0.3, 0.6, 1.0, 1.5], dtype=F64).reshape(1, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N_SAMPLES, 4, 1, 1, generator=g, dtype=F64)
    ro = sample(_exact_velocity(s0), x_T, flow_sigmas(40).double(), kind="cps", noise_level=0.8, generator=g)
    z_mean, _ = _z_scores(ro.latents[:, -1], M, s0)
    ratio = (ro.latents[:, -1].std(0) / s0).flatten()
    assert z_mean.abs().max() < 5
    assert ((ratio > 0.72) & (ratio < 0.86)).all(), ratio


# ----------------------------------------------------------------------------------------------------------
# 4. ODE step = diffusers' Euler step; sigmas = diffusers' sigmas
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 10, 40])
def test_flow_sigmas_match_diffusers(shift, num_steps):
    own = flow_sigmas(num_steps, shift=shift)
    ref = flow_sigmas(num_steps, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    assert own.dtype == torch.float32 and own.shape == (num_steps + 1,)
    assert own[0] == 1 and own[-1] == 0
    assert torch.equal(own, ref)


def test_ode_step_matches_diffusers_scheduler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = flow_sigmas(10, scheduler=scheduler)
    g = torch.Generator().manual_seed(0)
    x = ours = torch.randn(2, 4, 8, 8, generator=g)
    for j, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
        ours = ode_step(ours, v, sigmas[j].item(), sigmas[j + 1].item())
        assert torch.equal(ours, x), j


# ----------------------------------------------------------------------------------------------------------
# 5. closed-form KL between same-covariance Gaussians; KL = w(t) ||dv||^2
# ----------------------------------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_kl():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.randn(3, 2, 4, 4, generator=g, dtype=F64), torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    std = torch.tensor([0.3, 0.7, 1.1], dtype=F64).reshape(3, 1, 1, 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std.expand_as(mp)), torch.distributions.Normal(mq, std.expand_as(mq))
    ).flatten(1)
    torch.testing.assert_close(gaussian_kl(mp, mq, std), ref.sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(gaussian_kl(mp, mq, std, reduce="mean"), ref.mean(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind,a", [("sde", 0.7), ("cps", 0.8)])
def test_kl_equals_weight_times_velocity_gap(kind, a):
    sig = flow_sigmas(10, shift=3.0).double()
    idx = torch.tensor([0, 4, 8])  # includes t = 1; the CPS step onto 0 (idx 9) has no KL
    t, t_next = sig[idx], sig[idx + 1]
    g = torch.Generator().manual_seed(0)
    x, v_p, v_q = (torch.randn(3, 2, 4, 4, generator=g, dtype=F64) for _ in range(3))
    p = sde_step(x, v_p, t, t_next, noise_level=a, kind=kind, generator=g)
    q = sde_step(x, v_q, t, t_next, noise_level=a, kind=kind, prev_sample=p.prev_sample)
    kl = gaussian_kl(p.mean, q.mean, p.std)
    gap = (v_p - v_q).square().flatten(1).sum(1)
    torch.testing.assert_close(kl, kl_weight(t, t_next, a, kind) * gap, rtol=1e-10, atol=0)
    if kind == "sde":  # the docs/method.md §4 formula, written out
        for b in range(3):
            tb, tn = t[b].item(), t_next[b].item()
            sigma = a * math.sqrt(tb / (1 - (sig[1].item() if tb == 1 else tb)))
            w = (tb - tn) / 2 * (sigma * (1 - tb) / (2 * tb) + 1 / sigma) ** 2
            assert kl[b].item() == pytest.approx(w * gap[b].item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# 6. half precision inputs: float32 arithmetic
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_half_inputs_use_float32_arithmetic(half, kind):
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(2, 4, 8, 8, generator=g).to(half) for _ in range(2))
    eps = torch.randn(2, 4, 8, 8, generator=g)
    out = sde_step(x, v, 0.9, 0.8, kind=kind, noise_level=0.7, noise=eps)
    ref = sde_step(x.float(), v.float(), 0.9, 0.8, kind=kind, noise_level=0.7, noise=eps)
    assert out.prev_sample.dtype == out.log_prob.dtype == out.mean.dtype == torch.float32
    assert torch.equal(out.prev_sample, ref.prev_sample) and torch.equal(out.log_prob, ref.log_prob)
    assert ode_step(x, v, 0.9, 0.8).dtype == torch.float32
    assert torch.equal(ode_step(x, v, 0.9, 0.8), ode_step(x.float(), v.float(), 0.9, 0.8))


def test_sample_stores_float32_states_for_a_half_model():
    seen = []

    def bf16_velocity(x, t):
        seen.append(x.dtype)
        return (x.to(torch.bfloat16) * (1 - t)).to(torch.bfloat16)

    ro = sample(bf16_velocity, torch.randn(2, 4, 4, 4).to(torch.bfloat16), flow_sigmas(3), kind="sde")
    assert ro.latents.dtype == ro.log_probs.dtype == torch.float32
    assert seen == [torch.float32] * 3


# ----------------------------------------------------------------------------------------------------------
# 7. sde_window: ODE steps outside, log-prob 0 there
# ----------------------------------------------------------------------------------------------------------


def test_sde_window_steps_outside_are_deterministic():
    model = _TinyVelocity()
    sigmas = flow_sigmas(6, shift=3.0)
    x_T = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    runs = [
        sample(model, x_T, sigmas, kind="sde", sde_window=range(2, 4), generator=torch.Generator().manual_seed(s))
        for s in (1, 2)
    ]
    ro = runs[0]
    assert ro.sde_steps == (2, 3)
    assert torch.equal(ro.log_probs[:, [0, 1, 4, 5]], torch.zeros(3, 4))
    assert (ro.log_probs[:, 2:4] != 0).all()
    with torch.no_grad():
        for j in (0, 1, 4, 5):
            v = model(ro.latents[:, j], sigmas[j].item())
            assert torch.equal(ro.latents[:, j + 1], ode_step(ro.latents[:, j], v, sigmas[j], sigmas[j + 1]))
    assert torch.equal(runs[0].latents[:, :3], runs[1].latents[:, :3])  # before the window: no noise
    assert not torch.equal(runs[0].latents[:, 3], runs[1].latents[:, 3])
    with pytest.raises(ValueError, match="not drawn with the SDE"):
        transition_logprob(ro, 1, model(ro.latents[:, 1], sigmas[1].item()))


def test_ode_sampler_has_no_log_probs_and_is_deterministic():
    model = _TinyVelocity()
    x_T = torch.randn(2, 2, 4, 4)
    a, b = (sample(model, x_T, flow_sigmas(5), kind="ode") for _ in range(2))
    assert a.sde_steps == () and torch.equal(a.log_probs, torch.zeros(2, 5)) and torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError):
        sample(model, x_T, flow_sigmas(5), kind="ode", sde_window=[1])
    with pytest.raises(ValueError):
        rollout_logprobs(model, a)


@pytest.mark.parametrize(
    "sigmas,kwargs",
    [(np.array([1.0, 0.5, 0.6, 0.0]), {}), (np.array([1.0]), {}), (np.array([1.0, 0.0]), dict(sde_window=[1])),
     (np.array([1.0, 0.0]), dict(kind="euler"))],
)
def test_sample_rejects_bad_arguments(sigmas, kwargs):
    with pytest.raises(ValueError):
        sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), torch.from_numpy(sigmas).float(), **kwargs)


def test_progress_callback_sees_every_step():
    calls = []
    sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), flow_sigmas(4), kind="ode",
           progress=lambda j, n: calls.append((j, n)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_noisy_steps_leave_out_the_near_deterministic_transitions():
    sigmas = flow_sigmas(8)  # 1, 6/7 ..., 1/7 (about), 1e-3, 0
    assert sigmas[-2].item() == pytest.approx(1e-3)
    std = {kind: sde_noise_std(sigmas[:-1], sigmas[1:], a, kind) for kind, a in (("sde", 0.7), ("cps", 0.8))}
    # CPS: std = t_next sin(0.4 pi), so the step onto sigma_min = 1e-3 has std ~1e-3 and the last one 0
    assert std["cps"][6].item() == pytest.approx(1e-3 * math.sin(0.4 * math.pi), rel=1e-4)
    assert noisy_steps(sigmas, 0.8, "cps", 0.01) == (0, 1, 2, 3, 4, 5)
    assert noisy_steps(sigmas, 0.7, "sde", 0.01) == (0, 1, 2, 3, 4, 5, 6)  # SDE std there is still ~0.1
    assert std["sde"][6].item() > 0.1 and std["sde"][7].item() < 0.01
    assert noisy_steps(sigmas, 0.8, "cps", 0.0) == tuple(range(7))  # the step onto 0 has std 0: never trained
    for kind in ("sde", "cps"):  # exactly the steps whose std reaches the floor
        a = 0.7 if kind == "sde" else 0.8
        for floor in (1e-4, 0.05, 0.2):
            assert noisy_steps(sigmas, a, kind, floor) == tuple(j for j in range(8) if std[kind][j].item() >= floor)
    with pytest.raises(ValueError, match="kind"):
        noisy_steps(sigmas, 0.7, "ode", 0.01)
