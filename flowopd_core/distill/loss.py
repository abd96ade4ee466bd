"""Flow-OPD distillation objective: task routing, target velocities, per-step KL, the three loss modes and MAR
(docs/method.md §4, §5). Pure tensor functions; the trainer owns rollouts, forwards and optimisers.

Notation (docs/method.md): a trained step goes from t to t_next < t, dt = t_next - t; s = per-element std of the
transition; D = elements of one latent; B = samples; K = teachers. For the SDE the student and target
transitions share s, so their reverse KL is (§4)

    KL_t = ||mu_theta - mu_tgt||^2 / (2 s^2) = w(t) ||v_theta - v_tgt||^2,
    w(t) = (|dt| / 2) (sigma_t (1 - t) / (2t) + 1 / sigma_t)^2        (summed over D)

KL forms (``KL_FORMS``, as :func:`flowopd_core.grpo.trainer.kl_to_reference`): ``true`` = the KL above; ``mean`` = /D;
``flow_grpo`` = the authors' scale, mean over D and sigma_t^2 instead of s^2 = sigma_t^2 |dt| in the
denominator, i.e. true x |dt| / D (``cps``: true / D).

Loss modes (``DISTILL_MODES``), per trained step of a micro-batch (§4):

- ``paper``: r_t = -KL_t (form ``true`` by default), DETACHED, is the per-sample advantage of the PPO-clip
  surrogate on the student's re-evaluated log-probs: L = mean_i max(-r_i rho_i, -r_i clip(rho_i, 1 +- eps)).
- ``authors``: A = clamp(-KL_t, -5, 5) in form ``flow_grpo`` and NOT detached, in the same surrogate: the
  gradient flows both through rho and through the velocity gap.
- ``direct``: L = mean_i KL_t,i (GKD-style pathwise minimisation; no log-probs needed).

MAR (§5): anchor term = lambda mean_i w(t) ||v_theta - v_anchor||^2 (same KL form as the mode) on all prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flowopd_core.choices import DISTILL_MODES
from flowopd_core.choices import ROUTE_MODES as ROUTE_MODES
from flowopd_core.distill.routing import route_rows
from flowopd_core.grpo.loss import KL_FORMS, ppo_clip_loss
from flowopd_core.prompts import PromptSpec
from flowopd_core.sampling.samplers import STOCHASTIC_KINDS, Time, kl_weight

# ROUTE_MODES, DISTILL_MODES: flowopd_core.choices (re-exported here); the modes: see the module doc.
DEFAULT_KL_FORM = {"paper": "true", "authors": "flow_grpo", "direct": "true"}
"""KL form each mode uses unless told otherwise."""
AUTHORS_ADVANTAGE_CLIP = 5.0
"""The authors' clamp of the (non-detached) dense reward."""


# ----------------------------------------------------------------------------------------------------------
# Routing (§4)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutePlan:
    """Which teacher(s) supervise each sample.

    teachers: the K teacher names (= the task tags they serve), in the order of the ``(K, ...)`` stacks.
    weights: ``(B, K)`` float32 blend weights alpha_k(c), rows sum to 1, entries >= 0.
    index: ``(B,)`` long, the teacher of a one-hot row, -1 for a blended row.
    """

    mode: str
    teachers: tuple[str, ...]
    weights: torch.Tensor
    index: torch.Tensor

    @property
    def is_hard(self) -> bool:
        """True when every sample has exactly one teacher (a gather suffices)."""
        return bool((self.index >= 0).all())

    def rows(self, k: int) -> torch.Tensor:
        """``(n,)`` long: the samples that need teacher ``k``'s velocity (weight > 0)."""
        return torch.nonzero(self.weights[:, k] > 0).flatten()


def route(
    prompts: Sequence[PromptSpec],
    teachers: Sequence[str],
    mode: str = "hard",
    task_weights: Mapping[str, Mapping[str, float]] | None = None,
) -> RoutePlan:
    """Route each prompt to its teacher(s) (docs/method.md §4).

    A teacher is named by the task tag it serves. ``hard``: a prompt tagged ``task`` gets the teacher ``task``.
    ``soft``: a prompt tagged ``task`` gets ``task_weights[task]`` (``teacher -> weight``, normalised to sum
    1; missing teachers get 0) and, for a task with no entry, its own teacher alone.

    Untagged prompts (``task == UNTAGGED``), in both modes: a uniform blend over all K teachers, unless
    ``task_weights[UNTAGGED]`` (soft mode) gives the blend. A tagged prompt whose task has no teacher raises.
    """
    teachers = tuple(teachers)
    rows = route_rows([p.task for p in prompts], teachers, mode, task_weights)
    weights = torch.tensor([rows[p.task] for p in prompts], dtype=torch.float32).reshape(len(prompts), len(teachers))
    one_hot = (weights == 1.0).any(1)
    index = torch.where(one_hot, weights.argmax(1), torch.full_like(one_hot, -1, dtype=torch.long))
    return RoutePlan(mode=mode, teachers=teachers, weights=weights, index=index)


def blend_velocities(v_teachers: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """Target velocity v_tgt = sum_k alpha_k v_k ``(B, C, H, W)`` from ``v_teachers`` ``(K, B, C, H, W)`` (§4).

    One-hot rows are gathered exactly; entries of teachers with weight 0 are never read (the pool may leave
    them uncomputed, e.g. NaN). Returned in ``v_teachers``' dtype.
    """
    k, batch = len(plan.teachers), plan.weights.shape[0]
    if v_teachers.shape[:2] != (k, batch):
        raise ValueError(f"v_teachers must be (K={k}, B={batch}, ...), got {tuple(v_teachers.shape)}")
    w = plan.weights.to(device=v_teachers.device, dtype=v_teachers.dtype).T  # (K, B)
    w = w.reshape(k, batch, *([1] * (v_teachers.ndim - 2)))
    blended = torch.where(w > 0, w * v_teachers, torch.zeros((), dtype=v_teachers.dtype)).sum(0)
    index = plan.index.to(v_teachers.device)
    gathered = v_teachers[index.clamp(min=0), torch.arange(batch, device=v_teachers.device)]
    hard = (index >= 0).reshape(batch, *([1] * (v_teachers.ndim - 2)))
    return torch.where(hard, gathered, blended)


# ----------------------------------------------------------------------------------------------------------
# Per-step KL (§4)
# ----------------------------------------------------------------------------------------------------------


def step_kl(
    v_student: torch.Tensor,
    v_target: torch.Tensor,
    t: Time,
    t_next: Time,
    *,
    noise_level: float = 0.7,
    kind: str = "sde",
    form: str = "true",
) -> torch.Tensor:
    """KL(pi_theta || pi_tgt) of one transition per sample ``(B,)`` = w(t) ||v_theta - v_tgt||^2 (§4).

    v_student, v_target: ``(B, C, H, W)`` (CFG-combined when CFG is on); t, t_next: floats, 0-dim or ``(B,)``.
    ``form``: ``true`` (summed over D), ``mean`` (/D) or ``flow_grpo`` (the authors': true x |dt| / D for
    ``sde``, true / D for ``cps``). Computed in float32 (float64 for float64 inputs); differentiable in both
    velocities. Raises on a step without a finite weight (``cps`` onto t_next = 0, which is deterministic).
    """
    if form not in KL_FORMS:
        raise ValueError(f"KL form must be one of {KL_FORMS}, got {form!r}")
    if kind not in STOCHASTIC_KINDS:
        raise ValueError(f"kind must be one of {STOCHASTIC_KINDS}, got {kind!r}")
    if v_student.shape != v_target.shape:
        raise ValueError(f"velocity shapes differ: {tuple(v_student.shape)} vs {tuple(v_target.shape)}")
    dtype = torch.float64 if v_student.dtype == torch.float64 else torch.float32
    batch, d = v_student.shape[0], v_student[0].numel()
    t = torch.as_tensor(t, dtype=dtype, device=v_student.device)
    t_next = torch.as_tensor(t_next, dtype=dtype, device=v_student.device)
    w = kl_weight(t, t_next, noise_level, kind).reshape(-1).expand(batch)
    if not torch.isfinite(w).all():
        raise ValueError(f"no finite KL weight for the step t={t.tolist()} -> {t_next.tolist()} ({kind})")
    gap = (v_student.to(dtype) - v_target.to(dtype)).square().flatten(1).sum(1)
    kl = w * gap
    if form == "true":
        return kl
    if form == "flow_grpo" and kind == "sde":
        return kl * (t - t_next).abs().reshape(-1).expand(batch) / d
    return kl / d


# ----------------------------------------------------------------------------------------------------------
# Loss (§4, §5)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DistillLoss:
    """The distillation loss of one trained step of a micro-batch (docs/method.md §4, §5), terms kept apart.

    total: 0-dim, opd + anchor (with grad).
    opd: 0-dim, the mode's distillation term (with grad).
    anchor: 0-dim, lambda mean_i KL(student || anchor) (with grad; 0 without an anchor).
    kl: ``(B,)`` detached KL_t to the target in ``form``; kl_mean: its mean (0-dim).
    anchor_kl: ``(B,)`` detached KL_t to the anchor in ``form``, or None.
    advantages: ``(B,)`` detached per-sample advantages (``paper``, ``authors``), None for ``direct``.
    clip_fraction: 0-dim fraction of ratios outside 1 +- eps (0 for ``direct``).
    ratio: ``(B,)`` detached policy ratios rho (``paper``, ``authors``), None for ``direct``.
    mode, form: how it was computed.
    """

    total: torch.Tensor
    opd: torch.Tensor
    anchor: torch.Tensor
    kl: torch.Tensor
    kl_mean: torch.Tensor
    anchor_kl: torch.Tensor | None
    advantages: torch.Tensor | None
    clip_fraction: torch.Tensor
    mode: str
    form: str
    ratio: torch.Tensor | None = None


def distill_loss(
    mode: str,
    *,
    v_student: torch.Tensor,
    v_target: torch.Tensor,
    t: Time,
    t_next: Time,
    noise_level: float = 0.7,
    kind: str = "sde",
    logp_new: torch.Tensor | None = None,
    logp_old: torch.Tensor | None = None,
    clip_range: float = 1e-4,
    form: str | None = None,
    adv_clip: float | None = None,
    v_anchor: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
) -> DistillLoss:
    """Loss of one trained step (see the module doc for the three ``mode`` s and MAR).

    v_student: ``(B, C, H, W)`` student velocity with grad; v_target: ``(B, C, H, W)`` routed/blended teacher
    velocity (detached here); v_anchor: ``(B, C, H, W)`` anchor velocity, required when ``anchor_weight`` > 0.
    logp_new, logp_old: ``(B,)`` the student's re-evaluated (with grad) and rollout log-probs of the stored
    transition, required by ``paper`` and ``authors``; ``clip_range`` = eps of the PPO clip.
    form: KL form (``KL_FORMS``), default ``DEFAULT_KL_FORM[mode]``. adv_clip: clamp of the advantages,
    default 5 for ``authors`` and none for ``paper``.
    """
    if mode not in DISTILL_MODES:
        raise ValueError(f"distill mode must be one of {DISTILL_MODES}, got {mode!r}")
    if anchor_weight < 0 or (anchor_weight > 0 and v_anchor is None):
        raise ValueError(f"anchor_weight must be >= 0 and needs v_anchor when > 0 (got {anchor_weight})")
    form = DEFAULT_KL_FORM[mode] if form is None else form
    kl_args = dict(t=t, t_next=t_next, noise_level=noise_level, kind=kind, form=form)
    kl = step_kl(v_student, v_target.detach(), **kl_args)
    zero = kl.new_zeros(())
    advantages, clip_fraction, ratio = None, zero, None
    if mode == "direct":
        opd = kl.mean()
    else:
        if logp_new is None or logp_old is None:
            raise ValueError(f"mode {mode!r} needs logp_new and logp_old")
        adv = -kl.detach() if mode == "paper" else -kl
        bound = adv_clip
        if bound is None and mode == "authors":
            bound = AUTHORS_ADVANTAGE_CLIP
        if bound is not None:
            adv = adv.clamp(-bound, bound)
        ppo = ppo_clip_loss(logp_new, logp_old.detach(), adv.to(logp_new.dtype), clip_range)
        opd, advantages, clip_fraction, ratio = ppo.loss, adv.detach(), ppo.clip_fraction, ppo.ratio
    anchor_kl, anchor = None, zero
    if anchor_weight > 0:
        anchor_full = step_kl(v_student, v_anchor.detach(), **kl_args)
        anchor, anchor_kl = anchor_weight * anchor_full.mean(), anchor_full.detach()
    kl = kl.detach()
    return DistillLoss(
        total=opd + anchor, opd=opd, anchor=anchor, kl=kl, kl_mean=kl.mean(), anchor_kl=anchor_kl,
        advantages=advantages, clip_fraction=clip_fraction, mode=mode, form=form, ratio=ratio,
    )
