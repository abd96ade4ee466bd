"""The node contract, checked over every registered node."""

from __future__ import annotations

import json

import pytest

from flowopd_nodes.engine.ports import PRIMITIVES, contract_problems
from flowopd_nodes.engine.types import WIRE_TYPES
from flowopd_nodes.nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, NODES, REGISTRY


def test_registry_ids_unique_and_prefixed():
    ids = [cls.NODE_ID for cls in NODES]
    assert len(ids) == len(set(ids))
    assert set(REGISTRY) == set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == set(ids)


@pytest.mark.parametrize("cls", NODES, ids=[c.NODE_ID for c in NODES])
def test_node_contract(cls):
    assert contract_problems(cls) == []
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"}
    json.dumps(spec)  # ComfyUI serves it as JSON in /object_info
    declared = [p.name for p in cls.INPUTS]
    assert [*spec["required"], *spec.get("optional", {})] == [p.name for p in cls.INPUTS if not p.optional] + [
        p.name for p in cls.INPUTS if p.optional
    ]
    for port in cls.INPUTS:
        entry = (spec["optional"] if port.optional else spec["required"])[port.name]
        if port.type == "COMBO":
            assert entry[0] == list(port.choices)
        else:
            assert entry[0] == port.type
        if port.is_widget and "default" in entry[1]:
            assert entry[1]["default"] == port.default
    assert cls.RETURN_TYPES == tuple(o.type for o in cls.OUTPUTS)
    assert cls.RETURN_NAMES == tuple(o.name for o in cls.OUTPUTS)
    assert isinstance(cls.FUNCTION, str) and callable(getattr(cls(), cls.FUNCTION))
    assert isinstance(cls.CATEGORY, str) and isinstance(cls.OUTPUT_NODE, bool)
    for t in [p.type for p in cls.INPUTS if p.type not in PRIMITIVES] + list(cls.RETURN_TYPES):
        assert t in WIRE_TYPES, f"{cls.NODE_ID}: no codec for wire type {t}"
    assert declared  # every node takes at least one input


def test_cache_fingerprint_covers_the_core_code_a_node_runs():
    from flowopd_nodes.engine.ports import core_closure

    closure = core_closure("flowopd_nodes.nodes.evaluate")
    assert {"flowopd_core.eval.evaluate", "flowopd_core.rewards.ocr", "flowopd_core.sampling.samplers"} <= closure
    assert "flowopd_core.grpo.trainer" not in closure  # unrelated core edits do not invalidate the evaluator
    assert "flowopd_core.miniworld.tasks" in core_closure("flowopd_nodes.nodes.miniworld")


def test_contract_refuses_choices_that_are_not_a_dropdown():
    from flowopd_nodes.engine.ports import In, Node, Out

    class Loose(Node):
        NODE_ID, CATEGORY, DESCRIPTION = "FlowOPDLoose", "FlowOPD/test", "a node breaking the port rules"
        INPUTS = (
            In("mode", "STRING", "a", "a choice typed as free text", choices=("a", "b")),
            In("out", "STRING", "x.png", "an artifact file name that is a path", path=True, artifact=".png"),
            In("where", "STRING", "", "a folder flag without path=True", folder=True),
        )
        OUTPUTS = (Out("value", "STRING", "the value"),)

        def run(self, mode: str, out: str, where: str) -> tuple[str]:
            return (mode,)

    problems = contract_problems(Loose)
    assert any("input 'mode': a port with choices must be a COMBO" in p for p in problems)
    assert any("input 'out': artifact needs type STRING, no path=True" in p for p in problems)
    assert any("input 'where': must_exist and folder need path=True" in p for p in problems)


def test_saver_and_path_ports_declare_what_they_name():
    assert REGISTRY["FlowOPDImageGrid"].input("filename").artifact == ".png"
    assert REGISTRY["FlowOPDSavePrompts"].input("filename").artifact == ".jsonl"
    assert REGISTRY["FlowOPDLoadModel"].input("path").folder is None  # a pipeline folder or a single file
    assert REGISTRY["FlowOPDLoadModel"].input("config").folder
    assert not REGISTRY["FlowOPDPromptFile"].input("path").folder
