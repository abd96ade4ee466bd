"""Flow-OPD stage 2a: the student's cold start (docs/method.md §3), into a new adapter on the teachers' shared base.

- Merge (no training): the teachers' LoRA factors are combined by one of ``MERGE_METHODS``
  (:mod:`flowopd_core.models.merge`: the authors' factor mean, delta mean, task arithmetic, TIES) and written into the
  student adapter.
- SFT: each training prompt is routed to its teacher(s) (:func:`flowopd_core.distill.loss.route`; blended prompts are
  sampled from the blended velocity), ``samples_per_prompt`` images are drawn with the ODE, and the student
  (a fresh zero-B adapter) is trained on them with the rectified-flow loss
  ||v_theta(x_t, t | c) - (eps - x0)||^2, x_t = (1 - t) x0 + t eps (SD3's logit-normal t, CFG dropout).

The paper finds the merge init better than SFT init.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.choices import COLD_STARTS as COLD_STARTS
from flowopd_core.distill.config import SFTConfig as SFTConfig
from flowopd_core.distill.loss import route
from flowopd_core.distill.trainer import TeacherPool
from flowopd_core.models.merge import (
    MERGE_METHODS,
    MergeResult,
    merge_adapters,
    read_adapter_factors,
    write_adapter_factors,
)
from flowopd_core.models.pipeline import TextEmbeddingCache, TextEmbeddings, initial_noise, resolve_precision
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSet
from flowopd_core.sampling.samplers import flow_sigmas, sample
from flowopd_core.training.pretrain import flow_matching_loss, sample_times

# COLD_STARTS (flowopd_core.choices, re-exported here): ``none``: a fresh zero-B student (= the base); a merge
# method; or ``sft``.


def adapter_spec(policy: Policy, name: str) -> LoraSpec:
    """The rank, alpha and targets of the policy's adapter ``name`` (from its peft config)."""
    config = policy.model.peft_config[name]
    targets = config.target_modules
    targets = tuple(sorted(targets)) if not isinstance(targets, str) else (targets,)
    return LoraSpec(rank=int(config.r), alpha=float(config.lora_alpha), targets=targets)


def merge_cold_start(
    policy: Policy,
    teachers: Sequence[str],
    student: str,
    method: str,
    *,
    rank: int = 0,
    alpha: float = 0.0,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
) -> MergeResult:
    """Create adapter ``student`` on ``policy`` as the ``method`` merge of the adapters ``teachers`` (§3).

    rank / alpha: the student's (0 = the first teacher's; ``factor_mean`` needs the teachers' own). The
    teachers must share targets; see :func:`flowopd_core.models.merge.merge_adapters` for ``weights`` and ``density``.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    if not teachers:
        raise ValueError("a merge needs at least one teacher adapter")
    first = adapter_spec(policy, teachers[0])
    spec = LoraSpec(rank=rank or first.rank, alpha=alpha or first.alpha, targets=first.targets)
    merged = merge_adapters(
        method, [read_adapter_factors(policy, name) for name in teachers], rank=spec.rank, alpha=spec.alpha,
        weights=weights, density=density,
    )
    policy.add_adapter(student, spec)
    write_adapter_factors(policy, student, merged.factors)
    return merged


@dataclass
class SFTResult:
    """losses: per SFT step; samples: teacher images drawn; data: those samples ``(N, C, H, W)`` (latents, the
    prompts repeated ``samples_per_prompt`` times in order); seconds spent sampling and training."""

    losses: list[float]
    samples: int
    data: torch.Tensor
    sample_seconds: float
    train_seconds: float


def sft_cold_start(
    pipe: StableDiffusion3Pipeline,
    pool: TeacherPool,
    student: str,
    prompts: PromptSet,
    config: SFTConfig = SFTConfig(),
    progress: Callable[[int], None] | None = None,
) -> SFTResult:
    """Create adapter ``student`` on ``pool.policy`` and fit it to routed-teacher samples (module doc).
    ``progress(1)`` after each sampling batch and each SFT step."""
    policy = pool.policy
    specs = [p for p in prompts for _ in range(config.samples_per_prompt)]
    if not specs:
        raise ValueError("SFT needs training prompts")
    generator = torch.Generator().manual_seed(config.seed)
    cache = TextEmbeddingCache(pipe)
    precision = resolve_precision(config.precision, policy.device)
    sigmas = flow_sigmas(config.sample_steps, scheduler=pipe.scheduler).to(policy.device)
    start = time.perf_counter()
    x0 = []
    for first in range(0, len(specs), config.batch_size):
        chunk = specs[first : first + config.batch_size]
        plan = route(chunk, pool.tasks, config.route)
        cond = cache.encode([p.text for p in chunk])
        uncond = cache.negative(len(chunk)) if config.guidance_scale != 1.0 else None

        def teacher_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            times = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            return pool.velocities(
                x, times, cond, uncond, plan,  # noqa: B023 - sample() below calls it within this iteration
                config.guidance_scale, config.batch_size, with_anchor=False, precision=precision,
            )[0]

        size = config.resolution or None
        noise = initial_noise(pipe, len(chunk), generator=generator, height=size, width=size)
        x0.append(sample(teacher_velocity, noise, sigmas, kind="ode").latents[:, -1])
        if progress is not None:
            progress(1)
    data = torch.cat(x0)
    sampled = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        policy.add_adapter(student, LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha))
    policy.set_active(student)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(student), lr=config.lr, weight_decay=0.0)
    embeds = cache.encode([p.text for p in specs])
    negative = cache.negative(1)
    losses = []
    for _ in range(config.train_steps):
        rows = torch.randint(0, len(specs), (min(config.batch_size, len(specs)),), generator=generator)
        drop = (torch.rand(len(rows), generator=generator) < config.cfg_dropout).view(-1, 1, 1)
        cond = TextEmbeddings(
            torch.where(drop, negative.prompt_embeds, embeds.prompt_embeds[rows]),
            torch.where(drop.view(-1, 1), negative.pooled, embeds.pooled[rows]),
        )
        t = sample_times(len(rows), 0.0, 1.0, generator).to(data.device)
        eps = torch.randn(data[rows].shape, generator=generator).to(data.device)
        loss = flow_matching_loss(policy, data[rows], cond, t, eps, precision=precision)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite SFT loss at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(1)
    return SFTResult(losses=losses, samples=len(specs), data=data, sample_seconds=sampled - start,
                     train_seconds=time.perf_counter() - sampled)
