"""The Evaluator node: several models on held-out prompts, every metric per task, tables, grids, a chart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowopd_core.choices import METRIC_MODES
from flowopd_core.eval.config import EvalConfig, comparison_problems, metric_plan, parse_comparisons
from flowopd_core.rewards.names import REWARD_NAMES
from flowopd_core.rewards.spec import build_reward, parse_servers, parse_task_rewards
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import (
    In,
    Node,
    Out,
    SettingsNode,
    build_config,
    config_inputs,
    legacy_widgets,
    settings_input,
    split_ports,
)
from flowopd_nodes.nodes.reward_params import REWARD_SERVERS, reward_param_errors

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef
    from flowopd_core.prompts import PromptSet

MAX_MODELS = 8  # ComfyUI's V1 contract has no variadic inputs: numbered optional slots

_EVAL_INPUTS = config_inputs(
    EvalConfig,
    skip=("task_rewards",),
    steps={"min": 1, "max": 1000},
    resolution={"min": 0, "max": 8192},
    guidance_scale={"min": 0.0, "max": 50.0, "step": 0.1},
    seed={"min": 0, "max": 2**31 - 1},
    batch_size={"min": 1, "max": 4096},
    images_per_prompt={"min": 1, "max": 64},
    metrics={"choices": tuple(METRIC_MODES)},
    confidence={"min": 0.5, "max": 0.999},
    keep_images={"min": 0, "max": 100_000},
)


_WIDGETS = (
    In("task_rewards", "STRING", "", "task -> its own metric over the mini-world's (compose=compose, "
       "text=ocr, quality=quality), e.g. 'compose=geneval, text=ocr, pick=pickscore'"),
    REWARD_SERVERS,
    *_EVAL_INPUTS,
)
_ON_NODE, _ADVANCED = split_ports(_WIDGETS, ("task_rewards", "reward_servers", "steps", "resolution",
                                             "guidance_scale", "seed", "batch_size", "images_per_prompt", "metrics",
                                             "keep_images", "comparisons"))


def metric_names(servers: dict[str, str], task_rewards: dict[str, str]) -> list[str]:
    """The metrics an Evaluator may score (what ``metrics: all`` scores): the registered ones, the served ones
    and those ``task_rewards`` names."""
    return sorted({*REWARD_NAMES, *servers, *task_rewards.values()})


class EvaluatorSettings(SettingsNode):
    NODE_ID = "FlowOPDEvaluatorSettings"
    DISPLAY_NAME = "Evaluator settings"
    DESCRIPTION = (
        "The Evaluator's advanced settings (precision, confidence level, concurrent scoring): link to the "
        "Evaluator's `settings` input. Nothing linked: these defaults."
    )
    INPUTS = _ADVANCED
    OUTPUTS = (Out("settings", "FLOWOPD_EVAL_SETTINGS", "the settings, for an Evaluator's `settings`"),)


class Evaluator(Node):
    NODE_ID = "FlowOPDEvaluator"
    DISPLAY_NAME = "Evaluator"
    CATEGORY = "FlowOPD/eval"
    DESCRIPTION = (
        "Deterministic ODE sampling of up to 8 models (base, teachers, students: adapters on one shared base) "
        "on held-out prompts; every metric per task with a 95% confidence interval. Writes results.json, "
        "results.md (a Markdown table), image grids per model and task, and a comparison chart."
    )
    OUTPUT_NODE = True
    SETTINGS = EvaluatorSettings
    LEGACY_WIDGETS = legacy_widgets(_WIDGETS, added_since=("comparisons",))
    INPUTS = (
        In("prompts", "FLOWOPD_PROMPTS", help="held-out evaluation prompts (with task tags)"),
        In("model_1", "FLOWOPD_MODEL", help="first model (e.g. the base)"),
        *(In(f"model_{i}", "FLOWOPD_MODEL", help=f"model {i} (optional)", optional=True)
          for i in range(2, MAX_MODELS + 1)),
        settings_input(EvaluatorSettings),
        *_ON_NODE,
    )
    OUTPUTS = (
        Out("table", "FLOWOPD_FILE", "results.md: the Markdown results table"),
        Out("chart", "IMAGE", "bar chart of the headline metric per task and model, with CI error bars"),
    )

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        errors = reward_param_errors(params, task_rewards=parse_task_rewards)
        if isinstance(params.get("comparisons"), str):
            try:
                parse_comparisons(params["comparisons"])
            except ValueError as exc:
                errors.append(("comparisons", str(exc)))
        return errors

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        return [*cls._comparison_problems(params, inputs), *cls._plan_problems(params, inputs)]

    @classmethod
    def _comparison_problems(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        models = [inputs[f"model_{i}"] for i in range(1, MAX_MODELS + 1) if f"model_{i}" in inputs]
        labels = [facts.get("label") for facts in models]
        tasks = inputs.get("prompts", {}).get("tasks")
        if not isinstance(params.get("comparisons"), str):
            return []
        try:
            comparisons = parse_comparisons(params["comparisons"])
        except ValueError:
            return []  # check_params reports it
        # a label from a link or a default name, or tasks of a prompt file: checked before sampling
        problems = comparison_problems(comparisons, None if None in labels else labels, tasks)
        if not problems:
            return []
        return [("comparisons", f"{'; '.join(problems)} (the models linked to model_1.. and the prompts)")]

    @classmethod
    def _plan_problems(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """The run's metric plan, made at validation when the linked prompts' tasks are known: a task tag no
        metric judges stops the graph here, not after the models it compares have trained."""
        tasks = inputs.get("prompts", {}).get("tasks")
        if not tasks or any(name not in params for name in ("metrics", "task_rewards", "reward_servers")):
            return []
        try:
            servers = parse_servers(params["reward_servers"])
            task_rewards = parse_task_rewards(params["task_rewards"], servers)
        except ValueError:
            return []  # check_params reports it
        available = metric_names(servers, task_rewards)
        try:
            metric_plan(tasks, params["metrics"], available, task_rewards)
        except ValueError as exc:
            return [("task_rewards", f"{exc} (the prompts linked to 'prompts')")]
        return []

    def run(self, prompts: PromptSet, model_1: ModelRef, task_rewards: str, reward_servers: str, **values) -> tuple:
        from flowopd_core.eval.evaluate import evaluate_targets, targets_from_refs
        from flowopd_core.eval.report import summarise, write_results
        from flowopd_core.images import load_png, to_comfy

        refs = [model_1, *(values.pop(f"model_{i}", None) for i in range(2, MAX_MODELS + 1))]
        refs = [r for r in refs if r is not None]
        servers = parse_servers(reward_servers)
        config = build_config(EvalConfig, {**values, "task_rewards": parse_task_rewards(task_rewards, servers)})
        names = [r.name for r in refs]
        if len(set(names)) != len(names):
            raise ValueError(f"models need distinct names (labels), got {names}")
        available = metric_names(servers, config.task_rewards)
        plan = metric_plan(prompts.tasks, config.metrics, available, config.task_rewards)
        rewards = {m: build_reward(m, servers) for m in dict.fromkeys(m for task in plan for m in plan[task])}
        ctx = context.current()
        targets = targets_from_refs(refs)
        # a bar over every image of every model: the runner's tqdm; in ComfyUI its ProgressBar, whose update
        # raises when the user presses Stop (update(0) after each denoising step: it stops within a step)
        bar = ctx.progress(len(targets) * len(prompts) * config.images_per_prompt, "evaluate")
        try:
            evals = evaluate_targets(targets, prompts, config, rewards, progress=bar.update)
        finally:
            bar.close()
        files = write_results(summarise(evals), ctx.artifact_dir)
        return (str(files.markdown), to_comfy(load_png(files.chart)))

