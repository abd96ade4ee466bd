"""Graph files <-> ComfyUI JSON (API and UI workflow): round trips keep the meaning of every shipped graph;
the runner validates and runs JSON files directly; what the canvas saves (primitives, reroutes, notes,
muted nodes, numeric ids) imports as the graph it means."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import runner
from flowopd_nodes.comfy.format import graph_from_comfy, load_comfy_file, to_api_prompt, to_workflow
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.validate import ValidGraph, validate
from flowopd_nodes.nodes.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").rglob("*.yaml"))
CLUSTER = ROOT / "graphs" / "sd35m"  # graphs whose model files live on a cluster: converted without file checks
IDS = [p.relative_to(ROOT / "graphs").with_suffix("").as_posix() for p in GRAPHS]


def local(graph: Path) -> bool:
    return CLUSTER not in graph.parents


def meaning(valid: ValidGraph) -> dict:
    """What a graph does: per node its type, resolved values (paths resolved), links and title; the run order."""
    nodes = {}
    for node_id, node in valid.nodes.items():
        params = dict(node.params)
        for port in node.cls.INPUTS:
            if port.path and params.get(port.name):
                params[port.name] = str(Path(params[port.name]).resolve())
        links = {name: (link.node, link.output) for name, link in node.links.items()}
        nodes[node_id] = (node.cls.NODE_ID, params, links, node.title)
    return {"nodes": nodes, "order": valid.order, "name": valid.name, "description": valid.graph.description.strip()}


def round_trip(graph: Path, fmt: str, tmp_path: Path) -> tuple[ValidGraph, Path]:
    flags = [] if local(graph) else ["--no-file-check"]
    exported = tmp_path / f"{graph.stem}.{fmt}.json"
    assert runner.main(["export", str(graph), f"--comfy-{fmt}", str(exported), *flags]) == 0
    back = tmp_path / f"{graph.stem}.yaml"
    assert runner.main(["import", str(exported), "-o", str(back), *flags]) == 0
    return validate(load_graph_file(back), check_files=local(graph)), exported


@pytest.mark.parametrize("fmt", ["api", "workflow"])
@pytest.mark.parametrize("graph", GRAPHS, ids=IDS)
def test_yaml_json_yaml_keeps_the_meaning(graph, fmt, tmp_path):
    original = validate(load_graph_file(graph), check_files=local(graph))
    back, exported = round_trip(graph, fmt, tmp_path)
    assert meaning(back) == meaning(original)
    # Imported for a YAML file beside the shipped graphs, paths come back relative, as the original wrote them.
    beside = load_comfy_file(exported, yaml_dir=graph.parent)
    assert meaning(validate(beside, check_files=local(graph))) == meaning(original)
    for node in beside.nodes.values():
        for name, value in node.params.items():
            port = REGISTRY[node.type].port(name)  # its own input or a field of its settings
            if port.path:  # as written, or the default where the original left it out (Load model's config "")
                assert value == load_graph_file(graph).nodes[node.id].params.get(name, port.default)
    # The JSON runs as it is: validating the JSON file itself gives the same graph.
    assert meaning(validate(load_comfy_file(exported), check_files=local(graph))) == meaning(original)


@pytest.mark.parametrize("graph", GRAPHS, ids=IDS)
def test_workflow_is_what_the_canvas_expects(graph):
    valid = validate(load_graph_file(graph), check_files=False)
    wf = to_workflow(valid)
    assert wf["version"] == 0.4 and wf["last_node_id"] == len(wf["nodes"]) and wf["last_link_id"] == len(wf["links"])
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert sorted(nodes) == list(range(1, len(valid.nodes) + 1))
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert out["type"] == inp["type"] == kind and inp["link"] == link_id and link_id in out["links"]
        # links run left to right, or down to a node right below in the same column (a settings node above
        # the node it feeds, a chain of small nodes stacked to fit the canvas)
        (sx, sy), (dx, dy) = nodes[src]["pos"], nodes[dst]["pos"]
        assert sx + nodes[src]["size"][0] < dx or (sx == dx and sy < dy)
    linked = sum(1 for n in wf["nodes"] for i in n["inputs"] if i["link"] is not None)
    assert linked == len(wf["links"]) == sum(len(n.links) for n in valid.nodes.values())
    for n in wf["nodes"]:
        cls = REGISTRY[n["type"]]
        widgets = [p for p in cls.INPUTS if p.is_widget]
        assert len(n["widgets_values"]) == len(widgets)
        spec = cls.INPUT_TYPES()
        order = [*spec["required"], *spec.get("optional", {})]
        widget_names = [p.name for p in sorted(widgets, key=lambda p: order.index(p.name))]
        # wire inputs first, then one input socket per widget, each in INPUT_TYPES order (as the frontend writes)
        assert [i["name"] for i in n["inputs"] if "widget" in i] == widget_names
        assert all("widget" not in i for i in n["inputs"][: len(n["inputs"]) - len(widgets)])
    boxes = [  # title bar included; a collapsed node is its title bar only (see test_comfy_layout.py)
        (n["pos"][0], n["pos"][1] - 30, min(n["size"][0], 7.2 * len(n["title"]) + 60), 30)
        if n["flags"].get("collapsed") else (n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30)
        for n in wf["nodes"]
    ]
    for i, (ax, ay, aw, ah) in enumerate(boxes):  # tidy: no two nodes overlap
        for bx, by, bw, bh in boxes[i + 1 :]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah)


def test_runner_runs_api_and_workflow_json_like_the_yaml(tmp_path):
    graph = ROOT / "graphs" / "prompts_demo.yaml"
    valid = validate(load_graph_file(graph))
    (tmp_path / "g.api.json").write_text(json.dumps(to_api_prompt(valid)))
    (tmp_path / "g.workflow.json").write_text(json.dumps(to_workflow(valid)))
    outputs = {}
    for name, path in [("yaml", graph), ("api", tmp_path / "g.api.json"), ("wf", tmp_path / "g.workflow.json")]:
        assert runner.main(["run", str(path), "--run-dir", str(tmp_path / name), "--no-progress"]) == 0
        outputs[name] = (tmp_path / name / "nodes" / "save" / "prompts.jsonl").read_text()
    assert outputs["yaml"] == outputs["api"] == outputs["wf"] != ""


def test_broken_json_is_refused_with_every_problem(tmp_path, capsys):
    prompt = to_api_prompt(validate(load_graph_file(ROOT / "graphs" / "evaluate_base.yaml")))
    prompt["eval"]["inputs"]["steps"] = 0
    prompt["eval"]["inputs"]["prompts"] = ["base", 0]  # a model where prompts belong
    prompt["base"]["class_type"] = "FlowOPDNoSuchNode"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(prompt))
    assert runner.main(["validate", str(path), "--json"]) == 2
    errors = json.loads(capsys.readouterr().out)["node_errors"]
    assert {e["type"] for e in errors["eval"]["errors"]} == {"value_smaller_than_min"}
    assert {e["type"] for e in errors["base"]["errors"]} == {"unknown_node_type"}
    assert (
        runner.main(["import", str(path), "-o", str(tmp_path / "x.yaml")]) == 2
        and not (tmp_path / "x.yaml").exists()
    )
    (tmp_path / "not_a_graph.json").write_text("[1, 2]")
    assert runner.main(["validate", str(tmp_path / "not_a_graph.json")]) == 2
    assert "not a ComfyUI graph" in capsys.readouterr().err


def test_canvas_made_files_import_as_the_graph_they_mean():
    # API format as ComfyUI writes it: numeric ids, display names as titles, a wrapped list value.
    api = {
        "3": {"class_type": "FlowOPDMiniWorldPrompts",
              "inputs": {"task": "text", "split": "test", "per_task": 2, "seed": ["7", 0]},
              "_meta": {"title": "Mini-world prompts"}},
        "7": {"class_type": "FlowOPDSeed", "inputs": {"seed": 5}, "_meta": {"title": "my seed"}},
        "9": {"class_type": "FlowOPDSavePrompts",
              "inputs": {"prompts": ["3", 0], "filename": {"__value__": "a.jsonl"}}},
    }
    graph = graph_from_comfy(api, default_name="canvas")
    data = graph.to_data()
    assert data["name"] == "canvas"
    assert data["nodes"] == {
        # every value kept, "split": "test" (today's default) too: the graph keeps its meaning if defaults change
        "3": {"type": "FlowOPDMiniWorldPrompts", "params": {"task": "text", "split": "test", "per_task": 2},
              "links": {"seed": "7.seed"}},
        "7": {"type": "FlowOPDSeed", "title": "my seed", "params": {"seed": 5}},
        "9": {"type": "FlowOPDSavePrompts", "params": {"filename": "a.jsonl"}, "links": {"prompts": "3.prompts"}},
    }
    validate(graph)

    # UI workflow: a primitive feeding a widget, a reroute on a wire, a note and a muted node on the side.
    wf = {
        "nodes": [
            {"id": 1, "type": "PrimitiveNode", "outputs": [{"name": "INT", "type": "INT", "links": [1]}],
             "widgets_values": [11, "fixed"]},
            {"id": 2, "type": "FlowOPDMiniWorldPrompts", "mode": 0,
             "inputs": [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 1}],
             "outputs": [{"name": "prompts", "type": "FLOWOPD_PROMPTS", "links": [2]}],
             "widgets_values": ["quality", "train", 3, 0]},
            {"id": 5, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 2}],
             "outputs": [{"name": "", "type": "*", "links": [3]}]},
            {"id": 4, "type": "FlowOPDSavePrompts", "title": "Save prompt set", "mode": 0,
             "inputs": [{"name": "prompts", "type": "FLOWOPD_PROMPTS", "link": 3}], "outputs": [],
             "widgets_values": ["b.jsonl"]},
            {"id": 6, "type": "Note", "widgets_values": ["a comment"]},
            {"id": 8, "type": "FlowOPDSeed", "mode": 2, "widgets_values": [1]},
        ],
        "links": [[1, 1, 0, 2, 0, "INT"], [2, 2, 0, 5, 0, "FLOWOPD_PROMPTS"], [3, 5, 0, 4, 0, "FLOWOPD_PROMPTS"]],
        "version": 0.4,
    }
    data = graph_from_comfy(wf, default_name="wf").to_data()
    assert data["nodes"] == {
        "2": {"type": "FlowOPDMiniWorldPrompts",
              "params": {"task": "quality", "split": "train", "per_task": 3, "seed": 11}},
        "4": {"type": "FlowOPDSavePrompts", "params": {"filename": "b.jsonl"}, "links": {"prompts": "2.prompts"}},
    }
    wf["nodes"][3]["mode"] = 4  # bypassed: ComfyUI would pass inputs through; refused instead of guessed
    with pytest.raises(Exception, match="bypassed"):
        graph_from_comfy(wf, default_name="wf")


@pytest.mark.parametrize("fmt", ["api", "workflow"])
@pytest.mark.parametrize("graph", sorted((ROOT / "graphs").glob("*.yaml")), ids=lambda p: p.stem)
def test_no_shipped_graph_exports_an_absolute_path(graph, fmt, tmp_path):
    """The shipped graphs write no absolute path (graphs/sd35m names cluster folders the user writes there)."""
    exported = tmp_path / f"g.{fmt}.json"
    assert runner.main(["export", str(graph), f"--comfy-{fmt}", str(exported)]) == 0
    text = exported.read_text()
    assert str(ROOT) not in text and str(tmp_path) not in text
    strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
    assert not [v for v in strings if v.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", v)]


@pytest.mark.parametrize("fmt", ["api", "workflow"])
def test_exported_json_names_repository_paths_relative_to_the_repository(fmt, tmp_path):
    """A shared workflow must not carry the exporting machine's folders: a path inside the repository is written
    relative to its root (where ComfyUI and import resolve it), so it loads on a colleague's checkout."""
    exported = tmp_path / f"full_opd.{fmt}.json"
    assert runner.main(["export", str(ROOT / "graphs" / "full_opd.yaml"), f"--comfy-{fmt}", str(exported)]) == 0
    text = exported.read_text()
    assert str(ROOT) not in text and '"models/miniworld"' in text
    moved = tmp_path / "elsewhere"  # the same file read from another folder still finds the model
    moved.mkdir()
    (moved / exported.name).write_text(text)
    graph = load_comfy_file(moved / exported.name)
    assert Path(validate(graph).nodes["base"].params["path"]).resolve() == (ROOT / "models" / "miniworld").resolve()
