"""Bad input of every class is refused before anything runs, by the runner and by ComfyUI's validation alike:
exit 2, no traceback, every problem named by node and field, nothing written outside the run folder.

YAML fixtures (``tests/fixtures/graphs/*.yaml``) are also checked by test_bad_graphs.py; those with
``# comfyui:`` lines must be refused by the ComfyUI adapter too, driven the way POST /prompt drives it
(``comfyui_sim``). The JSON fixtures are ComfyUI API prompts and UI workflows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from comfyui_sim import api_prompt, validate_prompt
from fixture_marks import BAD, FIXTURES, marked

import runner
from flowopd_nodes.comfy import plugin as comfy
from flowopd_nodes.comfy.format import load_comfy_file
from flowopd_nodes.engine import graph as graph_module
from flowopd_nodes.engine.errors import GraphValidationError
from flowopd_nodes.engine.graph import inside, load_graph_file, parse_yaml
from flowopd_nodes.engine.ports import In, Node, Out
from flowopd_nodes.engine.validate import validate
from flowopd_nodes.nodes.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "graphs" / "prompts_demo.yaml"
FULL = ROOT / "graphs" / "full_opd.yaml"

# JSON fixtures: (type, node, field) of every problem, as YAML fixtures write them in '# expect:' lines.
JSON_EXPECT = {
    "class_type_list.api.json": {
        ("invalid_graph", "1", "class_type"), ("invalid_graph", "3", "class_type"), ("invalid_graph", "4", "inputs"),
    },
    "list_node_ids.workflow.json": {
        ("invalid_graph", "", "id"), ("invalid_graph", "2", "text"), ("invalid_graph", "", "links"),
    },
    "deep_nesting.api.json": {("invalid_graph", "", "")},
    "very_deep_nesting.workflow.json": {("invalid_graph", "", "")},
    "integer_too_long.api.json": {("invalid_graph", "", "")},
    "duplicate_node_id.api.json": {("duplicate_key", "", "p")},
    "unsafe_ids.api.json": {
        ("invalid_graph", "", "name"), ("invalid_graph", "/tmp/flowopd_escape", ""), ("invalid_graph", "../up", ""),
        ("invalid_graph", "two\nlines", ""),
    },
    "soft_route_unknown_teacher.api.json": {("custom_validation_failed", "router", "weights")},
    "soft_route_and_typo.workflow.json": {
        ("invalid_graph", "", "name"), ("value_not_in_list", "cold", "method"),
        ("custom_validation_failed", "router", "weights"),
    },
}
COMFY = [p for p in BAD if marked(p, "comfyui")]


def test_every_json_fixture_is_listed():
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(JSON_EXPECT)


@pytest.mark.parametrize("name", sorted(JSON_EXPECT))
def test_json_fixture_reports_exact_errors(name):
    with pytest.raises(GraphValidationError) as info:
        validate(load_comfy_file(FIXTURES / name))
    assert {(i.type, i.node, i.field) for i in info.value.issues} == JSON_EXPECT[name], str(info.value)


@pytest.mark.parametrize("name", sorted(JSON_EXPECT))
def test_runner_refuses_json_fixture_with_exit_2(name, capsys, tmp_path):
    for command in (["validate"], ["import", "-o", str(tmp_path / "out.yaml")]):
        assert runner.main([command[0], str(FIXTURES / name), *command[1:]]) == 2
        err = capsys.readouterr().err
        for kind, node, field in JSON_EXPECT[name]:
            assert f"[{kind}]" in err
            assert not node or f"node {node!r}" in err
            assert not field or f"field {field!r}" in err
    assert not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize("path", COMFY, ids=[p.stem for p in COMFY])
def test_comfyui_refuses_what_the_runner_refuses(path):
    """The fixture as an API prompt, checked the way POST /prompt checks it: the same nodes are refused, each
    naming the field (in our message, or ComfyUI's input name where ComfyUI refuses a value itself)."""
    errors = validate_prompt(api_prompt(load_graph_file(path)))
    wanted = marked(path, "comfyui")
    assert set(errors) == {node for _, node, _ in wanted}, errors
    for _, node, field in wanted:
        assert any(f"field {field!r}" in e["details"] or e["extra_info"]["input_name"] == field
                   for e in errors[node]), errors[node]


def test_comfyui_accepts_the_shipped_graphs_as_exported():
    from flowopd_nodes.comfy.format import to_api_prompt

    for graph in (DEMO, FULL):
        assert validate_prompt(to_api_prompt(validate(load_graph_file(graph)))) == {}


def test_validate_inputs_runs_the_runners_value_checks():
    cold = comfy.NODE_CLASS_MAPPINGS["FlowOPDColdStart"]
    router = comfy.NODE_CLASS_MAPPINGS["FlowOPDTaskRouter"]
    linked = {"teachers": "FLOWOPD_TEACHERS"}
    assert cold.VALIDATE_INPUTS(unique_id="7", input_types=linked, method="factor_mean") is True
    message = cold.VALIDATE_INPUTS(unique_id="7", input_types=linked, method="factor-mean")
    assert "node '7' (FlowOPDColdStart), field 'method': [value_not_in_list]" in message
    assert "did you mean 'factor_mean'" in message
    # values ComfyUI's own conversion lets through: NaN, an integer too large for a float
    assert "[invalid_input_type]" in cold.VALIDATE_INPUTS(input_types=linked, density=float("nan"))
    assert "field 'alpha': [value_bigger_than_max]" in cold.VALIDATE_INPUTS(input_types=linked, alpha=10**400)
    # link types (ComfyUI leaves them to a VALIDATE_INPUTS that takes input_types)
    assert "[return_type_mismatch]" in router.VALIDATE_INPUTS(input_types={"teachers": "FLOWOPD_MODEL"})
    # checks of links: method 'sft' needs prompts linked
    assert "field 'prompts'" in cold.VALIDATE_INPUTS(input_types=linked, method="sft")
    assert cold.VALIDATE_INPUTS(input_types={**linked, "prompts": "FLOWOPD_PROMPTS"}, method="sft") is True
    # a widget fed by a link arrives as None: checked when the node starts
    assert cold.VALIDATE_INPUTS(input_types={**linked, "rank": "INT"}, rank=None) is True


def test_choices_are_dropdowns():
    for cls in REGISTRY.values():
        for port in cls.INPUTS:
            if port.choices:
                kind = cls.INPUT_TYPES()["optional" if port.optional else "required"][port.name][0]
                assert kind == list(port.choices), (cls.NODE_ID, port.name)
    assert REGISTRY["FlowOPDTaskRouter"].input("mode").type == "COMBO"
    assert REGISTRY["FlowOPDColdStart"].input("method").type == "COMBO"


def test_cold_start_refuses_an_unknown_method_instead_of_running_sft():
    with pytest.raises(ValueError, match="unknown cold start method 'factor-mean'"):
        REGISTRY["FlowOPDColdStart"]().run(teachers=None, method="factor-mean", label="s", rank=0, alpha=0.0,
                                          density=0.2, seed=0)


# --- cycles ---------------------------------------------------------------------------------------------------


def _ring(n: int) -> dict:
    nodes = {f"pool{i}": {"type": "FlowOPDTeacherPool", "params": {"tasks": "a"},
                          "links": {"teacher_1": f"cold{i}.model"}} for i in range(n)}
    nodes.update({f"cold{i}": {"type": "FlowOPDColdStart", "links": {"teachers": f"pool{(i + 1) % n}.teachers"}}
                  for i in range(n)})
    nodes["test"] = {"type": "FlowOPDMiniWorldPrompts", "params": {"per_task": 1}}
    nodes["eval"] = {"type": "FlowOPDEvaluator", "links": {"prompts": "test.prompts", "model_1": "cold0.model"}}
    return {"schema_version": 1, "nodes": nodes}


def test_a_1000_node_cycle_is_reported_once_and_short(tmp_path, capsys):
    path = tmp_path / "ring.yaml"
    path.write_text(yaml.safe_dump(_ring(500), sort_keys=False))
    assert runner.main(["validate", str(path)]) == 2  # one cycle found, not every simple cycle enumerated
    err = capsys.readouterr().err
    assert len(err) < 1000, err
    assert "1 error" in err and "[dependency_cycle] cycle: pool0 -> cold499 -> pool499 -> cold498 -> " in err
    assert "(1000 nodes)" in err and "node 'pool0' (FlowOPDTeacherPool), field 'teacher_1'" in err


def test_many_cycles_are_reported_one_per_cycle_capped(tmp_path):
    rings = [_ring(3) for _ in range(12)]
    nodes = {f"r{k}{node_id}": {**node, "links": {name: f"r{k}{link}" for name, link in node["links"].items()}}
             for k, ring in enumerate(rings) for node_id, node in ring["nodes"].items() if "links" in node}
    nodes["test"] = {"type": "FlowOPDMiniWorldPrompts"}
    nodes["eval"] = {"type": "FlowOPDEvaluator", "links": {"prompts": "test.prompts", "model_1": "r0cold0.model"}}
    path = tmp_path / "rings.yaml"
    path.write_text(yaml.safe_dump({"schema_version": 1, "nodes": nodes}, sort_keys=False))
    with pytest.raises(GraphValidationError) as info:
        validate(load_graph_file(path))
    cycles = [i for i in info.value.issues if i.type == "dependency_cycle"]
    assert len(cycles) == 11 and "2 more cycles not shown" in str(info.value)


# --- names and paths -------------------------------------------------------------------------------------------


def test_unsafe_ids_write_nothing(tmp_path):
    escape = Path("/tmp/flowopd_escape")
    existed = escape.exists()
    run_dir = tmp_path / "run"
    assert runner.main(["run", str(FIXTURES / "node_ids_unsafe.yaml"), "--run-dir", str(run_dir)]) == 2
    assert not run_dir.exists() and escape.exists() == existed


def test_import_refuses_an_unsafe_name(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    assert runner.main(["import", str(FIXTURES / "soft_route_unknown_teacher.api.json"), "-o", str(out),
                        "--name", "../escape"]) == 2
    assert "field 'name': [invalid_graph] --name '../escape' is not allowed" in capsys.readouterr().err
    assert not out.exists()


def test_unreadable_files_are_refused(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("schema_version: 1\nname: caf\xe9\n".encode("latin-1"))
    assert runner.main(["validate", str(tmp_path / "latin1.yaml")]) == 2
    assert "[invalid_yaml] cannot read" in capsys.readouterr().err
    with pytest.raises(GraphValidationError, match="invalid_yaml"):
        load_graph_file(tmp_path / "nul\0name.yaml")


def test_paths_made_from_names_stay_inside():
    assert inside("/runs", "demo", "cache") == Path("/runs/demo/cache")
    for part in ("..", ".", "", "/etc", "a/b", "a\\b", "a\nb", "a\0b"):
        with pytest.raises(ValueError):
            inside("/runs", "demo", part)


def test_comfyui_node_ids_cannot_lead_outside_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPD_COMFY_OUTPUT", str(tmp_path / "out"))
    seed = comfy.NODE_CLASS_MAPPINGS["FlowOPDSeed"]
    assert seed().execute(unique_id="../../../escape\n/x", seed=3)["result"] == (3,)
    made = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert made and all((tmp_path / "out" / "flowopd") in [p, *p.parents] or p == tmp_path / "out" for p in made)


def test_parser_limits(monkeypatch, tmp_path):
    monkeypatch.setattr(graph_module, "MAX_NODES", 3)
    with pytest.raises(GraphValidationError, match="4 nodes; a graph may have 3"):
        validate(load_graph_file(FIXTURES / "many_errors.yaml"))
    monkeypatch.setattr(graph_module, "MAX_FILE_BYTES", 100)
    assert runner.main(["validate", str(DEMO)]) == 2
    with pytest.raises(GraphValidationError, match="a graph file may have 100"):
        load_graph_file(DEMO)
    assert runner.main(["validate", str(tmp_path)]) == 2  # a folder, not a file


# --- --set -----------------------------------------------------------------------------------------------------


def test_set_takes_text_as_given_for_text_inputs(capsys):
    weights = "router.weights=text: text=0.8 compose=0.2; untagged: compose=1"
    assert runner.main(["validate", str(FULL), "--set", "router.mode=soft", "--set", weights]) == 0
    # a choice is text too: 'true' stays the choice 'true', not YAML's boolean
    assert runner.main(["validate", str(FULL), "--set", "opd.kl_form=true"]) == 0
    # other types are YAML scalars, checked like the file's values
    assert runner.main(["validate", str(FULL), "--set", "eval.steps=2", "--set", "eval.guidance_scale=1.5"]) == 0
    capsys.readouterr()
    assert runner.main(["validate", str(FULL), "--set", "eval.guidance_scale=1e-4"]) == 2
    assert "write 0.0001" in capsys.readouterr().err


def test_every_bad_set_is_reported_with_every_other_problem(capsys):
    sets = ["nosuch.seed=1", "broken", "evl.steps=2", "eval.steps=[1, 2]", "eval.steps=0", "router.mode=sideways"]
    assert runner.main(["validate", str(FULL), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "6 errors" in err
    assert "node 'nosuch', field 'seed': [bad_override]" in err
    assert "[bad_override] --set 'broken': expected NODE.PARAM=VALUE" in err
    assert "no node 'evl' (did you mean 'eval'?)" in err
    assert "node 'eval', field 'steps': [bad_override]" in err
    assert "node 'eval' (FlowOPDEvaluator), field 'steps': [value_smaller_than_min]" in err
    assert "node 'router' (FlowOPDTaskRouter), field 'mode': [value_not_in_list]" in err


# --- error reports ---------------------------------------------------------------------------------------------


def test_missing_graph_file_is_file_not_found(capsys, tmp_path):
    for name in ("no.yaml", "no.api.json"):
        assert runner.main(["validate", str(tmp_path / name)]) == 2
        assert "[file_not_found] no such graph file" in capsys.readouterr().err
    assert runner.main(["validate", "--json", str(tmp_path / "no.yaml")]) == 2
    assert json.loads(capsys.readouterr().out)["node_errors"][""]["errors"][0]["type"] == "file_not_found"


def test_unknown_names_get_a_did_you_mean(capsys):
    sets = ["save.filname=a.jsonl", "prompts.typ=x"]
    assert runner.main(["validate", str(DEMO), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "no input 'filname' (did you mean 'filename'?)" in err


def test_validate_json_on_a_valid_graph_prints_json(capsys):
    assert runner.main(["validate", "--json", str(DEMO)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid"] is True and data["node_errors"] == {} and data["nodes"] == 2


@pytest.mark.parametrize("args", [[], ["--help"]])
def test_usage_shows_the_graph_form(args):
    out = subprocess.run([sys.executable, "runner.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == (0 if args else 2)
    text = out.stdout + out.stderr
    assert "usage: runner.py GRAPH.yaml [--set NODE.PARAM=VALUE ...]" in text and "Traceback" not in text


# --- parsing ---------------------------------------------------------------------------------------------------


def test_yaml_is_parsed_once_with_the_c_loader(monkeypatch):
    if yaml.__with_libyaml__:
        assert graph_module.SAFE_PARSER is yaml.CSafeLoader
    calls = []

    class Counted(graph_module.SAFE_PARSER):  # the safe loader, counting the texts it is given
        def __init__(self, stream):
            calls.append(type(self).__mro__[1])
            super().__init__(stream)

    monkeypatch.setattr(graph_module, "SAFE_PARSER", Counted)
    readers = [n for n in vars(yaml) if n in ("scan", "parse", "compose") or n.endswith(("load", "load_all"))]
    assert len(readers) >= 8  # PyYAML's module-level readers, the safe and the unsafe ones
    for name in readers:
        monkeypatch.setattr(yaml, name, None)  # only the safe loader itself reads the text
    assert validate(load_graph_file(FULL)).name == "full_opd"
    assert parse_yaml("a: 1\nb: [x, 'y']\n", "t") == {"a": 1, "b": ["x", "y"]}
    assert calls == [yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader] * 2  # one parse per file


def test_a_large_graph_parses_and_validates_whole(tmp_path):
    lines = ["schema_version: 1", "nodes:"]
    for i in range(5000):
        lines += [f"  p{i}: {{type: FlowOPDPromptText, params: {{text: 'prompt {i}', task: compose}}}}",
                  f"  s{i}: {{type: FlowOPDSavePrompts, links: {{prompts: p{i}.prompts}}}}"]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines))
    # its speed is bench/bench_validate.py's (50,000 nodes); here: such a graph loads and validates whole
    assert len(validate(load_graph_file(path)).order) == 10_000


def test_a_linked_widget_does_not_break_a_nodes_own_checks():
    data = yaml.safe_load(FULL.read_text())
    data["nodes"]["cold_seed"] = {"type": "FlowOPDSeed", "params": {"seed": 4}}
    data["nodes"]["cold_start"]["links"]["rank"] = "cold_seed.seed"  # check_params reads rank: known at run time
    graph = graph_module.graph_from_data(data, base_dir=FULL.parent, default_name="x", source="t")
    assert "cold_seed" in validate(graph).nodes


class _BelowFive(Node):
    NODE_ID, CATEGORY, DESCRIPTION, OUTPUT_NODE = "FlowOPDTestBelowFive", "FlowOPD/test", "a checked value", True
    INPUTS = (In("value", "INT", 0, "a value below 5", min=0, max=100),)
    OUTPUTS = (Out("value", "INT", "the value"),)

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        return [("value", "must be below 5")] if params["value"] >= 5 else []

    def run(self, value: int) -> tuple[int]:
        return (value,)


def test_a_check_that_needs_a_linked_value_runs_when_the_node_starts(tmp_path, monkeypatch):
    from flowopd_nodes.engine.errors import NodeExecutionError
    from flowopd_nodes.engine.scheduler import run_graph

    monkeypatch.setitem(REGISTRY, _BelowFive.NODE_ID, _BelowFive)
    data = {"schema_version": 1, "nodes": {"seed": {"type": "FlowOPDSeed", "params": {"seed": 7}},
                                           "check": {"type": _BelowFive.NODE_ID, "links": {"value": "seed.seed"}}}}
    valid = validate(graph_module.graph_from_data(data, base_dir=tmp_path, default_name="g", source="t"))
    with pytest.raises(NodeExecutionError, match="value: must be below 5"):
        run_graph(valid, tmp_path / "run", show_progress=False)
    assert not list((tmp_path / "run" / "cache").glob("check/*"))
