"""Every graph shipped in graphs/ validates (the cluster graphs of graphs/sd35m/ without their files, which live
on the cluster)."""

from pathlib import Path

import pytest

import runner
from flowopd_nodes.engine.errors import GraphValidationError
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.validate import validate

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").rglob("*.yaml"))
CLUSTER = ROOT / "graphs" / "sd35m"
LOCAL = [p for p in GRAPHS if CLUSTER not in p.parents]
REMOTE = [p for p in GRAPHS if CLUSTER in p.parents]


def test_graphs_exist():
    assert LOCAL and REMOTE


@pytest.mark.parametrize("path", LOCAL, ids=[p.stem for p in LOCAL])
def test_shipped_graph_validates(path, capsys):
    assert runner.main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", REMOTE, ids=[p.stem for p in REMOTE])
def test_cluster_graph_validates_without_its_files(path):
    validate(load_graph_file(path), check_files=False)
    with pytest.raises(GraphValidationError) as info:  # here the SD3.5-M folder does not exist...
        validate(load_graph_file(path))
    assert {(e.type, e.node) for e in info.value.issues} == {("file_not_found", "base")}  # ...and nothing else
