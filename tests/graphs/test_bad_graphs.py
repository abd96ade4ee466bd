"""Every bad-graph fixture fails validation with exactly the problems its `# expect:` lines name."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixture_marks import BAD, FIXTURES, marked

import runner
from flowopd_nodes.engine.errors import GraphValidationError
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.validate import validate


def expected(path: Path) -> set[tuple[str, str, str]]:
    out = marked(path, "expect")
    assert out, f"{path.name} has no '# expect:' line"
    return out


def test_there_are_enough_fixtures():
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_fixture_reports_exact_errors(path: Path):
    with pytest.raises(GraphValidationError) as info:
        validate(load_graph_file(path))
    got = {(i.type, i.node, i.field) for i in info.value.issues}
    assert got == expected(path), str(info.value)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_cli_validate_exits_2_naming_node_and_field(path: Path, capsys):
    assert runner.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    for kind, node, field in expected(path):
        assert f"[{kind}]" in err
        if node:
            assert f"node {node!r}" in err  # repr: control characters show escaped
        if field:
            assert f"field {field!r}" in err


def test_python_tag_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    graph = tmp_path / "evil.yaml"
    graph.write_text(
        "schema_version: 1\nnodes:\n  x:\n"
        f"    type: !!python/object/apply:os.system [\"touch {marker}\"]\n"
    )
    with pytest.raises(GraphValidationError) as info:
        load_graph_file(graph)
    assert info.value.issues[0].type == "unsafe_yaml"
    assert runner.main(["run", str(graph), "--run-dir", str(tmp_path / "run")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # nothing was written before the refusal


def test_node_errors_have_comfyui_shape():
    with pytest.raises(GraphValidationError) as info:
        validate(load_graph_file(FIXTURES / "many_errors.yaml"))
    errors = info.value.node_errors()
    assert set(errors) == {"seed", "p", "s", "x"}
    entry = errors["seed"]
    assert entry["class_type"] == "FlowOPDSeed"
    assert entry["errors"][0]["type"] == "value_smaller_than_min"
    assert entry["errors"][0]["extra_info"] == {"input_name": "seed"}
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}


def test_cli_validate_json(capsys):
    assert runner.main(["validate", "--json", str(FIXTURES / "type_mismatch.yaml")]) == 2
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["node_errors"]["grid"]["errors"][0]["type"] == "return_type_mismatch"
