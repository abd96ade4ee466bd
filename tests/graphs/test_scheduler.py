"""Caching and partial re-runs: unchanged nodes are served from the cache, changed ones and their
descendants re-execute, failures leave nothing half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import runner

GRAPH = """\
schema_version: 1
name: two_branches
nodes:
  a: {type: FlowOPDPromptText, params: {text: "two red circles", task: compose}}
  sa: {type: FlowOPDSavePrompts, links: {prompts: a.prompts}}
  f: {type: FlowOPDPromptFile, params: {path: prompts.txt}}
  sf: {type: FlowOPDSavePrompts, links: {prompts: f.prompts}, params: {filename: f.jsonl}}
  unused: {type: FlowOPDSeed, params: {seed: 3}}
"""


@pytest.fixture
def graph(tmp_path: Path) -> Path:
    (tmp_path / "prompts.txt").write_text("text\tthe word GO\nquality\ta clean square\n")
    path = tmp_path / "g.yaml"
    path.write_text(GRAPH)
    return path


def run(graph: Path, *extra: str) -> dict:
    run_dir = graph.parent / "run"
    assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress", *extra]) == 0
    return json.loads((run_dir / "status.json").read_text())


def states(status: dict) -> dict[str, str]:
    return {k: v["state"] for k, v in status["nodes"].items()}


def test_second_run_executes_nothing(graph):
    first = run(graph)
    assert states(first) == {"a": "executed", "sa": "executed", "f": "executed", "sf": "executed"}
    second = run(graph)
    assert second["executed"] == 0 and second["cached"] == 4
    assert {k: v["key"] for k, v in first["nodes"].items()} == {k: v["key"] for k, v in second["nodes"].items()}


def test_demand_driven_skips_nodes_no_output_needs(graph):
    assert "unused" not in run(graph)["nodes"]


def test_changed_param_reexecutes_node_and_descendants_only(graph):
    run(graph)
    status = run(graph, "--set", "a.text=three blue squares")
    assert states(status) == {"a": "executed", "sa": "executed", "f": "cached", "sf": "cached"}
    # Going back to the old value is a cache hit again (old entries are kept).
    status = run(graph)
    assert status["executed"] == 0


def test_changed_leaf_param_reexecutes_only_the_leaf(graph):
    run(graph)
    status = run(graph, "--set", "sf.filename=other.jsonl")
    assert states(status) == {"a": "cached", "sa": "cached", "f": "cached", "sf": "executed"}


def test_force_reexecutes_node_and_descendants(graph):
    run(graph)
    status = run(graph, "--force", "f")
    assert states(status) == {"a": "cached", "sa": "cached", "f": "executed", "sf": "executed"}
    assert run(graph)["executed"] == 0


def test_edited_input_file_invalidates_its_reader(graph):
    run(graph)
    (graph.parent / "prompts.txt").write_text("text\tthe word UP\n")
    status = run(graph)
    assert states(status) == {"a": "cached", "sa": "cached", "f": "executed", "sf": "executed"}
    out = (graph.parent / "run" / "nodes" / "sf" / "f.jsonl").read_text()
    assert "UP" in out and "GO" not in out


def test_outputs_round_trip_and_artifacts_in_run_dir(graph):
    run(graph)
    run_dir = graph.parent / "run"
    lines = (run_dir / "nodes" / "sa" / "prompts.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["text"] == "two red circles"
    assert (run_dir / "graph.yaml").is_file() and (run_dir / "run.log").is_file()


def test_incomplete_entry_is_not_served(graph):
    first = run(graph)
    entry = graph.parent / "run" / "cache" / "sf" / first["nodes"]["sf"]["key"]
    (entry / "outputs.json").unlink()  # as if the process died before finishing the node
    status = run(graph)
    assert states(status)["sf"] == "executed" and status["executed"] == 1


def test_failing_node_leaves_nothing_and_exits_1(tmp_path, capsys):
    # a typed prompt that is no mini-world prompt: only rendering its ground truth finds that out
    graph = tmp_path / "g.yaml"
    graph.write_text("schema_version: 1\nnodes:\n"
                     "  p: {type: FlowOPDPromptText, params: {text: a cat, task: compose}}\n"
                     "  r: {type: FlowOPDRenderGroundTruth, links: {prompts: p.prompts}}\n"
                     "  g: {type: FlowOPDImageGrid, links: {images: r.images}}\n")
    rc = runner.main(["run", str(graph), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "node 'r' (FlowOPDRenderGroundTruth) failed" in err and "not a mini-world prompt" in err
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["nodes"]["r"]["state"] == "failed"
    assert status["nodes"]["g"]["state"] == "skipped"
    assert not (tmp_path / "run" / "cache" / "r").exists() or not any((tmp_path / "run" / "cache" / "r").iterdir())


def test_malformed_prompt_file_is_refused_before_anything_runs(graph, capsys):
    (graph.parent / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    rc = runner.main(
        ["run", str(graph), "--run-dir", str(graph.parent / "run"), "--no-progress", "--set", "f.path=bad.jsonl"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "node 'f' (FlowOPDPromptFile), field 'path'" in err and "bad.jsonl:2" in err
    assert not (graph.parent / "run").exists()  # nothing ran, nothing was written


@pytest.mark.skipif(sys.platform == "win32", reason="the test holds the lock with fcntl")
def test_run_folder_held_by_another_runner_is_refused_cleanly(graph, capsys):
    import fcntl

    run(graph)
    run_dir = graph.parent / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with (run_dir / ".lock").open("a+") as held:  # what a running runner holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress", "--set", "a.text=two dots"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: run folder {run_dir}: another runner is using it" in err and "nothing ran" in err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing written or lost
    assert states(run(graph, "--set", "a.text=two dots"))["a"] == "executed"  # free again: it runs


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d.write_text("a file"), "it exists and is not a folder"),
    (lambda d: d.parent.joinpath("file").write_text("x"), "cannot make it"),  # run dir below a file
    (lambda d: (d.mkdir(), d.joinpath("notes.txt").write_text("mine")), "it holds other files and no earlier run"),
], ids=["a-file", "below-a-file", "a-foreign-folder"])
def test_unusable_run_folder_is_refused_before_anything_runs(graph, capsys, make, message):
    target = graph.parent / "target"
    make(target)
    run_dir = graph.parent / "file" / "run" if "make it" in message else target
    before = {p: p.read_bytes() for p in graph.parent.rglob("*") if p.is_file()}
    assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: run folder {run_dir}: {message}" in err and "nothing ran" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in graph.parent.rglob("*") if p.is_file()} == before  # nothing written


def test_force_unknown_node_is_an_error(graph):
    assert runner.main(["run", str(graph), "--run-dir", str(graph.parent / "run"), "--force", "nope"]) == 2


def test_bad_override_is_reported(graph, capsys):
    assert runner.main(["validate", str(graph), "--set", "a.text"]) == 2
    assert runner.main(["validate", str(graph), "--set", "zz.text=1"]) == 2
    assert runner.main(["validate", str(graph), "--set", "f.limit=-3"]) == 2
    err = capsys.readouterr().err
    assert "bad_override" in err and "value_smaller_than_min" in err


def test_export_comfy_api(graph, tmp_path):
    out = tmp_path / "api.json"
    assert runner.main(["export", str(graph), "--comfy-api", str(out)]) == 0
    prompt = json.loads(out.read_text())
    assert prompt["sa"] == {
        "class_type": "FlowOPDSavePrompts",
        "inputs": {"filename": "prompts.jsonl", "prompts": ["a", 0]},
        "_meta": {"title": "sa"},
    }
    assert Path(prompt["f"]["inputs"]["path"]).is_absolute()


def test_run_folder_started_by_another_rank_is_a_run_folder(graph):
    """Under torchrun a process r > 0 may make ``ranks/rank<r>`` before the main process looks at the folder."""
    (graph.parent / "run" / "ranks" / "rank1").mkdir(parents=True)
    assert states(run(graph))["a"] == "executed"


def test_export_and_import_refuse_unwritable_outputs_and_write_nothing(graph, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    good = tmp_path / "api.json"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    bad = tmp_path / "afile" / "w.json"
    assert runner.main(["export", str(graph), "--comfy-api", str(good), "--comfy-workflow", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write {bad}: {tmp_path / 'afile'} is not a folder" in err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # not even the good one
    assert runner.main(["export", str(graph), "--comfy-api", str(good)]) == 0
    missing = tmp_path / "no" / "imported.yaml"
    for out, why in ((tmp_path, "it is a folder"), (missing, f"its folder {missing.parent} does not exist")):
        assert runner.main(["import", str(good), "-o", str(out)]) == 2
        assert f"error: cannot write {out}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert runner.main(["import", str(good), "-o", str(tmp_path / "imported.yaml")]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_list_nodes(capsys):
    assert runner.main(["list-nodes"]) == 0
    assert "FlowOPDSeed" in capsys.readouterr().out
    assert runner.main(["list-nodes", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["FlowOPDPromptFile"]["input"]["required"]["format"][0] == ["auto", "txt", "jsonl"]
