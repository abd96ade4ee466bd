"""Compact nodes: a trainer shows at most 12 widgets; its settings companion carries the rest with the very same
ports (ranges, choices, tooltips), and the hosts spread a settings value over the node's own inputs."""

from __future__ import annotations

import pytest

from flowopd_core.distill.config import OPDConfig
from flowopd_core.grpo.config import GRPOConfig
from flowopd_nodes.comfy.plugin import NODE_CLASS_MAPPINGS, comfy_input_types
from flowopd_nodes.engine.ports import (
    REQUIRED,
    SETTINGS_CATEGORY,
    In,
    Node,
    Out,
    SettingsNode,
    all_ports,
    config_inputs,
    contract_problems,
    merge_settings,
    settings_input,
)
from flowopd_nodes.nodes.registry import NODES

MAX_WIDGETS = 12
OWNERS = [cls for cls in NODES if cls.SETTINGS is not None]


def widgets(cls: type[Node]) -> list[str]:
    """The widgets ComfyUI's /object_info shows for the node (inputs whose type is a primitive or a list)."""
    spec = comfy_input_types(cls)
    entries = {**spec["required"], **spec.get("optional", {})}
    return [name for name, (kind, _) in entries.items() if isinstance(kind, list) or kind in
            ("INT", "FLOAT", "STRING", "BOOLEAN")]


@pytest.mark.parametrize("cls", NODES, ids=[c.NODE_ID for c in NODES])
def test_every_node_but_a_settings_node_has_at_most_12_widgets(cls):
    if issubclass(cls, SettingsNode):
        assert cls.CATEGORY == SETTINGS_CATEGORY and widgets(cls)  # collapsed on the canvas: one title row
    else:
        assert len(widgets(cls)) <= MAX_WIDGETS, (cls.NODE_ID, widgets(cls))


def test_the_big_nodes_have_companions_registered_with_them():
    ids = {cls.NODE_ID for cls in NODES}
    assert {cls.NODE_ID for cls in OWNERS} == {"FlowOPDGRPOTrainer", "FlowOPDDistiller", "FlowOPDPretrainMiniWorld",
                                               "FlowOPDColdStart", "FlowOPDEvaluator"}
    companions = [cls.SETTINGS for cls in OWNERS]
    assert {c.NODE_ID for c in companions} <= ids
    assert {c for c in NODES if issubclass(c, SettingsNode)} == set(companions)
    types = [c.OUTPUTS[0].type for c in companions]
    assert len(set(types)) == len(types)  # a settings value fits its own node type only


@pytest.mark.parametrize("cls", OWNERS, ids=[c.NODE_ID for c in OWNERS])
def test_node_and_companion_split_the_former_widgets(cls):
    own = [p.name for p in cls.INPUTS if p.is_widget]
    moved = [p.name for p in cls.SETTINGS.INPUTS]
    assert not set(own) & set(moved)
    assert set(cls.LEGACY_WIDGETS) <= set(own + moved)  # nothing lost
    added = [n for n in own + moved if n not in cls.LEGACY_WIDGETS]  # widgets added since the split
    assert all(cls.port(n).default is not REQUIRED for n in added)  # have defaults: an old file keeps its meaning
    # each keeps the former relative order (the canvas lists them as before)
    legacy = list(cls.LEGACY_WIDGETS)
    assert [n for n in own if n in legacy] == [n for n in legacy if n in own]
    assert [n for n in moved if n in legacy] == [n for n in legacy if n in moved]
    spec = comfy_input_types(cls.SETTINGS)["required"]
    for port in cls.SETTINGS.INPUTS:
        assert cls.port(port.name) is port
        assert spec[port.name][1]["tooltip"] == port.help  # ComfyUI shows the same tooltip


@pytest.mark.parametrize(("cls", "config", "skip"), [
    (NODE_CLASS_MAPPINGS["FlowOPDGRPOTrainer"].RUNNER_CLASS, GRPOConfig, ("window_range", "reward_weights")),
    (NODE_CLASS_MAPPINGS["FlowOPDDistiller"].RUNNER_CLASS, OPDConfig, ("route", "task_weights")),
], ids=["grpo", "opd"])
def test_moved_ports_keep_the_config_ranges_choices_and_help(cls, config, skip):
    for port in config_inputs(config, skip=skip):
        assert cls.port(port.name) == port, port.name  # min, max, step, choices, default and help alike
    assert {p.name for p in all_ports(cls)} >= {p.name for p in config_inputs(config, skip=skip)}


def test_merge_settings_spreads_a_value_over_the_defaults_and_the_node_wins():
    grpo = NODE_CLASS_MAPPINGS["FlowOPDGRPOTrainer"].RUNNER_CLASS
    merged = merge_settings(grpo, {"lr": 0.5, "settings": {"clip_range": 0.3, "not_a_field": 1}})
    assert merged["lr"] == 0.5 and merged["clip_range"] == 0.3 and merged["ema_decay"] == 0.9  # a default
    assert "settings" not in merged and "not_a_field" not in merged
    assert set(merged) == {"lr", *(p.name for p in grpo.SETTINGS.INPUTS)}
    # unfilled (validation of a linked settings node): only what the settings node knows
    assert merge_settings(grpo, {"lr": 0.5, "settings": {"kind": "cps"}}, fill=False) == {"lr": 0.5, "kind": "cps"}


def test_contract_checks_the_settings_rules():
    class Opts(SettingsNode):
        NODE_ID, DISPLAY_NAME, DESCRIPTION = "FlowOPDOpts", "Opts", "advanced settings of a test node"
        INPUTS = (In("depth", "INT", 1, "a setting", min=1, max=9), In("width", "INT", 2, "another", min=1, max=9))
        OUTPUTS = (Out("settings", "FLOWOPD_OPTS_SETTINGS", "the settings"),)

    class Good(Node):
        NODE_ID, CATEGORY, DESCRIPTION, OUTPUT_NODE = "FlowOPDGood", "FlowOPD/test", "a node with settings", True
        SETTINGS = Opts
        INPUTS = (settings_input(Opts), In("name", "STRING", "", "a name"))

        def run(self, **values):
            return ()

    class Unwired(Good):  # declares a companion but takes no settings input, and shares a field with it
        INPUTS = (In("depth", "INT", 1, "clashes with the companion's field"),)

    class Wrong(Opts):
        CATEGORY = "FlowOPD/train"
        OUTPUTS = (Out("settings", "FLOWOPD_OPTS", "not a settings type"),)

    assert contract_problems(Opts) == [] and contract_problems(Good) == []
    problems = contract_problems(Unwired)
    assert any("optional input 'settings' of type FLOWOPD_OPTS_SETTINGS" in p for p in problems)
    assert any("inputs ['depth'] are also fields of FlowOPDOpts" in p for p in problems)
    problems = contract_problems(Wrong)
    assert any("belongs in 'FlowOPD/settings'" in p for p in problems)
    assert any("one output, of a FLOWOPD_*_SETTINGS type" in p for p in problems)
