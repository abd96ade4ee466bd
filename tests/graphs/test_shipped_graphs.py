"""Every graph shipped in graphs/ validates."""

from pathlib import Path

import pytest

import runner

GRAPHS = sorted((Path(__file__).resolve().parents[2] / "graphs").rglob("*.yaml"))


def test_graphs_exist():
    assert GRAPHS


@pytest.mark.parametrize("path", GRAPHS, ids=[p.stem for p in GRAPHS])
def test_shipped_graph_validates(path, capsys):
    assert runner.main(["validate", str(path)]) == 0, capsys.readouterr().err
