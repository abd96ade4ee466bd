"""Rectified-flow pretraining settings (:class:`PretrainConfig`), importable without torch: the pretraining node
declares its ports from it. :mod:`flowopd_core.training.pretrain` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowopd_core.training.config import LR_SCHEDULES


@dataclass(frozen=True)
class PretrainConfig:
    """Rectified-flow pretraining settings (defaults: the shipped base recipe, models/miniworld/PROVENANCE.md)."""

    steps: int = field(default=3000, metadata={"help": "optimizer steps (the maximum when minutes > 0)"})
    minutes: float = field(default=0.0, metadata={"help": "wall-clock budget in minutes; 0 = no budget"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear learning-rate warm-up steps"})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "after warm-up: constant, or cosine decay to 10% of lr at `steps`",
            "choices": ("constant", "cosine"),
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm; 0 = no clipping"})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved weights; 0 = no EMA"})
    cfg_dropout: float = field(default=0.1, metadata={"help": "probability of training a sample on the empty prompt"})
    logit_mean: float = field(default=0.0, metadata={"help": "t = sigmoid(n), n ~ N(logit_mean, logit_std^2)"})
    logit_std: float = field(default=1.0, metadata={"help": "spread of the logit-normal time sampling"})
    seed: int = field(default=0, metadata={"help": "seeds data, noise, times and CFG dropout"})
    image_size: int = field(default=32, metadata={"help": "pixel height = width of the training images"})
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "T5 tokens of the cached embeddings; None = the T5 tokenizer's length"}
    )
    binding_weight: float = field(
        default=0.0,
        metadata={"help": "extra loss weight on the pixels that show a two-object compose image's binding (which "
                          "shape goes with which colour): weight 1 + this there, 1 elsewhere; 0 = the plain "
                          "rectified-flow loss. Needs data batches with a binding mask (the mini-world's)"},
    )
    log_every: int = field(default=50, metadata={"help": "steps between progress callbacks"})
    snapshot_every: int = field(
        default=0,
        metadata={"help": "also save the EMA weights every this many steps as snapshots/step_NNNNN/ (a pipeline "
                          "folder each); 0 = off"},
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.image_size < 1 or self.log_every < 1:
            raise ValueError("steps, batch_size, image_size and log_every must be >= 1")
        if self.minutes < 0 or self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("minutes, warmup_steps and weight_decay must be >= 0 and lr > 0")
        if self.grad_clip < 0 or not 0 <= self.ema_decay < 1 or not 0 <= self.cfg_dropout < 1:
            raise ValueError("grad_clip must be >= 0, ema_decay and cfg_dropout in [0, 1)")
        if self.logit_std <= 0:
            raise ValueError("logit_std must be > 0")
        if not 0 <= self.binding_weight < float("inf"):  # NaN fails too
            raise ValueError(f"binding_weight must be a finite number >= 0, got {self.binding_weight}")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0 (0 = off), got {self.snapshot_every}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
