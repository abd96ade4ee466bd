"""Sampling a pipeline for a list of prompts: the one entry point that sampling, training and evaluation use.

It joins the model layer (:mod:`flowopd_core.models.pipeline`: text cache, batched-CFG velocity, decode) and the
samplers (:mod:`flowopd_core.sampling.samplers`: ODE / SDE / CPS with log-probs). Initial noise is drawn per sample
from ``seed`` and the sample's index, so an image does not depend on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.models.pipeline import PRECISIONS, TextEmbeddingCache, decode, latent_shape, velocity
from flowopd_core.sampling.samplers import SAMPLER_KINDS, Rollout, flow_sigmas, sample


@dataclass(frozen=True)
class SampleConfig:
    steps: int = field(default=10, metadata={"help": "sampling steps (paper: 10 for training, 40 for evaluation)"})
    guidance_scale: float = field(
        default=4.5, metadata={"help": "classifier-free guidance w (1 = no CFG, one forward)"}
    )
    kind: str = field(default="ode", metadata={"help": "ode (deterministic), sde (Flow-GRPO) or cps"})
    noise_level: float = field(default=0.7, metadata={"help": "SDE noise level a (docs/method.md §1); 0.8 for cps"})
    batch_size: int = field(default=32, metadata={"help": "samples per transformer batch (memory/speed trade-off)"})
    seed: int = field(default=0, metadata={"help": "seed of the initial noise (per sample) and the SDE noise"})
    height: int = field(default=0, metadata={"help": "image height in pixels (0 = the model's native size)"})
    width: int = field(default=0, metadata={"help": "image width in pixels (0 = the model's native size)"})
    precision: str = field(
        default="auto", metadata={"help": "compute precision of the transformer: auto (fp32 on the CPU, bf16 on "
                                          "CUDA), fp32, bf16, fp16 (autocast; the sampler's arithmetic stays fp32)"}
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"kind must be one of {SAMPLER_KINDS}, got {self.kind!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def sample_noise(
    pipe: StableDiffusion3Pipeline, indices: Sequence[int], seed: int, height: int = 0, width: int = 0
) -> torch.Tensor:
    """x_T ``(B, C, H, W)``: sample i's noise comes from its own generator seeded by (seed, i)."""
    shape = latent_shape(pipe, 1, height or None, width or None)[1:]
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)), dtype=torch.float32)
        for i in indices
    ]
    return torch.stack(rows).to(pipe.transformer.device)


def generate(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    config: SampleConfig = SampleConfig(),
    *,
    cache: TextEmbeddingCache | None = None,
    transformer: torch.nn.Module | None = None,
    adapter_names: Sequence[str] | None = None,
    progress: Callable[[int], None] | None = None,
    keep_latents: bool = True,
    first_index: int = 0,
    step_progress: Callable[[int, int], None] | None = None,
) -> Rollout:
    """Sample one image per prompt (repeat a prompt for several); returns a :class:`Rollout` with ``images``
    ``(N, 3, H, W)`` in [0, 1] and, if ``keep_latents``, every visited state.

    ``transformer`` defaults to ``pipe.transformer`` (pass a peft-wrapped policy to sample with adapters;
    ``adapter_names`` selects one per sample). ``progress(n)`` is called after each batch with its size,
    ``step_progress(j, T)`` after each denoising step j of a batch (a host may raise from either to stop).
    ``first_index`` numbers the samples (sample i's noise is seeded by (seed, first_index + i)), so a long list
    sampled in several calls gets the same images as in one call.
    """
    transformer = transformer if transformer is not None else pipe.transformer
    cache = cache or TextEmbeddingCache(pipe)
    sigmas = flow_sigmas(config.steps, scheduler=pipe.scheduler)
    guided = config.guidance_scale != 1.0
    parts: list[Rollout] = []
    images: list[torch.Tensor] = []
    sde_gen = torch.Generator(device=pipe.transformer.device).manual_seed(config.seed)
    for start in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[start : start + config.batch_size])
        idx = range(first_index + start, first_index + start + len(chunk))
        cond = cache.encode(chunk)
        uncond = cache.negative(len(chunk)) if guided else None
        names = list(adapter_names[start : start + len(chunk)]) if adapter_names is not None else None

        def velocity_fn(x: torch.Tensor, t: float) -> torch.Tensor:
            # B023 is safe here: sample() below calls velocity_fn within this iteration and does not keep it
            return velocity(transformer, x, t, cond, uncond, config.guidance_scale,  # noqa: B023
                            adapter_names=names, precision=config.precision)  # noqa: B023

        with torch.no_grad():
            rollout = sample(
                velocity_fn,
                sample_noise(pipe, idx, config.seed, config.height, config.width),
                sigmas,
                kind=config.kind,
                noise_level=config.noise_level,
                generator=sde_gen,
                progress=step_progress,
            )
            images.append(decode(pipe, rollout.latents[:, -1]))
        if not keep_latents:
            rollout.latents = rollout.latents[:, -1:]
        parts.append(rollout)
        if progress is not None:
            progress(len(chunk))
    first = parts[0]
    return Rollout(
        latents=torch.cat([p.latents for p in parts]),
        log_probs=torch.cat([p.log_probs for p in parts]),
        sigmas=first.sigmas,
        kind=first.kind,
        noise_level=first.noise_level,
        logprob_reduce=first.logprob_reduce,
        sde_steps=first.sde_steps,
        prompt_ids=None,
        images=torch.cat(images),
    )
