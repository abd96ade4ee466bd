"""The runner's estimate of the time left: what it adds up (flowopd_nodes/engine/eta.py) and which nodes it
expects to execute (predicted from the cache before the run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import runner
from flowopd_nodes.engine.eta import Estimate, EtaTracker, estimate, format_seconds, node_left
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.scheduler import predict_to_run
from flowopd_nodes.engine.validate import validate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_and_text():
    assert [format_seconds(s) for s in (0, 44.6, 200, 7500)] == ["0s", "45s", "3m20s", "2h05m"]
    assert Estimate(200.0).text() == "ETA 3m20s"
    assert Estimate(200.0, ("eval", "grid")).text() == "ETA >= 3m20s (2 nodes untimed)"
    assert Estimate(0.0, ("eval",)).text() == "ETA ? (1 node untimed)"
    assert Estimate(200.0, ("eval",)).to_json(1000.0) == {
        "seconds_left": 200.0, "finish_at": None, "lower_bound": True, "untimed": ["eval"]}
    assert Estimate(5.0).to_json(1000.0)["finish_at"] == 1005.0


def test_the_running_node_from_its_rate_else_from_its_last_time():
    assert node_left(total=100, done=40, rate=0.5, elapsed=20.0, previous=999.0) == 30.0  # the rate wins
    assert node_left(total=100, done=0, rate=None, elapsed=20.0, previous=50.0) == 30.0
    assert node_left(total=100, done=0, rate=None, elapsed=80.0, previous=50.0) == 0.0  # overdue: not negative
    assert node_left(total=100, done=0, rate=None, elapsed=1.0, previous=None) is None


def test_estimate_adds_known_times_and_names_the_untimed():
    got = estimate(["train", "eval", "grid"], {"train": 60.0, "grid": 1.5}, running="load", running_left=2.0)
    assert got == Estimate(63.5, ("eval",))
    assert estimate(["eval"], {}, running="train", running_left=None) == Estimate(0.0, ("train", "eval"))


def test_tracker_times_units_after_the_first_update():
    clock = Clock()
    tracker = EtaTracker(dict.fromkeys(["train", "eval"]), {"eval": 30.0}, clock=clock)
    tracker.start("train")
    tracker.new_bar(10)
    assert tracker.estimate() == Estimate(30.0, ("train",))  # never ran here, no unit yet: untimed
    clock.now += 5.0
    tracker.update(4)  # a resumed trainer jumps to its restored units at once: not timed
    clock.now += 6.0
    tracker.update(2)  # 2 units in 6 s: 3 s a unit, 4 left
    assert tracker.estimate() == Estimate(12.0 + 30.0)
    tracker.update(0)  # a check point moves nothing
    assert tracker.estimate() == Estimate(42.0)
    tracker.finish("train", executed=True)
    assert tracker.timings["train"] == 11.0 and tracker.running is None
    tracker.start("eval")
    clock.now += 10.0
    assert tracker.estimate() == Estimate(20.0)  # its last time here, less what it has run


GRAPH = """\
schema_version: 1
name: eta
nodes:
  a: {type: FlowOPDPromptText, params: {text: "two red circles", task: compose}}
  sa: {type: FlowOPDSavePrompts, links: {prompts: a.prompts}}
  b: {type: FlowOPDPromptText, params: {text: "a blue square", task: compose}}
  sb: {type: FlowOPDSavePrompts, links: {prompts: b.prompts}, params: {filename: b.jsonl}}
"""


@pytest.fixture
def graph(tmp_path: Path) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(GRAPH)
    return path


def _run(graph: Path, *extra: str) -> dict:
    run_dir = graph.parent / "run"
    assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress", *extra]) == 0
    return json.loads((run_dir / "status.json").read_text())


def _predicted(graph: Path, *overrides: str, force=frozenset()) -> list[str]:
    from flowopd_nodes.engine.graph import apply_overrides

    g = load_graph_file(graph)
    apply_overrides(g, list(overrides))
    return predict_to_run(validate(g), graph.parent / "run", force)


def test_the_nodes_to_run_are_predicted_from_the_cache_and_status_carries_the_estimate(graph):
    assert _predicted(graph) == ["a", "sa", "b", "sb"]
    first = _run(graph)
    assert set(first["timings"]) == {"a", "sa", "b", "sb"} and all(v >= 0 for v in first["timings"].values())
    assert first["eta"]["seconds_left"] == 0.0 and first["eta"]["untimed"] == [] and first["running"] is None
    assert _predicted(graph) == []
    assert _predicted(graph, "b.text=a green square") == ["b", "sb"]  # an override counts
    assert _predicted(graph, force={"a"}) == ["a", "sa"]
    g = graph.read_text().replace("a blue square", "a green square")
    graph.write_text(g)
    assert _predicted(graph) == ["b", "sb"]  # the changed node and what depends on it
    second = _run(graph)
    executed = [k for k, v in second["nodes"].items() if v["state"] == "executed"]
    assert executed == ["b", "sb"]
    assert set(second["timings"]) == {"a", "sa", "b", "sb"}  # a and sa keep their time from the first run
    assert second["timings"]["a"] == first["timings"]["a"]
