"""Flow-OPD objective (docs/method.md §4, §5): routing, blending, closed-form KL, the three loss modes and MAR."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from flowopd_core.distill.loss import DEFAULT_KL_FORM, DISTILL_MODES, blend_velocities, distill_loss, route, step_kl
from flowopd_core.prompts import UNTAGGED, PromptSpec
from flowopd_core.sampling.samplers import sde_step

TEACHERS = ("geneval", "ocr", "pickscore")
D64 = torch.float64


def _prompts(*tasks):
    return [PromptSpec(f"prompt {i}", task=task) for i, task in enumerate(tasks)]


# ------------------------------------------------------------------------------------------------ routing


def test_hard_routing_follows_the_task_tag_and_blends_untagged_prompts_uniformly():
    plan = route(_prompts("ocr", "geneval", UNTAGGED, "ocr"), TEACHERS, mode="hard")
    assert plan.index.tolist() == [1, 0, -1, 1] and not plan.is_hard
    assert torch.allclose(plan.weights[2], torch.full((3,), 1 / 3))
    assert torch.equal(plan.weights[0], torch.tensor([0.0, 1.0, 0.0]))
    assert plan.rows(1).tolist() == [0, 2, 3] and plan.rows(2).tolist() == [2]
    assert route(_prompts("ocr", "pickscore"), TEACHERS).is_hard
    with pytest.raises(ValueError, match=r"no teacher for task\(s\) \['aesthetic'\]"):
        route(_prompts("ocr", "aesthetic"), TEACHERS)
    with pytest.raises(ValueError, match="soft routing"):
        route(_prompts("ocr"), TEACHERS, mode="hard", task_weights={"ocr": {"ocr": 1.0}})
    with pytest.raises(ValueError, match="route mode"):
        route(_prompts("ocr"), TEACHERS, mode="mixed")


def test_soft_routing_uses_normalised_task_weights():
    weights = {"ocr": {"ocr": 3.0, "pickscore": 1.0}, UNTAGGED: {"pickscore": 2.0}}
    plan = route(_prompts("ocr", "geneval", UNTAGGED), TEACHERS, mode="soft", task_weights=weights)
    assert torch.allclose(plan.weights, torch.tensor([[0.0, 0.75, 0.25], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(plan.weights.sum(1), torch.ones(3))
    assert plan.index.tolist() == [-1, 0, 2]
    for bad in ({"ocr": {"ocr": -1.0, "geneval": 2.0}}, {"ocr": {"ocr": 0.0}}, {"ocr": {"dino": 1.0}}):
        with pytest.raises(ValueError, match="task_weights"):
            route(_prompts("ocr"), TEACHERS, mode="soft", task_weights=bad)


def test_blend_gathers_hard_rows_weights_soft_rows_and_never_reads_unrouted_teachers():
    plan = route(_prompts("ocr", UNTAGGED, "geneval"), TEACHERS, mode="soft",
                 task_weights={"geneval": {"geneval": 1.0, "ocr": 1.0}})
    v = torch.randn(3, 3, 2, 4, 4, dtype=D64)
    v[2, 0] = float("nan")  # teacher "pickscore" is not needed for sample 0
    v[2, 2] = float("nan")
    out = blend_velocities(v, plan)
    assert torch.equal(out[0], v[1, 0])
    assert torch.allclose(out[1], v[:, 1].mean(0))
    assert torch.allclose(out[2], 0.5 * (v[0, 2] + v[1, 2]))
    with pytest.raises(ValueError, match="v_teachers"):
        blend_velocities(v[:2], plan)


# ------------------------------------------------------------------------------------------------ KL


@pytest.mark.parametrize("kind, noise_level", [("sde", 0.7), ("cps", 0.8)])
def test_closed_form_step_kl_equals_the_gaussian_kl_of_the_two_transitions(kind, noise_level):
    g = torch.Generator().manual_seed(0)
    x, vs, vt = (torch.randn(3, 2, 4, 4, generator=g, dtype=D64) for _ in range(3))
    t = torch.tensor([1.0, 0.6, 0.3], dtype=D64)
    t_next = torch.tensor([0.9, 0.45, 0.2], dtype=D64)
    ps = sde_step(x, vs, t, t_next, noise_level=noise_level, kind=kind, noise=torch.zeros_like(x))
    pt = sde_step(x, vt, t, t_next, noise_level=noise_level, kind=kind, noise=torch.zeros_like(x))
    std = ps.std.expand_as(ps.mean)
    numeric = kl_divergence(Normal(ps.mean, std), Normal(pt.mean, std)).flatten(1).sum(1)
    closed = step_kl(vs, vt, t, t_next, noise_level=noise_level, kind=kind)
    assert torch.allclose(closed, numeric, rtol=1e-10)
    d = x[0].numel()
    assert torch.allclose(step_kl(vs, vt, t, t_next, noise_level=noise_level, kind=kind, form="mean"), numeric / d)
    flow_grpo = step_kl(vs, vt, t, t_next, noise_level=noise_level, kind=kind, form="flow_grpo")
    scale = (t - t_next) if kind == "sde" else torch.ones_like(t)
    assert torch.allclose(flow_grpo, numeric * scale / d)
    assert torch.equal(step_kl(vs, vs, t, t_next, noise_level=noise_level, kind=kind), torch.zeros(3, dtype=D64))


def test_step_kl_rejects_the_deterministic_cps_last_step_and_bad_forms():
    v = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="finite KL weight"):
        step_kl(v, v + 1, 0.1, 0.0, kind="cps", noise_level=0.8)
    with pytest.raises(ValueError, match="KL form"):
        step_kl(v, v, 0.5, 0.4, form="sum")


# ------------------------------------------------------------------------------------------------ loss


class LinearStudent(torch.nn.Module):
    """v = W x per pixel (a 1x1 convolution): a tiny differentiable velocity model."""

    def __init__(self, channels=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, generator=g, dtype=D64))

    def forward(self, x):
        return torch.einsum("oc,bchw->bohw", self.weight, x)


def _step_inputs(student, teacher_weight, seed=0, t=0.7, t_next=0.6):
    """One stored SDE transition drawn by the student, and the student's re-evaluated log-prob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=D64)
    with torch.no_grad():
        old = sde_step(x, student(x), t, t_next, generator=g)
    v_student = student(x)
    new = sde_step(x, v_student, t, t_next, prev_sample=old.prev_sample)
    v_teacher = torch.einsum("oc,bchw->bohw", teacher_weight, x)
    return dict(v_student=v_student, v_target=v_teacher, t=t, t_next=t_next, logp_new=new.log_prob,
                logp_old=old.log_prob)


@pytest.mark.parametrize("mode", DISTILL_MODES)
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(mode):
    student = LinearStudent()
    inputs = _step_inputs(student, student.weight.detach().clone())
    loss = distill_loss(mode, **inputs, v_anchor=inputs["v_target"], anchor_weight=0.04)
    assert float(loss.kl.abs().max()) == 0.0 and float(loss.anchor.detach()) == 0.0
    assert float(loss.total.detach()) == 0.0  # paper mode: zero advantage -> zero surrogate
    loss.total.backward()
    assert torch.equal(student.weight.grad, torch.zeros_like(student.weight))
    if mode != "direct":
        assert torch.equal(loss.advantages, torch.zeros(4, dtype=D64))


def test_paper_and_authors_modes_differ_in_detaching_scale_and_clamp():
    student, teacher = LinearStudent(seed=0), LinearStudent(seed=1).weight.detach()
    inputs = _step_inputs(student, teacher)
    paper = distill_loss("paper", **inputs)
    authors = distill_loss("authors", **inputs)
    assert paper.form == "true" and authors.form == "flow_grpo"
    assert torch.equal(paper.advantages, -paper.kl)  # unclamped true KL
    assert torch.equal(authors.advantages, (-authors.kl).clamp(-5, 5))
    assert torch.allclose(authors.kl, paper.kl * 0.1 / 32)  # |dt| / D
    # paper: on-policy (rho = 1) the gradient is the score-function one, -mean(A grad logp); the velocity gap
    # gets no gradient. authors: the gradient also flows through A.
    grad_paper = torch.autograd.grad(paper.total, student.weight, retain_graph=True)[0]
    expected = torch.autograd.grad(-(paper.advantages * inputs["logp_new"]).mean(), student.weight,
                                   retain_graph=True)[0]
    assert torch.allclose(grad_paper, expected)
    grad_authors = torch.autograd.grad(authors.total, student.weight, retain_graph=True)[0]
    score_only = torch.autograd.grad(-(authors.advantages * inputs["logp_new"]).mean(), student.weight)[0]
    assert not torch.allclose(grad_authors, score_only)
    with pytest.raises(ValueError, match="needs logp_new"):
        distill_loss("paper", v_student=inputs["v_student"], v_target=inputs["v_target"], t=0.7, t_next=0.6)


@pytest.mark.parametrize("mode", DISTILL_MODES)
def test_mar_term_carries_the_gradient_of_lambda_times_the_anchor_kl(mode):
    """MAR (docs/method.md §5) trains the student: with the student equal to its teacher (no distillation signal),
    the whole gradient is lambda * d mean KL(student || anchor) / d theta, computed here independently."""
    student = LinearStudent(seed=0)
    inputs = _step_inputs(student, student.weight.detach().clone())
    anchor_v = torch.einsum("oc,bchw->bohw", LinearStudent(seed=2).weight.detach(), inputs["v_student"].detach())
    loss = distill_loss(mode, **inputs, v_anchor=anchor_v, anchor_weight=0.5)
    (got,) = torch.autograd.grad(loss.total, student.weight)
    g = torch.Generator().manual_seed(0)  # the same x as _step_inputs(seed=0) draws first
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=D64)
    kl = step_kl(student(x), anchor_v, 0.7, 0.6, form=DEFAULT_KL_FORM[mode])  # the mode's KL form
    (want,) = torch.autograd.grad(0.5 * kl.mean(), student.weight)
    assert float(want.abs().max()) > 1e-6  # the anchor pulls: a detached student velocity would give 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_direct_distillation_moves_the_student_toward_the_teacher():
    student, teacher = LinearStudent(seed=0), LinearStudent(seed=1).weight.detach()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.02)
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=D64)
    gap_before = (student(x) - torch.einsum("oc,bchw->bohw", teacher, x)).square().mean().item()
    kls = []
    for seed in range(10):
        optimizer.zero_grad()
        loss = distill_loss("direct", **_step_inputs(student, teacher, seed=seed))
        loss.total.backward()
        optimizer.step()
        kls.append(loss.kl_mean.item())
    gap_after = (student(x) - torch.einsum("oc,bchw->bohw", teacher, x)).square().mean().item()
    assert gap_after < 0.5 * gap_before and kls[-1] < kls[0]


def test_anchor_term_is_lambda_times_the_kl_to_the_anchor_on_every_sample():
    student, teacher = LinearStudent(seed=0), LinearStudent(seed=1).weight.detach()
    inputs = _step_inputs(student, teacher)
    anchor_v = torch.zeros_like(inputs["v_target"])
    loss = distill_loss("direct", **inputs, v_anchor=anchor_v, anchor_weight=0.02)
    expected = step_kl(inputs["v_student"], anchor_v, 0.7, 0.6)
    assert torch.allclose(loss.anchor_kl, expected) and torch.allclose(loss.anchor, 0.02 * expected.mean())
    assert torch.allclose(loss.total, loss.opd + loss.anchor)
    no_anchor = distill_loss("direct", **inputs)
    assert no_anchor.anchor_kl is None and float(no_anchor.anchor) == 0.0
    with pytest.raises(ValueError, match="v_anchor"):
        distill_loss("direct", **inputs, anchor_weight=0.1)


def _surrogate_gradients(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. a student velocity theta (shared by n samples of one transition x_t -> x_{t+1}) of the
    paper-mode and direct-mode losses, float64; the teacher's velocity is 1, the student's 0."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(1, 1, 2, 4, dtype=D64, requires_grad=True)
    x = torch.randn(1, 1, 2, 4, generator=gen, dtype=D64).expand(n, -1, -1, -1)
    v = theta.expand(n, -1, -1, -1)
    v_teacher = torch.ones_like(x)
    old = sde_step(x, v.detach(), 0.8, 0.6, generator=gen)
    new = sde_step(x, v, 0.8, 0.6, prev_sample=old.prev_sample)
    grads = []
    for mode in ("paper", "direct"):
        loss = distill_loss(mode, v_student=v, v_target=v_teacher, t=0.8, t_next=0.6, logp_new=new.log_prob,
                            logp_old=old.log_prob, clip_range=1e9)
        grads.append(torch.autograd.grad(loss.total, theta, retain_graph=True)[0].flatten())
    return grads[0], grads[1]


def test_paper_mode_per_step_advantage_has_zero_expected_gradient():
    """The paper's detached dense reward r_t = -KL_t is a function of the state x_t alone, not of the sampled
    x_{t+1}; as a per-step PPO advantage its gradient is r_t E[grad log pi(x_{t+1} | x_t)] = 0 in expectation
    (the score-function identity): the step's own KL can only be reduced through the noise of the estimate.
    The direct (pathwise) gradient of the same KL is not zero. Measured here with many draws."""
    paper, direct = _surrogate_gradients(n=200_000, seed=0)
    assert direct.norm() > 0.1
    assert paper.norm() < 0.01 * direct.norm(), (paper.norm(), direct.norm())
    few, _ = _surrogate_gradients(n=8, seed=1)  # ...while a small batch gives a noisy, non-zero gradient
    assert few.norm() > 10 * paper.norm()
