"""Stage 2 of Flow-OPD: teacher pool, task router, cold start, on-policy distiller with MAR (docs/method.md §3-§5)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from flowopd_core.choices import COLD_STARTS, MERGE_METHODS, ROUTE_MODES
from flowopd_core.distill.config import OPDConfig, SFTConfig
from flowopd_core.distill.routing import own_reward_problems, route_rows
from flowopd_core.models.base_stamp import stamp_adapter
from flowopd_core.prompts import UNTAGGED
from flowopd_core.rewards.names import TASK_REWARDS
from flowopd_core.rewards.spec import build_reward, parse_servers
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
from flowopd_nodes.nodes.reward_params import REWARD_SERVERS, optional_weights, reward_param_errors
from flowopd_nodes.nodes.train_loop import CHECKPOINT_INPUTS, NEW_TRAINER_SETTINGS, train_resumable

if TYPE_CHECKING:
    from flowopd_core.distill.trainer import TeacherRefs
    from flowopd_core.models.modelref import ModelRef
    from flowopd_core.prompts import PromptSet

MAX_TEACHERS = 8  # numbered optional slots: ComfyUI's V1 contract has no variadic inputs
UNTAGGED_KEY = "untagged"
"""How a graph file names the untagged prompts' row of the soft-routing weights."""


def parse_tasks(spec: str) -> list[str]:
    """``"compose, text, quality"`` -> task names (one per connected teacher slot, in slot order)."""
    return [part.strip() for part in spec.split(",") if part.strip()]


def parse_task_weights(spec: str) -> dict[str, dict[str, float]]:
    """``"text: text=0.8 compose=0.2; untagged: compose=1"`` -> {task: {teacher: weight}} ('' for untagged).

    Raises ValueError naming the bad part."""
    weights: dict[str, dict[str, float]] = {}
    for row in [part.strip() for part in spec.split(";") if part.strip()]:
        task, sep, items = row.partition(":")
        task = task.strip()
        if not sep or not task:
            raise ValueError(f"expected 'task: teacher=weight ...', got {row!r}")
        key = UNTAGGED if task == UNTAGGED_KEY else task
        if key in weights:
            raise ValueError(f"task {task!r} is given twice")
        weights[key] = {}
        for item in items.replace(",", " ").split():
            name, eq, value = item.partition("=")
            try:
                weights[key][name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"expected teacher=weight in {row!r}, got {item!r}") from None
            if not eq or not name.strip():
                raise ValueError(f"expected teacher=weight in {row!r}, got {item!r}")
    return weights


def route_problems(inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """A problem on ``prompts`` when validation knows the linked prompts' task tags and a linked pool's tasks and
    routing (a pool linked directly routes hard) and some prompt task has no teacher: the error the trainer
    would raise when it starts, after everything upstream of it has run."""
    pool, prompt_tasks = inputs.get("teachers", {}), inputs.get("prompts", {}).get("tasks")
    route = pool.get("route", ("hard", {}))
    if not prompt_tasks or not pool.get("tasks") or route is None:
        return []
    try:
        route_rows(prompt_tasks, pool["tasks"], *route)
    except ValueError as exc:
        return [("prompts", f"{exc}; checked against the linked prompts and teacher pool")]
    return []


class TeacherPoolNode(Node):
    NODE_ID = "FlowOPDTeacherPool"
    DISPLAY_NAME = "Teacher pool"
    CATEGORY = "FlowOPD/distill"
    DESCRIPTION = (
        "Collects K teachers - LoRA adapters on ONE shared base, never full copies - and names the task each one "
        "serves (the task tag of the prompts routed to it). Distillation runs their velocities in batched passes "
        "whose rows mix teachers (peft per-sample adapters)."
    )
    INPUTS = (
        In("teacher_1", "FLOWOPD_MODEL", help="first teacher (a model with an adapter, e.g. a Flow-GRPO output)"),
        *(In(f"teacher_{i}", "FLOWOPD_MODEL", help=f"teacher {i} (optional)", optional=True)
          for i in range(2, MAX_TEACHERS + 1)),
        In("tasks", "STRING", "compose, text, quality",
           "comma-separated task served by each connected teacher slot, in slot order"),
    )
    OUTPUTS = (Out("teachers", "FLOWOPD_TEACHERS", "the pool (hard routing by task tag until a router says else)"),)

    @classmethod
    def check_links(cls, params: dict[str, Any], linked: frozenset[str]) -> list[tuple[str, str]]:
        slots = [f"teacher_{i}" for i in range(1, MAX_TEACHERS + 1) if f"teacher_{i}" in linked]
        tasks = parse_tasks(params["tasks"])
        if len(tasks) != len(slots):
            return [("tasks", f"names {len(tasks)} task(s) {tasks} for {len(slots)} connected teacher(s) {slots}")]
        if len(set(tasks)) != len(tasks) or UNTAGGED_KEY in tasks:
            return [("tasks", f"task names must be distinct and not {UNTAGGED_KEY!r}, got {tasks}")]
        return []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {"teachers": {"tasks": tuple(parse_tasks(params["tasks"]))}} if "tasks" in params else {}

    def run(self, tasks: str, **teachers: ModelRef | None) -> tuple:
        from flowopd_core.distill.trainer import TeacherRefs

        refs = [teachers.get(f"teacher_{i}") for i in range(1, MAX_TEACHERS + 1)]
        return (TeacherRefs(tuple(zip(parse_tasks(tasks), [r for r in refs if r is not None]))),)


class TaskRouterNode(Node):
    NODE_ID = "FlowOPDTaskRouter"
    DISPLAY_NAME = "Task router"
    CATEGORY = "FlowOPD/distill"
    DESCRIPTION = (
        "How prompts pick teachers (docs/method.md §4). hard: the prompt's task tag picks its teacher (the authors' "
        "code). soft: v_target = sum_k alpha_k v_k with per-task weights (the paper's mode blending), e.g. "
        "'text: text=0.8 compose=0.2'; a task with no row uses its own teacher. Untagged prompts: a uniform blend "
        "of all teachers, or the 'untagged:' row in soft mode."
    )
    INPUTS = (
        In("teachers", "FLOWOPD_TEACHERS", help="the teacher pool"),
        In("mode", "COMBO", "hard", "hard or soft routing", choices=ROUTE_MODES),
        In("weights", "STRING", "", "soft mode: 'task: teacher=weight ...; untagged: ...' (normalised per row)"),
    )
    OUTPUTS = (Out("teachers", "FLOWOPD_TEACHERS", "the pool with its routing"),)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        try:
            weights = parse_task_weights(params["weights"])
        except ValueError as exc:
            return [("weights", str(exc))]
        if weights and params["mode"] == "hard":
            return [("weights", "weights are for mode 'soft'; hard routing follows the task tag")]
        for task, row in weights.items():
            values = list(row.values())
            if any(w < 0 or not math.isfinite(w) for w in values) or sum(values) <= 0:
                return [("weights", f"the weights of task {task or UNTAGGED_KEY!r} must be finite, >= 0 and not all "
                         f"0, got {row}")]
        return []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # the same pool, routed; the routing is unknown (None) when a link sets it or it does not parse
        try:
            route = (params["mode"], parse_task_weights(params["weights"]))
        except (KeyError, ValueError):
            route = None
        return {"teachers": {**inputs.get("teachers", {}), "route": route}}

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        tasks = inputs.get("teachers", {}).get("tasks")
        if not tasks or "mode" not in params or "weights" not in params:
            return []  # the pool's tasks or the routing come from links: checked when the router runs
        try:
            route_rows([], tasks, params["mode"], parse_task_weights(params["weights"]))
        except ValueError as exc:
            return [("weights", f"{exc}; checked against the teacher pool linked to 'teachers'")]
        return []

    def run(self, teachers: TeacherRefs, mode: str, weights: str) -> tuple:
        return (teachers.with_route(mode, parse_task_weights(weights)),)


_SFT_INPUTS = config_inputs(
    SFTConfig,
    skip=("route", "lora_rank", "lora_alpha", "seed"),
    samples_per_prompt={"min": 1, "max": 1024},
    sample_steps={"min": 1, "max": 1000},
    resolution={"min": 0, "max": 8192},
    guidance_scale={"min": 0.0, "max": 50.0},
    train_steps={"min": 1, "max": 10**7},
    batch_size={"min": 1, "max": 4096},
    lr={"min": 0.0, "max": 1.0},
    cfg_dropout={"min": 0.0, "max": 0.99},
)


_COLD_WIDGETS = (
    In("method", "COMBO", "factor_mean", "none | a merge | sft", choices=COLD_STARTS),
    In("label", "STRING", "student", "name of the student in reports"),
    In("rank", "INT", 0, "student LoRA rank; 0 = the teachers' (factor_mean keeps theirs)", min=0, max=1024),
    In("alpha", "FLOAT", 0.0, "student LoRA alpha; 0 = the teachers'", min=0.0, max=4096.0),
    In("density", "FLOAT", 0.2, "ties: fraction of each delta kept", min=0.01, max=1.0),
    In("seed", "INT", 0, "seed of sft", min=0, max=2**31 - 1),
    *_SFT_INPUTS,
)
COLD_ON_NODE = ("method", "label", "rank", "alpha", "density", "seed", "samples_per_prompt", "train_steps", "lr")
_COLD_ON_NODE, _COLD_ADVANCED = split_ports(_COLD_WIDGETS, COLD_ON_NODE)


class ColdStartSettings(SettingsNode):
    NODE_ID = "FlowOPDColdStartSettings"
    DISPLAY_NAME = "Cold start SFT settings"
    DESCRIPTION = (
        "The cold start's SFT details (sampling steps, resolution, guidance, batch size, CFG dropout, precision): "
        "link to the cold start's `settings` input. A cold start with nothing linked uses these defaults."
    )
    INPUTS = _COLD_ADVANCED
    OUTPUTS = (Out("settings", "FLOWOPD_COLDSTART_SETTINGS", "the settings, for a cold start's `settings`"),)


class ColdStartNode(Node):
    NODE_ID = "FlowOPDColdStart"
    DISPLAY_NAME = "Cold start (merge / SFT)"
    CATEGORY = "FlowOPD/distill"
    DESCRIPTION = (
        "The student before distillation (docs/method.md §3), as a LoRA adapter on the teachers' base. Merges: "
        "factor_mean (the authors': mean of A and of B, not of B A), delta_mean (mean of B A re-factored by SVD), "
        "task_arithmetic, ties. sft: the routed teachers sample the training prompts and the student learns them "
        "with the flow-matching loss. none: a fresh adapter (= the base). The paper finds merge init better."
    )
    SETTINGS = ColdStartSettings
    LEGACY_WIDGETS = legacy_widgets(_COLD_WIDGETS)
    INPUTS = (
        In("teachers", "FLOWOPD_TEACHERS", help="the teacher pool (its routing is used by sft)"),
        In("prompts", "FLOWOPD_PROMPTS", help="training prompts (needed by sft)", optional=True),
        settings_input(ColdStartSettings),
        *_COLD_ON_NODE,
    )
    OUTPUTS = (
        Out("model", "FLOWOPD_MODEL", "the student (base + adapter; no adapter for 'none')"),
        Out("report", "FLOWOPD_FILE", "cold_start.json: method, rank, merge errors or SFT losses"),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        if params["method"] == "factor_mean" and (params["rank"] or params["alpha"]):
            return [("rank", "factor_mean keeps the teachers' rank and alpha: leave rank and alpha at 0")]
        return []

    @classmethod
    def check_links(cls, params: dict[str, Any], linked: frozenset[str]) -> list[tuple[str, str]]:
        if params["method"] == "sft" and "prompts" not in linked:
            return [("prompts", "method 'sft' needs training prompts: link a FLOWOPD_PROMPTS output")]
        return []

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        return route_problems(inputs) if params.get("method") == "sft" else []

    def run(self, teachers: TeacherRefs, method: str, label: str, rank: int,
            alpha: float, density: float, seed: int, prompts: PromptSet | None = None, **values) -> tuple:
        if method not in COLD_STARTS:  # validation refuses it; never run an unknown method as the last branch
            raise ValueError(f"unknown cold start method {method!r} (one of {COLD_STARTS})")
        from flowopd_core.distill.coldstart import adapter_spec, merge_cold_start, sft_cold_start
        from flowopd_core.eval.plots import plot_curves
        from flowopd_core.models.policy import Policy

        ctx = context.current()
        report: dict[str, Any] = {"method": method, "teachers": list(teachers.tasks)}
        base = teachers.base
        if method == "none":
            (ctx.artifact_dir / "cold_start.json").write_text(json.dumps(report, indent=1))
            return (
                base.with_adapter("", label), str(ctx.artifact_dir / "cold_start.json")
            )
        pipe = base.load(fresh=True)
        pool = teachers.load_into(Policy(pipe.transformer))
        names = [pool.teachers[task] for task in teachers.tasks]
        first = adapter_spec(pool.policy, names[0])
        if method in MERGE_METHODS:
            merged = merge_cold_start(pool.policy, names, "student", method, rank=rank, alpha=alpha, density=density)
            report.update(rank=merged.rank, alpha=merged.alpha, max_relative_error=merged.max_relative_error)
        else:  # "sft"
            config = build_config(SFTConfig, {**values, "route": teachers.route, "seed": seed,
                                              "lora_rank": rank or first.rank, "lora_alpha": alpha or first.alpha})
            bar = ctx.progress(config.train_steps, f"sft {label}")
            try:
                result = sft_cold_start(pipe, pool, "student", prompts, config, progress=lambda n: bar.update(n))
            finally:
                bar.close()
            report.update(rank=config.lora_rank, alpha=config.lora_alpha, samples=result.samples,
                          losses=result.losses, sample_seconds=result.sample_seconds,
                          train_seconds=result.train_seconds)
            plot_curves([{"loss": v} for v in result.losses], ("loss",), ctx.artifact_dir / "sft_loss.png",
                        title=f"SFT cold start: {label}")
        adapter = pool.policy.save_adapter("student", ctx.artifact_dir / "adapter")
        stamp_adapter(adapter, base.path)
        (ctx.artifact_dir / "cold_start.json").write_text(json.dumps(report, indent=1))
        return (base.with_adapter(str(adapter), label),
                str(ctx.artifact_dir / "cold_start.json"))


_OPD_INPUTS = config_inputs(OPDConfig, skip=("route", "task_weights"))
_OPD_WIDGETS = (
    In("log_rewards", "STRING", "", "rewards logged per epoch, e.g. 'compose, ocr, quality' (not trained on)"),
    REWARD_SERVERS,
    In("label", "STRING", "flow-opd", "name of the student in reports"),
    *CHECKPOINT_INPUTS,
    *_OPD_INPUTS,
)
OPD_ON_NODE = ("log_rewards", "reward_servers", "label", "mode", "anchor_weight", "epochs", "group_size",
               "prompts_per_epoch", "steps", "guidance_scale", "lr", "seed")
_OPD_ON_NODE, _OPD_ADVANCED = split_ports(_OPD_WIDGETS, OPD_ON_NODE)
OPD_CURVE_KEYS = ("kl", "anchor_kl", "loss", "grad_norm", "clip_fraction")


class DistillerSettings(SettingsNode):
    NODE_ID = "FlowOPDDistillerSettings"
    DISPLAY_NAME = "Flow-OPD distiller settings"
    DESCRIPTION = (
        "The distiller's advanced settings (sampling, KL form, PPO clip, optimiser, EMA, LoRA, precision, "
        "checkpoints): link to the distiller's `settings` input; one settings node may feed several distillers. "
        "A distiller with nothing linked uses these defaults."
    )
    INPUTS = _OPD_ADVANCED
    OUTPUTS = (Out("settings", "FLOWOPD_DISTILL_SETTINGS", "the settings, for a Flow-OPD distiller's `settings`"),)


class DistillerNode(Node):
    NODE_ID = "FlowOPDDistiller"
    DISPLAY_NAME = "Flow-OPD distiller"
    CATEGORY = "FlowOPD/distill"
    DESCRIPTION = (
        "On-policy distillation (docs/method.md §4): the student samples with the SDE; each prompt is routed to its "
        "teacher(s); every visited state gets the per-step reverse KL w(t)||v_student - v_teacher||^2, teacher "
        "velocities computed once per rollout in batched no-grad passes. Modes: paper (detached -KL as PPO "
        "advantage), authors (not detached), direct (pathwise KL). MAR (§5): anchor_weight > 0 adds "
        "lambda w(t)||v_student - v_anchor||^2 on all prompts; the anchor is the base unless an anchor model is "
        "linked. No task reward is needed; rewards named here are logged."
    )
    DISTRIBUTED = True
    SETTINGS = DistillerSettings
    LEGACY_WIDGETS = legacy_widgets(_OPD_WIDGETS, added_since=(*NEW_TRAINER_SETTINGS, "balance_tasks"))
    INPUTS = (
        In("student", "FLOWOPD_MODEL", help="the cold-started student (no adapter = start from the base)"),
        In("teachers", "FLOWOPD_TEACHERS", help="teacher pool with routing"),
        In("prompts", "FLOWOPD_PROMPTS", help="training prompts of all tasks (task tags route them)"),
        In("anchor", "FLOWOPD_MODEL", help="MAR anchor: a model on the same base (default: the base)", optional=True),
        settings_input(DistillerSettings),
        *_OPD_ON_NODE,
    )
    OUTPUTS = (
        Out("model", "FLOWOPD_MODEL", "the distilled student (base + adapter)"),
        Out("curves", "FLOWOPD_FILE", "training curves (PNG)"),
    )

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        errors = reward_param_errors(params, log_rewards=optional_weights)
        if errors:
            return errors
        require(params, [p.name for p in all_ports(cls) if p.is_widget])
        try:
            build_config(OPDConfig, params)
        except ValueError as exc:
            return [("", str(exc))]
        return []

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        return [*route_problems(inputs), *cls._drop_equal_problems(params, inputs)]

    @classmethod
    def _drop_equal_problems(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        tasks = inputs.get("teachers", {}).get("tasks")
        if not tasks or not params.get("drop_equal_reward_groups") or "log_rewards" not in params:
            return []  # no pool facts (linked values) or no filter: the trainer checks the prompts when it starts
        try:
            names = optional_weights(params["log_rewards"], parse_servers(params.get("reward_servers", "")))
        except ValueError:
            return []  # check_params reports a malformed reward list
        problem = own_reward_problems(tasks, TASK_REWARDS, names)
        if problem:
            return [("log_rewards", f"drop_equal_reward_groups judges each group by its task's own reward: "
                                    f"{problem}; checked against the teacher pool linked to 'teachers'")]
        return []

    def run(self, student: ModelRef, teachers: TeacherRefs, prompts: PromptSet,
            log_rewards: str, reward_servers: str, label: str, checkpoint_every: int, keep_checkpoints: int,
            anchor: ModelRef | None = None,
            **values) -> tuple:
        from flowopd_core.distill.trainer import OPDTrainer
        from flowopd_core.eval.plots import plot_curves
        from flowopd_core.models.policy import Policy

        ctx = context.current()
        config = build_config(OPDConfig, {**values, "route": teachers.route, "task_weights": teachers.task_weights})
        teachers.check_base(student, "the student")
        pipe = student.load(fresh=True)
        policy = Policy(pipe.transformer)
        if config.anchor_weight > 0 and anchor is None:
            anchor = student.base()
        pool = teachers.load_into(policy, anchor if config.anchor_weight > 0 else None)
        if student.adapter:
            policy.load_adapter("student", student.adapter)
        servers = parse_servers(reward_servers)
        names = optional_weights(log_rewards, servers)
        rewards = {n: build_reward(n, servers) for n in names}
        trainer = OPDTrainer(pipe, pool, "student", config, prompts, rewards)

        def record(metrics) -> dict:
            entry = metrics.to_json()
            entry.update({f"kl_{task}": value for task, value in entry["kl_by_task"].items()})
            entry.update({f"reward_{name}": value for name, value in entry["reward_mean"].items()})
            return entry

        history = train_resumable(trainer, "opd", label, checkpoint_every, record,
                                  ("epoch", "kl", "anchor_kl", "loss", "grad_norm"), keep=keep_checkpoints)
        adapter = trainer.save_adapter(ctx.artifact_dir / "adapter")
        stamp_adapter(adapter, student.path)
        (ctx.artifact_dir / "metrics.json").write_text(json.dumps(history, indent=1, default=str))
        extra = sorted(k for k, v in history[-1].items() if k.startswith(("kl_", "reward_")) and isinstance(v, float))
        keys = (*OPD_CURVE_KEYS, *extra)
        curves = plot_curves(history, keys, ctx.artifact_dir / "curves.png", title=f"Flow-OPD: {label} ({config.mode})")
        return (student.with_adapter(str(adapter), label), str(curves))
