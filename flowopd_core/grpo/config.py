"""Flow-GRPO's settings (:class:`GRPOConfig`), importable without torch: the graph nodes declare their ports from
it and validate graphs with it. :mod:`flowopd_core.grpo.trainer` re-exports it."""

from __future__ import annotations

import math

from flowopd_core.choices import KL_FORMS, REWARD_MODES
from flowopd_core.training.config import TrainerConfig, setting, trainer_config


@trainer_config(
    group_size=(8, "G samples per prompt (paper 24, authors' OPD config 16; 8 on the CPU mini-world); >= 2 (a group "
                   "of one has no advantage)", {"min": 2}),
)
class GRPOConfig(TrainerConfig):
    """Flow-GRPO settings: the shared :class:`~flowopd_core.training.base.TrainerConfig` plus GRPO's own.
    Defaults follow docs/method.md §2 (the paper / Flow-GRPO) unless the help says otherwise."""

    task_cycling: bool = setting(
        False, "epoch e draws its prompts from task e mod n of the prompt set's tasks (authors' GRPO-Mix)")
    balance_templates: bool = setting(
        False, "spread each epoch's prompts evenly over the prompts' categories (spec 'template', e.g. compose's "
               "single / count / pair / position), which the evaluator weighs equally; else uniform over prompts")
    same_initial_noise: bool = setting(
        False, "the samples of a group start from the same initial noise, so their rewards differ only through "
               "the SDE steps the policy is trained on (DanceGRPO; Flow-GRPO's same_latent); else each draws its own")
    sde_window: int = setting(
        0, "Flow-GRPO-Fast: SDE (and training) only on a random window of this many consecutive steps per epoch, "
           "ODE elsewhere; 0 = SDE on every step", min=0, max=1000)
    window_range: tuple[int, int] = setting(
        (0, 0), "[lo, hi) steps a window may cover; hi = 0 means T // 2 (Flow-GRPO-Fast)")
    adv_eps: float = setting(1e-4, "A = (r - mean) / (std + adv_eps)", above=0.0, max=1.0)
    global_std: bool = setting(False, "divide by the std of all the epoch's rewards instead of the group's")
    beta: float = setting(
        0.04, "KL-to-reference weight (0.04 GenEval/OCR, 0.01 PickScore); 0 = no ref pass", min=0.0, max=100.0)
    kl_form: str = setting(
        "flow_grpo", "flow_grpo (true KL x |dt| / D, the scale beta was tuned for), true, or mean (true / D)",
        choices=KL_FORMS)
    drop_zero_advantage: bool = setting(
        True, "skip samples whose advantage is 0 (flat groups) in training, as Flow-GRPO")
    reward_weights: dict[str, float] = setting(
        default_factory=dict, help="weight per reward name; rewards not listed weigh 1.0")
    reward_mode: str = setting(
        "sum", "multi-reward: sum (Flow-GRPO raw weighted sum) or normalised", choices=REWARD_MODES)

    def extra_errors(self) -> list[str]:
        errors = []
        if not self.adv_clip > 0:
            errors.append(f"adv_clip must be > 0, got {self.adv_clip}")
        if any(not math.isfinite(w) for w in self.reward_weights.values()):
            errors.append(f"reward weights must be finite numbers, got {self.reward_weights}")
        if self.sde_window:
            lo, hi = self.window_bounds
            if not (0 <= lo < self.trainable_steps and hi <= self.steps and hi - lo >= self.sde_window):
                errors.append(f"window_range {self.window_range} (resolved [{lo}, {hi})) must hold a window of "
                              f"{self.sde_window} steps, start below {self.trainable_steps} and end by {self.steps}")
            if self.step_subset > self.sde_window:
                errors.append(f"step_subset {self.step_subset} is more than the sde_window of {self.sde_window} "
                              "steps, the only steps trained; 0 trains them all")
        return errors

    @property
    def window_bounds(self) -> tuple[int, int]:
        """``window_range`` with hi = 0 resolved to T // 2."""
        lo, hi = self.window_range
        return lo, hi or self.steps // 2


def parse_window_range(text: str) -> tuple[int, int]:
    """``"lo, hi"`` (or ``"lo hi"``) -> ``(lo, hi)`` for :attr:`GRPOConfig.window_range`; ValueError otherwise."""
    parts = text.replace(",", " ").split()
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"window_range must be two whole numbers 'lo, hi' (hi 0 = T // 2), got {text!r}") from None
    return lo, hi
