"""Stage 1: Flow-GRPO teachers (one reward) and the GRPO-Mix baseline (several rewards)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from flowopd_core.grpo.config import GRPOConfig, parse_window_range
from flowopd_core.models.base_stamp import stamp_adapter
from flowopd_core.rewards.spec import build_reward, parse_reward_weights, parse_servers
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import (
    In,
    Node,
    Out,
    SettingsNode,
    all_ports,
    build_config,
    config_inputs,
    legacy_widgets,
    require,
    settings_input,
    split_ports,
)
from flowopd_nodes.nodes.reward_params import REWARD_SERVERS, reward_param_errors
from flowopd_nodes.nodes.train_loop import CHECKPOINT_INPUTS, NEW_TRAINER_SETTINGS, train_resumable

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef
    from flowopd_core.prompts import PromptSet

_GRPO_INPUTS = config_inputs(GRPOConfig, skip=("window_range", "reward_weights"))
_WIDGETS = (
    In("rewards", "STRING", "compose", "reward names with optional weights: 'compose' or 'compose:1, ocr:1'"),
    REWARD_SERVERS,
    In("label", "STRING", "teacher", "name of the adapter in reports"),
    *CHECKPOINT_INPUTS,
    *_GRPO_INPUTS,
    In("window_range", "STRING", "0, 0",
       "Flow-GRPO-Fast: 'lo, hi' = the steps [lo, hi) a window may cover; hi 0 = T // 2 (the authors' range)"),
)
ON_NODE = ("rewards", "reward_servers", "label", "epochs", "group_size", "prompts_per_epoch", "steps",
           "guidance_scale", "lr", "beta", "lora_rank", "seed")
"""The widgets the trainer shows itself (what graphs set most); the rest are its settings companion's."""
_ON_NODE, _ADVANCED = split_ports(_WIDGETS, ON_NODE)
CURVE_KEYS = ("reward", "reward_best_of_group", "loss", "kl", "clip_fraction", "approx_kl", "grad_norm",
              "zero_std_groups")


class GRPOSettings(SettingsNode):
    NODE_ID = "FlowOPDGRPOSettings"
    DISPLAY_NAME = "Flow-GRPO settings"
    DESCRIPTION = (
        "The Flow-GRPO trainer's advanced settings (sampling, PPO clip, optimiser, EMA, LoRA alpha, precision, "
        "checkpoints, GRPO-Fast windows): link to the trainer's `settings` input; one settings node may feed "
        "several trainers. A trainer with nothing linked uses these defaults."
    )
    INPUTS = _ADVANCED
    OUTPUTS = (Out("settings", "FLOWOPD_GRPO_SETTINGS", "the settings, for a Flow-GRPO trainer's `settings`"),)


class GRPOTrainerNode(Node):
    NODE_ID = "FlowOPDGRPOTrainer"
    DISPLAY_NAME = "Flow-GRPO trainer"
    CATEGORY = "FlowOPD/train"
    DESCRIPTION = (
        "Trains a LoRA adapter on the base with Flow-GRPO (docs/method.md §2): SDE rollouts with log-probs, group "
        "advantages, per-step PPO clip, KL to the base (adapter off), EMA of the LoRA. One reward = a specialist "
        "teacher; several weighted rewards = the GRPO-Mix baseline. Output: the adapter (EMA weights) on the base."
    )
    DISTRIBUTED = True
    SETTINGS = GRPOSettings
    LEGACY_WIDGETS = legacy_widgets(_WIDGETS, added_since=NEW_TRAINER_SETTINGS)
    INPUTS = (
        In("model", "FLOWOPD_MODEL", help="the base model (its adapter, if any, is ignored)"),
        In("prompts", "FLOWOPD_PROMPTS", help="training prompts (never the evaluation prompts)"),
        settings_input(GRPOSettings),
        *_ON_NODE,
    )
    OUTPUTS = (
        Out("model", "FLOWOPD_MODEL", "the base with the trained adapter"),
        Out("curves", "FLOWOPD_FILE", "training curves (PNG)"),
    )

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        errors = reward_param_errors(params, rewards=parse_reward_weights)
        if "window_range" in params:  # a setting: known once the settings are (see require)
            try:
                parse_window_range(params["window_range"])
            except ValueError as exc:
                errors.append(("window_range", str(exc)))
        if errors:
            return errors
        require(params, [p.name for p in all_ports(cls) if p.is_widget])
        window = parse_window_range(params["window_range"])
        try:
            weights = parse_reward_weights(params["rewards"], parse_servers(params["reward_servers"]))
            build_config(GRPOConfig, {**params, "reward_weights": weights, "window_range": window})
        except ValueError as exc:
            return [("", str(exc))]
        if not any(weights.values()):  # every reward is listed here: the trainer would refuse it as it starts
            return [("rewards", f"every reward weighs 0 ({params['rewards']!r}): nothing would train; give the "
                                "training reward a non-zero weight")]
        return []

    def run(
        self, model: ModelRef, prompts: PromptSet, rewards: str, reward_servers: str, label: str,
        checkpoint_every: int, keep_checkpoints: int, **values
    ) -> tuple:
        from flowopd_core.eval.plots import plot_curves
        from flowopd_core.grpo.trainer import GRPOTrainer
        from flowopd_core.models.policy import Policy

        servers = parse_servers(reward_servers)
        weights = parse_reward_weights(rewards, servers)
        config = build_config(GRPOConfig, {**values, "reward_weights": weights,
                                           "window_range": parse_window_range(values["window_range"])})
        ctx = context.current()
        pipe = model.load(fresh=True)  # the trainer adds an adapter to this transformer
        trainer = GRPOTrainer(
            pipe, Policy(pipe.transformer), "policy", {n: build_reward(n, servers) for n in weights}, config, prompts
        )

        def record(metrics) -> dict:
            entry = metrics.to_json()
            # weighted mean over the rewards that scored something this epoch (task cycling: one task per epoch)
            scored = [n for n, v in entry["reward_mean"].items() if math.isfinite(v)]
            total = sum(weights[n] for n in scored)
            for key, per_reward in (("reward", "reward_mean"), ("reward_best_of_group", "reward_best")):
                values = entry[per_reward]
                entry[key] = sum(weights[n] * values[n] for n in scored) / total if total else math.nan
            return entry

        history = train_resumable(trainer, "grpo", label, checkpoint_every, record,
                                  ("epoch", "reward", "loss", "kl", "clip_fraction"), keep=keep_checkpoints)
        adapter = trainer.save_adapter(ctx.artifact_dir / "adapter")
        stamp_adapter(adapter, model.path)
        (ctx.artifact_dir / "metrics.json").write_text(json.dumps(history, indent=1, default=str))
        curves = plot_curves(
            history, CURVE_KEYS, ctx.artifact_dir / "curves.png", title=f"Flow-GRPO: {label} ({rewards})"
        )
        return (model.with_adapter(str(adapter), label), str(curves))
