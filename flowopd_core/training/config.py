"""The settings every LoRA trainer shares, as a frozen dataclass whose field metadata holds each field's help and
limits: the one source of the config's own checks and of the graph nodes' port ranges and choices."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from flowopd_core.choices import LOGPROB_REDUCES, PRECISIONS, STOCHASTIC_KINDS

CHECKPOINTING_MODES = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")
LR_FINAL_RATIO = 0.1
"""A ``cosine`` schedule ends at this fraction of ``lr`` (as the mini-world pretraining's)."""
CHECKPOINTING_PARAMS = 500_000_000
"""``gradient_checkpointing: auto`` turns it on for transformers with more parameters than this: SD3.5-Medium
(2.5 B) keeps every block's activations for the backward pass otherwise, while the mini-world (2.3 M) and the
reduced test models gain nothing from recomputing."""


def use_checkpointing(mode: str, parameters: int) -> bool:
    """Whether a trainer with ``gradient_checkpointing`` ``mode`` checkpoints a transformer of ``parameters``."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"gradient_checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and parameters > CHECKPOINTING_PARAMS)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``: 1 for ``constant``; for
    ``cosine`` 0.1 + 0.9 (1 + cos(pi s / total)) / 2, from 1 at the first step to :data:`LR_FINAL_RATIO` at
    ``total`` (held there beyond it)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return 1.0
    progress = min(1.0, step / max(total, 1))
    return LR_FINAL_RATIO + (1.0 - LR_FINAL_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **limits: Any) -> Any:
    """A config field with its ``help`` and its limits in the field metadata, the one source of both the
    config's own checks (:func:`field_errors`) and the node port ranges: ``min`` / ``max`` (inclusive),
    ``above`` (exclusive lower bound; a port shows it as its minimum), ``choices``."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, **limits})


def field_errors(config: Any) -> list[str]:
    """Messages for the fields of the dataclass ``config`` outside the limits of their metadata (NaN fails
    every numeric check)."""
    errors = []
    for f in fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        if "choices" in meta and value not in meta["choices"]:
            errors.append(f"{f.name} must be one of {tuple(meta['choices'])}, got {value!r}")
        if "above" in meta and not value > meta["above"]:
            errors.append(f"{f.name} must be > {meta['above']}, got {value}")
        if "min" in meta and not value >= meta["min"]:
            errors.append(f"{f.name} must be >= {meta['min']}, got {value}")
        if "max" in meta and not value <= meta["max"]:
            errors.append(f"{f.name} must be <= {meta['max']}, got {value}")
    return errors


@dataclass(frozen=True)
class TrainerConfig:
    """The settings every LoRA trainer shares (Flow-GRPO's :class:`~flowopd_core.grpo.trainer.GRPOConfig` and
    Flow-OPD's :class:`~flowopd_core.distill.trainer.OPDConfig` extend it; :func:`trainer_config` gives a
    subclass its own defaults). Limits live in the field metadata (:func:`setting`): the config checks them and
    the nodes' ports show them. A subclass adds its own checks in :meth:`extra_errors`; every problem is
    collected and raised once."""

    group_size: int = setting(8, "samples per drawn prompt (a group)", min=1, max=1024)
    prompts_per_epoch: int = setting(8, "prompts (groups) per sampling epoch, drawn at random without replacement",
                                     min=1, max=100_000)
    steps: int = setting(10, "sampling steps T of the rollouts", min=1, max=1000)
    resolution: int = setting(0, "image height = width in pixels; 0 = the model's native size (paper: 512)",
                              min=0, max=8192)
    train_fraction: float = setting(0.99, "train the first int(T * fraction) steps (Flow-GRPO: 9 of 10)",
                                    above=0.0, max=1.0)
    step_subset: int = setting(0, "train k random trainable steps per sample and epoch (DanceGRPO-style); 0 = all",
                               min=0, max=1000)
    shuffle_steps: bool = setting(True, "train each sample's steps in a random order (else in sampling order)")
    kind: str = setting("sde", "sde (Flow-GRPO) or cps (coefficients-preserving)", choices=STOCHASTIC_KINDS)
    noise_level: float = setting(0.7, "SDE noise level a (0.8 recommended for cps)", above=0.0, max=2.0)
    min_step_std: float = setting(
        0.01, "train only steps whose transition noise std is at least this (cps: skips the step onto the "
              "schedule's last sigma, std ~1e-3, whose log-prob ratio and KL weight 1 / std^2 explode); 0 = no floor",
        min=0.0, max=10.0)
    guidance_scale: float = setting(4.5, "CFG w in rollouts and training forwards; 1 = no CFG (one forward, "
                                         "cheaper)", min=0.0, max=50.0)
    logprob_reduce: str = setting("mean", "log-prob over D: mean (Flow-GRPO; clip_range 1e-4 assumes it) or sum "
                                          "(true)", choices=LOGPROB_REDUCES)
    clip_range: float = setting(1e-4, "PPO clip eps of the ratio", above=0.0, max=10.0)
    adv_clip: float = setting(5.0, "advantages are clamped to +-adv_clip", min=0.0, max=1000.0)
    lr: float = setting(3e-4, "AdamW learning rate (paper 1e-4 to 3e-4)", above=0.0, max=1.0)
    lr_schedule: str = setting(
        "constant", "learning rate over the run: constant (Flow-GRPO's), or cosine decay to 10 % of lr at the last "
                    "of epochs x updates_per_epoch optimizer steps", choices=LR_SCHEDULES)
    weight_decay: float = setting(1e-4, "AdamW weight decay", min=0.0, max=1.0)
    grad_clip: float = setting(1.0, "max gradient norm; 0 = no clipping", min=0.0, max=1000.0)
    updates_per_epoch: int = setting(2, "optimizer steps per sampling epoch", min=1, max=1000)
    batch_size: int = setting(16, "samples per transformer batch in rollouts and training (CFG doubles rows)",
                              min=1, max=4096)
    ema_decay: float = setting(0.9, "EMA decay of the LoRA weights; 0 = no EMA", min=0.0, max=0.99999)
    ema_every: int = setting(8, "optimizer steps between EMA updates", min=1, max=10_000)
    lora_rank: int = setting(32, "LoRA rank when the trainer creates the adapter", min=1, max=1024)
    lora_alpha: float = setting(64.0, "LoRA alpha when the trainer creates the adapter", above=0.0, max=4096.0)
    epochs: int = setting(100, "sampling epochs of train()", min=1, max=10**7)
    seed: int = setting(0, "seed of the trainer's generator (everything random)", min=0, max=2**31 - 1)
    reward_workers: int = setting(1, "threads scoring rewards during the next rollout batch; 0 = score inline",
                                  min=0, max=64)
    precision: str = setting(
        "auto", "compute precision of every model call (rollouts, teacher and anchor targets, training forward "
                "and backward): auto = fp32 on the CPU, bf16 on CUDA; bf16 runs the transformer under autocast while "
                "LoRA weights, gradients, AdamW state, SDE step arithmetic, log-probs and KL stay fp32; fp16 is "
                "refused (it would need a gradient scaler)", choices=PRECISIONS)
    gradient_checkpointing: str = setting(
        "auto", "recompute each transformer block's activations in the backward pass instead of keeping them "
                "(less memory, ~1/3 more compute): on, off, or auto = on for transformers above "
                f"{CHECKPOINTING_PARAMS // 10**6} M parameters (SD3.5-Medium: 2.5 B; the mini-world: 2.3 M)",
        choices=CHECKPOINTING_MODES)
    max_bad_steps: int = setting(
        3, "an optimizer step with a non-finite loss or gradient norm, or in an epoch without one finite reward "
           "(when rewards drive training), is skipped; this many consecutive skipped steps stop training",
        min=1, max=10**6)

    def __post_init__(self) -> None:
        errors = field_errors(self)
        if not errors and self.trainable_steps < 1:
            errors.append(f"train_fraction {self.train_fraction} must leave >= 1 trained step of {self.steps}")
        if not errors and self.step_subset > self.trainable_steps:
            errors.append(f"step_subset {self.step_subset} is more than the {self.trainable_steps} trainable steps "
                          f"(int(steps {self.steps} x train_fraction {self.train_fraction})); 0 trains them all")
        if self.kind == "cps" and self.noise_level > 1:
            errors.append(f"kind='cps' needs noise_level <= 1, got {self.noise_level}")
        if self.precision == "fp16":
            errors.append("precision 'fp16' is not supported for training (it needs a gradient scaler against "
                          "underflow): use 'bf16', which has fp32's range")
        errors += self.extra_errors()
        if errors:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(errors))

    def extra_errors(self) -> list[str]:
        """A subclass's own checks (beyond the field limits), as messages."""
        return []

    @property
    def trainable_steps(self) -> int:
        """int(T * train_fraction): steps 0 .. this - 1 may be trained (of them, only those with a noise std
        >= min_step_std and > 0: see :func:`~flowopd_core.sampling.samplers.noisy_steps`)."""
        return int(self.steps * self.train_fraction)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def trainer_config(**defaults: Any) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass extending :class:`TrainerConfig` whose shared fields named in
    ``defaults`` get other defaults, as ``name=value``, ``name=(value, help)`` or ``name=(value, help, limits)``
    (limits: a dict that updates the base field's, e.g. ``{"min": 2}``)."""

    def wrap(cls: type) -> type:
        base = {f.name: f for f in fields(TrainerConfig)}
        own = dict(cls.__dict__.get("__annotations__", {}))
        for name, spec in defaults.items():
            value, help_text, limits = (
                (*spec, {})[:3] if isinstance(spec, tuple) else (spec, base[name].metadata["help"], {})
            )
            setattr(cls, name, field(default=value, metadata={**base[name].metadata, "help": help_text, **limits}))
            own.setdefault(name, base[name].type)
        cls.__annotations__ = own
        return dataclass(frozen=True)(cls)

    return wrap
