"""Flow-OPD's settings (:class:`OPDConfig`, the cold start's :class:`SFTConfig`), importable without torch: the
graph nodes declare their ports from them and validate graphs with them. :mod:`flowopd_core.distill.trainer` and
:mod:`flowopd_core.distill.coldstart` re-export them."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowopd_core.choices import DISTILL_MODES, KL_FORMS, ROUTE_MODES
from flowopd_core.training.config import TrainerConfig, setting, trainer_config


@trainer_config(
    group_size=(2, "student samples per drawn prompt"),
    prompts_per_epoch=(16, "prompts drawn per epoch (without replacement)"),
    train_fraction=(0.99, "train the first int(T * fraction) steps (the last step is deterministic)"),
    adv_clip=(0.0, "clamp of the dense advantages (paper / authors modes); 0 = the mode's default (authors 5, "
                   "paper none)"),
    lr=(1e-3, "AdamW learning rate"),
    updates_per_epoch=1,
    batch_size=(32, "rows per transformer batch (CFG doubles them)"),
    ema_decay=(0.0, "EMA decay of the student's LoRA; 0 = no EMA"),
    lora_rank=(16, "LoRA rank if the trainer creates the student"),
    lora_alpha=(32.0, "LoRA alpha if the trainer creates the student"),
    epochs=(30, "sampling epochs"),
    reward_workers=(1, "threads scoring logging rewards; 0 = inline"),
)
class OPDConfig(TrainerConfig):
    """Flow-OPD distillation settings (docs/method.md §4, §5): the shared
    :class:`~flowopd_core.training.base.TrainerConfig` plus the distillation's own. Defaults: the mini-world's."""

    mode: str = setting(
        "direct", "paper (detached -KL as PPO advantage), authors (not detached, clamped, mean form) or direct "
                  "(minimise KL_t pathwise); direct is the default: it is the one the mini-world results favour "
                  "(docs/experiments.md)", choices=DISTILL_MODES)
    kl_form: str = setting("", "true | mean | flow_grpo; empty = the mode's default", choices=("", *KL_FORMS))
    route: str = setting("hard", "hard (task tag picks the teacher) or soft (task_weights)", choices=ROUTE_MODES)
    task_weights: dict[str, dict[str, float]] = setting(
        default_factory=dict,
        help="soft routing: task -> {teacher: weight}; '' (untagged) -> blend; default: own teacher")
    anchor_weight: float = setting(
        0.0, "MAR lambda (paper 0.02, authors' code 0.04); 0 = no anchor term", min=0.0, max=100.0)
    drop_equal_reward_groups: bool = setting(
        False, "authors' code: skip groups whose prompt's own task reward (compose=compose, text=ocr, "
               "quality=quality) is equal on every sample; each task's reward must be logged")
    balance_tasks: bool = setting(
        False, "draw each epoch's prompts evenly over the prompt set's task tags, so a task with few prompts is "
               "distilled as often as one with many (each task needs ceil(prompts_per_epoch / tasks) prompts); "
               "else uniform over all prompts (docs/experiments.md: the quality gap on the binding base)")

    def extra_errors(self) -> list[str]:
        return ["task_weights are for route='soft'"] if self.route == "hard" and self.task_weights else []


@dataclass(frozen=True)
class SFTConfig:
    """SFT cold start on teacher samples (docs/method.md §3)."""

    samples_per_prompt: int = field(default=2, metadata={"help": "teacher images per training prompt"})
    sample_steps: int = field(default=10, metadata={"help": "ODE steps of the teacher samples"})
    resolution: int = field(
        default=0, metadata={"help": "image height = width in pixels; 0 = the model's native size (paper: 512)"}
    )
    guidance_scale: float = field(default=4.5, metadata={"help": "CFG of the teacher samples"})
    route: str = field(default="hard", metadata={"help": "hard or soft routing of prompts to teachers"})
    train_steps: int = field(default=200, metadata={"help": "AdamW steps on the teacher samples"})
    batch_size: int = field(default=32, metadata={"help": "images per SFT step (and per sampling batch)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    cfg_dropout: float = field(default=0.1, metadata={"help": "probability of training a sample unconditionally"})
    lora_rank: int = field(default=16, metadata={"help": "the student's LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "the student's LoRA alpha"})
    seed: int = field(default=0, metadata={"help": "seeds sampling noise, batches, times and dropout"})
    precision: str = field(
        default="auto", metadata={"help": "compute precision of the teacher sampling and the SFT steps: auto (fp32 "
                                          "on the CPU, bf16 on CUDA), fp32 or bf16 (autocast)",
                                  "choices": ("auto", "fp32", "bf16")}
    )

    def __post_init__(self) -> None:
        errors = [f"{n} must be >= 1" for n in ("samples_per_prompt", "sample_steps", "train_steps", "batch_size",
                                                 "lora_rank") if getattr(self, n) < 1]
        if self.resolution < 0:
            errors.append("resolution must be >= 0")
        if not 0 <= self.cfg_dropout < 1 or not self.lr > 0 or not self.lora_alpha > 0 or self.guidance_scale < 0:
            errors.append("need 0 <= cfg_dropout < 1, lr > 0, lora_alpha > 0, guidance_scale >= 0")
        if self.route not in ROUTE_MODES:
            errors.append(f"route must be one of {ROUTE_MODES}")
        if self.precision not in ("auto", "fp32", "bf16"):
            errors.append(f"precision must be auto, fp32 or bf16 (fp16 needs a gradient scaler), "
                          f"got {self.precision!r}")
        if errors:
            raise ValueError("invalid SFTConfig: " + "; ".join(errors))
