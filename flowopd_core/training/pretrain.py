"""Rectified-flow pretraining of a pipeline's transformer from image/prompt pairs (the mini-world base model).

Loss (the flow-matching loss of docs/method.md §3, also used for SFT): with x0 the clean latents, eps ~ N(0, I) and
t ~ logit-normal, x_t = (1 - t) x0 + t eps and L = || v_theta(x_t, t | c) - (eps - x0) ||^2 (mean over all elements;
with ``binding_weight`` w > 0 the mean is weighted, 1 + w on each batch's binding pixels: the pixels of a two-object
compose image that change when its two shapes swap colours). Text encoders stay frozen; each distinct prompt is
encoded once (:class:`TextEmbeddingCache`). A fraction of the prompts is replaced by the empty prompt so that
classifier-free guidance works. AdamW with a linear warm-up, gradient-norm clipping, an EMA of the weights
(diffusers ``EMAModel``, whose decay ramps up as (1 + n) / (10 + n) to ``ema_decay``); the EMA weights are what is
saved.

Output folder ``out_dir``: ``pipeline/`` (a standard diffusers folder, safetensors), ``loss.png`` and
``pretrain.json`` (resolved config, per-step losses, seconds, snapshot steps); with ``snapshot_every = N > 0``
also ``snapshots/step_NNNNN/`` every N steps before the last: the EMA weights at that step as a standard
pipeline folder (to choose a pretraining budget afterwards). Snapshots do not change the training run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel

from flowopd_core.models.pipeline import TextEmbeddingCache, TextEmbeddings, encode_images, velocity
from flowopd_core.training.config import lr_factor as schedule_factor
from flowopd_core.training.pretrain_config import PretrainConfig as PretrainConfig


class Batch(Protocol):
    prompts: Sequence[str]
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    # optional: binding, (B, 1, H, W) in {0, 1}, the pixels that show a binding (config.binding_weight)


DataFn = Callable[[np.random.Generator, int, int], Batch]
"""``data_fn(rng, batch_size, image_size) -> batch`` with ``.prompts`` and ``.images``."""
ProgressFn = Callable[[int, int, float], None]
"""``progress(step, total, loss)``."""


@dataclass
class PretrainResult:
    """steps: optimizer steps done; losses: per-step loss; seconds: training wall-clock (snapshot saving
    included); path: pipeline folder; snapshots: the snapshot pipeline folders, by step."""

    steps: int
    losses: list[float]
    seconds: float
    path: Path
    snapshots: dict[int, Path] = field(default_factory=dict)


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where :func:`pretrain` saves the snapshot of optimizer step ``step``: ``out_dir/snapshots/step_NNNNN``."""
    return Path(out_dir) / "snapshots" / f"step_{step:05d}"


def _save_snapshot(pipe: StableDiffusion3Pipeline, params: list[torch.nn.Parameter], ema: EMAModel | None,
                   path: Path) -> None:
    """Save the pipeline with the EMA weights swapped in (the training weights are restored bit-exactly)."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        pipe.save_pretrained(path, safe_serialization=True)
    finally:
        if ema is not None:
            ema.restore(params)


def lr_factor(step: int, config: PretrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up, then the trainers' schedule
    (:func:`flowopd_core.training.config.lr_factor`: constant, or cosine decay from 1 to 0.1 at ``config.steps``)."""
    warm = min(1.0, (step + 1) / max(config.warmup_steps, 1))
    return warm * schedule_factor(config.lr_schedule, step, config.steps)


def sample_times(batch_size: int, mean: float, std: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal times ``(B,)``: t = sigmoid(n), n ~ N(mean, std^2) (SD3's training distribution)."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator))


def flow_matching_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    cond: TextEmbeddings,
    t: torch.Tensor,
    eps: torch.Tensor,
    precision: str = "fp32",
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rectified-flow loss mean((v_theta(x_t, t | c) - (eps - x0))^2), x_t = (1 - t) x0 + t eps (docs/method.md §3).

    x0, eps: ``(B, C, H, W)``; t: ``(B,)`` in [0, 1]; cond: ``B`` rows; precision: of the forward (see
    :func:`~flowopd_core.models.pipeline.velocity`); weights: ``(B, 1, H, W)`` >= 0 per position (shared by the
    channels), giving the weighted mean sum(w e^2) / sum(w) over all elements; None = the plain mean. Returns a
    0-dim float32 tensor.
    """
    t_ = t.view(-1, 1, 1, 1)
    x_t = (1.0 - t_) * x0 + t_ * eps
    v = velocity(transformer, x_t, t, cond, precision=precision)
    error = (v - (eps - x0).float()) ** 2
    if weights is None:
        return torch.mean(error)
    weights = weights.to(error).expand_as(error)
    return (weights * error).sum() / weights.sum()


def binding_weights(batch: Batch, weight: float, latent_size: int) -> torch.Tensor | None:
    """Loss weights ``(B, 1, h, w)`` = 1 + ``weight`` on the batch's binding pixels (``batch.binding``, max-pooled
    to the latent size ``h = w = latent_size`` when a VAE downsamples), or None for ``weight`` 0."""
    if weight == 0:
        return None
    mask = getattr(batch, "binding", None)
    if mask is None:
        raise ValueError("binding_weight > 0 needs data batches with a `binding` mask (the mini-world's "
                         "sample_training_batch(binding_masks=True))")
    if mask.shape[-1] != latent_size:
        mask = torch.nn.functional.adaptive_max_pool2d(mask.float(), latent_size)
    return 1.0 + weight * mask.float()


def _conditioning(
    cache: TextEmbeddingCache, prompts: Sequence[str], dropout: float, generator: torch.Generator
) -> TextEmbeddings:
    """Cached embeddings of ``prompts``, each replaced by the negative prompt's with probability ``dropout``."""
    cond = cache.encode(list(prompts))
    drop = torch.rand(len(prompts), generator=generator) < dropout  # drawn on the CPU generator
    if not drop.any():
        return cond
    neg = cache.negative(len(prompts))
    drop = drop.to(cond.prompt_embeds.device)
    return TextEmbeddings(
        torch.where(drop.view(-1, 1, 1), neg.prompt_embeds, cond.prompt_embeds),
        torch.where(drop.view(-1, 1), neg.pooled, cond.pooled),
    )


def save_loss_plot(losses: Sequence[float], path: Path) -> Path:
    """Per-step loss (faint) and its centred running mean over 50 steps, log scale, as a PNG (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    axes.plot(steps, losses, alpha=0.3, linewidth=0.7, label="loss")
    window = min(50, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    start = (window - 1) // 2  # centred window
    axes.plot(steps[start : start + len(smooth)], smooth, label=f"running mean of {window}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("rectified-flow loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def pretrain(
    pipe: StableDiffusion3Pipeline,
    data_fn: DataFn,
    config: PretrainConfig,
    out_dir: str | Path,
    progress: ProgressFn | None = None,
) -> PretrainResult:
    """Train ``pipe.transformer`` with the rectified-flow loss; save the EMA weights as a pipeline folder.

    Deterministic given ``config.seed`` and the initial weights (a ``minutes`` budget makes the step count
    time-dependent). ``pipe`` is modified in place: its transformer ends with the EMA weights. Raises
    ``FloatingPointError`` on a non-finite loss (nothing is saved then).
    """
    out_dir = Path(out_dir)
    transformer = pipe.transformer
    native = transformer.config.sample_size * pipe.vae_scale_factor
    if config.image_size != native:
        raise ValueError(f"image_size {config.image_size} differs from the pipeline's image size {native}")
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and name != "transformer":
            module.requires_grad_(False)
    transformer.requires_grad_(True)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]

    cache = TextEmbeddingCache(pipe, max_sequence_length=config.max_sequence_length)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay > 0 else None

    losses: list[float] = []
    snapshots: dict[int, Path] = {}
    start = time.perf_counter()
    budget = config.minutes * 60.0
    for step in range(1, config.steps + 1):
        batch = data_fn(rng, config.batch_size, config.image_size)
        if tuple(batch.images.shape[1:]) != (3, config.image_size, config.image_size):
            raise ValueError(f"data_fn returned images {tuple(batch.images.shape)}, expected (B, 3, S, S) with "
                             f"S = image_size {config.image_size}")
        x0 = encode_images(pipe, batch.images.to(transformer.device), generator=generator).float()
        cond = _conditioning(cache, batch.prompts, config.cfg_dropout, generator)
        t = sample_times(x0.shape[0], config.logit_mean, config.logit_std, generator)
        eps = torch.randn(x0.shape, generator=generator)
        weights = binding_weights(batch, config.binding_weight, x0.shape[-1])
        loss = flow_matching_loss(transformer, x0, cond, t.to(x0.device), eps.to(x0.device),
                                  weights=None if weights is None else weights.to(x0.device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite pretraining loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip, error_if_nonfinite=True)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(params)
        losses.append(loss.item())
        done = step == config.steps or (budget > 0 and time.perf_counter() - start >= budget)
        if config.snapshot_every and step % config.snapshot_every == 0 and not done:
            snapshots[step] = snapshot_dir(out_dir, step)
            _save_snapshot(pipe, params, ema, snapshots[step])
        if progress is not None and (step % config.log_every == 0 or done):
            progress(step, config.steps, losses[-1])
        if done:
            break
    seconds = time.perf_counter() - start

    if ema is not None:
        ema.copy_to(params)
    transformer.requires_grad_(False)
    transformer.eval()
    path = out_dir / "pipeline"
    pipe.save_pretrained(path, safe_serialization=True)
    save_loss_plot(losses, out_dir / "loss.png")
    record = {"config": dataclasses.asdict(config), "steps": len(losses), "seconds": seconds,
              "snapshots": sorted(snapshots), "losses": losses}
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=1))
    return PretrainResult(steps=len(losses), losses=losses, seconds=seconds, path=path, snapshots=snapshots)
