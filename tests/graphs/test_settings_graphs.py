"""Settings companions in graphs: flat settings in a graph file and an explicit settings node mean the same thing
(same values, same cache keys); export wires a settings node in, import folds a single-use one back; the same
graph run from YAML and from its exported JSON into one run folder executes nothing the second time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import runner
from flowopd_nodes.comfy.format import graph_from_comfy, to_api_prompt, to_workflow
from flowopd_nodes.comfy.plugin import NODE_CLASS_MAPPINGS
from flowopd_nodes.engine.graph import apply_overrides, graph_from_data, load_graph_file
from flowopd_nodes.engine.ports import Node, merge_settings
from flowopd_nodes.engine.scheduler import node_key
from flowopd_nodes.engine.validate import ValidGraph, check_inputs, validate
from flowopd_nodes.nodes.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").rglob("*.yaml"))
LOCAL = [g for g in GRAPHS if "sd35m" not in g.parts]
MODEL = str(ROOT / "models" / "miniworld")


def trainer_graph(teacher: dict, extra: dict | None = None) -> dict:
    return {"schema_version": 1, "name": "g", "nodes": {
        "base": {"type": "FlowOPDLoadModel", "params": {"path": MODEL}},
        "train": {"type": "FlowOPDMiniWorldPrompts", "params": {"task": "compose", "split": "train"}},
        **(extra or {}),
        "teacher": {"type": "FlowOPDGRPOTrainer", **teacher},
        "test": {"type": "FlowOPDMiniWorldPrompts", "params": {"task": "compose", "split": "test"}},
        "eval": {"type": "FlowOPDEvaluator", "links": {"prompts": "test.prompts", "model_1": "teacher.model"}},
    }}


def load(data: dict) -> ValidGraph:
    return validate(graph_from_data(data, base_dir=ROOT, default_name="g", source="<test>"))


def merged(valid: ValidGraph, node_id: str) -> dict:
    """The values a node's run() gets: its own, its linked settings node's, the companion's defaults."""
    node = valid.nodes[node_id]
    link = node.links.get("settings")
    settings = valid.nodes[link.node].params if link else None
    return merge_settings(node.cls, {**node.params, "settings": settings})


def static_keys(valid: ValidGraph) -> dict[str, str]:
    """Cache keys with each output fingerprinted by its producer's key (what a run gives, less the nonce drawn when
    a node that is not pure executes): equal keys here mean the scheduler finds the same cache entries."""
    import networkx as nx

    keys: dict[str, str] = {}
    for node_id in nx.topological_sort(valid.dag):
        node = valid.nodes[node_id]
        keys[node_id] = node_key(node, {n: f"{keys[link.node]}:{link.output}" for n, link in node.links.items()})
    return keys


FLAT = {"params": {"epochs": 2, "clip_range": 0.3, "kind": "cps", "noise_level": 0.5},
        "links": {"model": "base.model", "prompts": "train.prompts"}}
EXPLICIT = {"params": {"epochs": 2}, "links": {"model": "base.model", "prompts": "train.prompts",
                                                "settings": "opts.settings"}}
OPTS = {"opts": {"type": "FlowOPDGRPOSettings", "params": {"clip_range": 0.3, "kind": "cps", "noise_level": 0.5}}}


def test_flat_settings_and_an_explicit_settings_node_mean_the_same():
    flat, explicit = load(trainer_graph(FLAT)), load(trainer_graph(EXPLICIT, OPTS))
    assert "teacher_settings" in flat.nodes and flat.nodes["teacher"].links["settings"].node == "teacher_settings"
    assert list(flat.nodes).index("teacher_settings") == list(flat.nodes).index("teacher") - 1  # just before it
    assert list(flat.graph.nodes) == list(trainer_graph(FLAT)["nodes"])  # the graph as written stays flat
    values = merged(flat, "teacher")
    assert values == merged(explicit, "teacher")
    assert values["clip_range"] == 0.3 and values["kind"] == "cps" and values["epochs"] == 2
    assert values["ema_decay"] == REGISTRY["FlowOPDGRPOSettings"].input("ema_decay").default
    flat_keys, explicit_keys = static_keys(flat), static_keys(explicit)
    assert flat_keys["teacher"] == explicit_keys["teacher"] and flat_keys["eval"] == explicit_keys["eval"]
    # and a different value is a different key
    other = json.loads(json.dumps(trainer_graph(FLAT)))
    other["nodes"]["teacher"]["params"]["clip_range"] = 0.2
    assert static_keys(load(other))["teacher"] != flat_keys["teacher"]


@pytest.mark.parametrize("graph", GRAPHS, ids=[g.stem if g in LOCAL else "sd35m-" + g.stem for g in GRAPHS])
def test_trainers_get_the_values_they_got_before_the_split(graph):
    """Nothing about a trained result changes: each node's run() gets exactly the values the one big node
    resolved from the same file (its former widgets, all of them on the node)."""
    written = load_graph_file(graph)
    valid = validate(written, check_files=graph in LOCAL)
    owners = [n for n in written.nodes.values() if REGISTRY[n.type].SETTINGS is not None]
    assert owners or graph.stem in ("miniworld_preview", "prompts_demo")
    for spec in owners:
        cls = REGISTRY[spec.type]

        class Former(Node):  # the node as it was: every widget its own
            INPUTS = tuple(cls.port(name) for name in cls.LEGACY_WIDGETS)

        params = dict(spec.params)
        if "settings" in spec.links:  # an explicit settings node in the file: its values, as the big node's
            source = written.nodes[spec.links["settings"].split(".")[0]]
            params = {**source.params, **params}
        before, problems = check_inputs(Former, spec.id, params, {}, written.base_dir, check_files=False)
        assert problems == []
        after = {k: v for k, v in merged(valid, spec.id).items() if cls.port(k).is_widget}
        added = set(after) - set(cls.LEGACY_WIDGETS)  # widgets added since the split get their defaults
        assert {k: v for k, v in after.items() if k not in added} == before
        assert all(after[k] == spec.params.get(k, cls.port(k).default) for k in added)


@pytest.mark.parametrize("fmt", ["api", "workflow"])
@pytest.mark.parametrize("graph", [ROOT / "graphs" / "full_opd.yaml", ROOT / "graphs" / "grpo_mix.yaml"],
                         ids=["full_opd", "grpo_mix"])
def test_round_trip_keeps_every_explicit_param_and_reads_flat(graph, fmt, tmp_path):
    exported, back = tmp_path / f"g.{fmt}.json", tmp_path / "back.yaml"
    assert runner.main(["export", str(graph), f"--comfy-{fmt}", str(exported)]) == 0
    data = json.loads(exported.read_text())
    types = [n["class_type"] for n in data.values()] if fmt == "api" else [n["type"] for n in data["nodes"]]
    assert "FlowOPDGRPOSettings" in types  # the trainers' flat settings travel on settings nodes
    assert runner.main(["import", str(exported), "-o", str(back)]) == 0
    source, result = load_graph_file(graph), load_graph_file(back)
    assert set(result.nodes) == set(source.nodes)  # the settings nodes folded back: no node more
    for node_id, spec in source.nodes.items():
        got = result.nodes[node_id].params
        for name, value in spec.params.items():
            port = REGISTRY[spec.type].port(name)
            if port.path:
                assert (back.parent / got[name]).resolve() == (graph.parent / value).resolve()
            else:
                assert got[name] == value, (node_id, name)
        assert set(result.nodes[node_id].links) == set(spec.links)


def test_a_shared_settings_node_stays_a_node_and_a_single_use_one_folds():
    data = trainer_graph(EXPLICIT, {**OPTS, "solo": {"type": "FlowOPDGRPOSettings", "params": {"beta": 0.5}}})
    data["nodes"]["second"] = {"type": "FlowOPDGRPOTrainer", "params": {"label": "b"},
                               "links": {"model": "base.model", "prompts": "train.prompts",
                                         "settings": "opts.settings"}}
    data["nodes"]["third"] = {"type": "FlowOPDGRPOTrainer", "params": {"label": "c"},
                              "links": {"model": "base.model", "prompts": "train.prompts",
                                        "settings": "solo.settings"}}
    data["nodes"]["eval"]["links"].update({"model_2": "second.model", "model_3": "third.model"})
    with pytest.raises(Exception, match="beta"):  # beta is the trainer's own widget, not a setting
        load(data)
    data["nodes"]["solo"]["params"] = {"ema_decay": 0.5}
    valid = load(data)
    for make in (to_api_prompt, to_workflow):
        back = graph_from_comfy(json.loads(json.dumps(make(valid))), default_name="g")
        assert back.nodes["opts"].type == "FlowOPDGRPOSettings"
        assert back.nodes["teacher"].links["settings"] == back.nodes["second"].links["settings"] == "opts.settings"
        assert "solo" not in back.nodes and "settings" not in back.nodes["third"].links
        assert back.nodes["third"].params["ema_decay"] == 0.5 and back.nodes["third"].params["label"] == "c"
        assert merged(validate(back), "third") == merged(valid, "third")
    workflow = to_workflow(valid)
    collapsed = {n["type"] for n in workflow["nodes"] if n["flags"].get("collapsed")}
    assert collapsed == {"FlowOPDGRPOSettings"}  # one title row on the canvas; the others open


def test_set_reaches_a_setting_and_keeps_text_as_text():
    graph = load_graph_file(ROOT / "graphs" / "full_opd.yaml")
    apply_overrides(graph, ["opd.kl_form=true", "opd.clip_range=0.25", "teacher_compose.window_range=1, 2"])
    valid = validate(graph)
    assert merged(valid, "opd")["kl_form"] == "true" and merged(valid, "opd")["clip_range"] == 0.25
    assert merged(valid, "teacher_compose")["window_range"] == "1, 2"
    bad = load_graph_file(ROOT / "graphs" / "full_opd.yaml")
    apply_overrides(bad, ["opd.clip_range=-1"])
    with pytest.raises(Exception) as info:
        validate(bad)
    (issue,) = info.value.issues
    assert (issue.node, issue.field, issue.type) == ("opd", "clip_range", "value_smaller_than_min")


def test_comfyui_checks_a_trainer_with_its_settings_defaults_or_when_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPD_COMFY_OUTPUT", str(tmp_path))
    grpo = NODE_CLASS_MAPPINGS["FlowOPDGRPOTrainer"]
    wires = {"model": "FLOWOPD_MODEL", "prompts": "FLOWOPD_PROMPTS"}
    # nothing linked to settings: the defaults apply (train_fraction 0.99 of 1 step trains none)
    message = grpo.VALIDATE_INPUTS(unique_id="5", input_types=wires, steps=1)
    assert "node '5' (FlowOPDGRPOTrainer)" in message and "train_fraction 0.99" in message
    # a settings node linked: its values are not known yet; the node checks them as it starts
    assert grpo.VALIDATE_INPUTS(unique_id="5", input_types={**wires, "settings": "FLOWOPD_GRPO_SETTINGS"},
                                steps=1) is True
    (settings,) = NODE_CLASS_MAPPINGS["FlowOPDGRPOSettings"]().execute(kind="cps", noise_level=1.5)["result"]
    from flowopd_core.models.modelref import ModelRef
    from flowopd_core.prompts import PromptSet, PromptSpec

    with pytest.raises(ValueError, match="kind='cps' needs noise_level <= 1"):  # before any work or folder
        grpo().execute(unique_id="5", model=ModelRef(MODEL), prompts=PromptSet((PromptSpec(text="a"),)),
                       settings=settings)
    assert not any(tmp_path.rglob("*"))
    assert "[return_type_mismatch]" in grpo.VALIDATE_INPUTS(input_types={**wires, "settings": "FLOWOPD_EVAL_SETTINGS"})


TINY_EVAL = """schema_version: 1
name: tiny_eval
nodes:
  base: {type: FlowOPDLoadModel, params: {path: ../models/miniworld}}
  prompts: {type: FlowOPDMiniWorldPrompts, params: {task: compose, split: test, per_task: 2}}
  eval:
    type: FlowOPDEvaluator
    params: {steps: 2, batch_size: 2, metrics: task, keep_images: 0, confidence: 0.8}
    links: {prompts: prompts.prompts, model_1: base.model}
"""


def test_yaml_then_its_exported_json_in_one_run_folder_executes_nothing(tmp_path):
    graph = ROOT / "graphs" / "tiny_eval_test.yaml"  # beside the shipped graphs: paths as a user writes them
    graph.write_text(TINY_EVAL)
    try:
        run_dir = tmp_path / "run"
        for fmt in ("api", "workflow"):
            assert runner.main(["export", str(graph), f"--comfy-{fmt}", str(tmp_path / f"g.{fmt}.json")]) == 0
        assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress"]) == 0
    finally:
        graph.unlink()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["executed"] == 4 and status["nodes"]["eval_settings"]["state"] == "executed"
    first = {n: s["key"] for n, s in status["nodes"].items()}
    assert "80%" in (run_dir / "nodes" / "eval" / "results.md").read_text()  # the setting reached the Evaluator
    for fmt in ("api", "workflow"):
        assert runner.main(["run", str(tmp_path / f"g.{fmt}.json"), "--run-dir", str(run_dir), "--no-progress"]) == 0
        status = json.loads((run_dir / "status.json").read_text())
        assert status["executed"] == 0 and status["cached"] == 4, status
        assert {n: s["key"] for n, s in status["nodes"].items()} == first
    # the same values on an explicit settings node of another name: only that node runs (a settings node's output
    # is fingerprinted by its values), the Evaluator is served from the cache
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(TINY_EVAL.replace("../models", str(ROOT / "models")).replace(", confidence: 0.8}", "}")
                        .replace("model_1: base.model}", "model_1: base.model, settings: opts.settings}")
                        + "  opts: {type: FlowOPDEvaluatorSettings, params: {confidence: 0.8}}\n")
    assert runner.main(["run", str(explicit), "--run-dir", str(run_dir), "--no-progress"]) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["nodes"]["opts"]["state"] == "executed" and status["nodes"]["eval"]["state"] == "cached", status
