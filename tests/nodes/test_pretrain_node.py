"""The pretrain node builds a tiny pipeline, or continues training a linked one (``init``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowopd_core.models.pipeline import load_pipeline
from flowopd_nodes.engine.errors import GraphValidationError
from flowopd_nodes.engine.graph import graph_from_data
from flowopd_nodes.engine.scheduler import run_graph
from flowopd_nodes.engine.validate import validate

TINY = dict(sample_size=16, num_layers=1, num_attention_heads=2, attention_head_dim=16, text_dim=32, clip_hidden=16,
            text_layers=1, text_heads=2)


def _graph(tmp_path, second: dict) -> dict:
    return {
        "schema_version": 1,
        "nodes": {
            "first": {"type": "FlowOPDPretrainMiniWorld",
                      "params": {**TINY, "steps": 3, "batch_size": 4, "log_every": 1, "seed": 0}},
            "more": {"type": "FlowOPDPretrainMiniWorld", "params": second, "links": {"init": "first.model"}},
            "p": {"type": "FlowOPDMiniWorldPrompts", "params": {"task": "all", "split": "test", "per_task": 1}},
            "s": {"type": "FlowOPDSample", "params": {"steps": 2},
                  "links": {"model": "more.model", "prompts": "p.prompts"}},
            "grid": {"type": "FlowOPDImageGrid", "links": {"images": "s.images", "prompts": "s.prompts"}},
        },
    }


def test_init_continues_training_the_linked_pipeline(tmp_path):
    second = {"steps": 2, "batch_size": 4, "log_every": 1, "seed": 1, "lr": 1e-3, "task_weights": "text:2, quality:1",
              "text_jitter": "0.5, 0.5", "device": "cpu", "template_weights": "compose/position:3, text/word2:0",
              "compose_crop_fraction": 0.5, "binding_weight": 5.0}
    data = _graph(tmp_path, second)
    graph = graph_from_data(data, base_dir=tmp_path, default_name="g", source="test")
    result = run_graph(validate(graph), tmp_path / "run", show_progress=False)
    first = load_pipeline(result.outputs["first"]["model"].path)
    more = load_pipeline(result.outputs["more"]["model"].path)
    arch = lambda pipe: {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}  # noqa: E731
    assert arch(more) == arch(first)  # the architecture is the init model's
    a, b = first.transformer.state_dict(), more.transformer.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # and it trained on from there
    for name in ("text_encoder", "text_encoder_3"):  # frozen encoders are carried over unchanged
        sa, sb = getattr(first, name).state_dict(), getattr(more, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    record = json.loads((Path(result.outputs["more"]["model"].path).parent / "pretrain.json").read_text())
    assert record["steps"] == 2 and record["config"]["image_size"] == 16 and record["config"]["binding_weight"] == 5.0
    assert result.outputs["more"]["model"].label == "more"  # reports name it by its node


def test_bad_data_options_are_refused_before_anything_runs_naming_node_and_field(tmp_path):
    second = {"steps": 2, "task_weights": "txt:1", "text_jitter": "1", "template_weights": "compose/word2:1"}
    graph = graph_from_data(_graph(tmp_path, second), base_dir=tmp_path, default_name="g", source="<test>")
    with pytest.raises(GraphValidationError) as info:
        validate(graph)
    assert {(i.node, i.field) for i in info.value.issues} == {
        ("more", "task_weights"), ("more", "text_jitter"), ("more", "template_weights")}
    assert "unknown template 'compose/word2'" in str(info.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("field", "value"), [
    ("compose_crop_fraction", 1.5), ("compose_crop_fraction", -0.1), ("compose_crop_fraction", "half"),
    ("binding_weight", -1.0), ("binding_weight", "heavy"), ("binding_weight", float("nan"))])
def test_a_bad_crop_fraction_or_binding_weight_is_refused_naming_node_and_field(tmp_path, field, value):
    graph = graph_from_data(_graph(tmp_path, {"steps": 2, field: value}), base_dir=tmp_path,
                            default_name="g", source="<test>")
    with pytest.raises(GraphValidationError) as info:
        validate(graph)
    assert {(i.node, i.field) for i in info.value.issues} == {("more", field)}
    assert not (tmp_path / "run").exists()
