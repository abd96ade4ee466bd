"""LoadAdapter puts a saved LoRA adapter on the linked base: refused folders name the node and field before
anything runs; a loaded teacher equals the one that was saved (same velocities)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import runner
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.pipeline import TextEmbeddingCache, velocity
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_nodes.engine.errors import GraphValidationError
from flowopd_nodes.engine.graph import graph_from_data
from flowopd_nodes.engine.validate import validate
from flowopd_nodes.nodes.adapters import LoadAdapter

ROOT = Path(__file__).resolve().parents[2]


def _graph(tmp_path: Path, adapter: str, comparisons: str = "") -> dict:
    return {"schema_version": 1, "nodes": {
        "base": {"type": "FlowOPDLoadModel", "params": {"path": str(ROOT / "models" / "miniworld")}},
        "teacher": {"type": "FlowOPDLoadAdapter", "params": {"adapter": adapter}, "links": {"model": "base.model"}},
        "test": {"type": "FlowOPDMiniWorldPrompts", "params": {"task": "compose", "split": "test", "per_task": 2}},
        "eval": {"type": "FlowOPDEvaluator", "params": {"steps": 2, "comparisons": comparisons},
                 "links": {"prompts": "test.prompts", "model_1": "base.model", "model_2": "teacher.model"}},
    }}


def _issues(tmp_path: Path, data: dict) -> set[tuple[str, str, str]]:
    graph = graph_from_data(data, base_dir=tmp_path, default_name="g", source="<test>")
    with pytest.raises(GraphValidationError) as info:
        validate(graph)
    return {(i.type, i.node, i.field) for i in info.value.issues}


def test_a_folder_that_is_not_an_adapter_is_refused_naming_node_and_field(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _issues(tmp_path, _graph(tmp_path, "empty")) == {("custom_validation_failed", "teacher", "adapter")}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"")
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    assert _issues(tmp_path, _graph(tmp_path, "bad")) == {("custom_validation_failed", "teacher", "adapter")}
    assert _issues(tmp_path, _graph(tmp_path, "nowhere")) == {("file_not_found", "teacher", "adapter")}


def test_the_adapter_label_is_checked_by_the_evaluators_comparisons(tmp_path):
    folder = tmp_path / "grpo-compose"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    # no label: the folder's name is the model's name, as in reports
    validate(graph_from_data(_graph(tmp_path, "grpo-compose", "grpo-compose vs base"), base_dir=tmp_path,
                             default_name="g", source="<test>"))
    issues = _issues(tmp_path, _graph(tmp_path, "grpo-compose", "teacher vs base"))
    assert issues == {("custom_validation_failed", "eval", "comparisons")}


def test_loaded_adapter_gives_the_saved_teachers_velocities(tmp_path):
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    pipe.save_pretrained(tmp_path / "base")
    policy = Policy(pipe.transformer)
    torch.manual_seed(3)
    policy.add_adapter("teacher", LoraSpec(rank=4, alpha=8.0, init=False))
    policy.save_adapter("teacher", tmp_path / "teacher")
    base = ModelRef(str(tmp_path / "base"), "float32", "cpu", label="base")
    (ref,) = LoadAdapter().run(base, str(tmp_path / "teacher"), "")
    assert ref.name == "teacher" and ref.adapter == str(tmp_path / "teacher") and ref.path == base.path

    loaded = ref.load(fresh=True)
    again = Policy(loaded.transformer)
    again.load_adapter("teacher", ref.adapter)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = TextEmbeddingCache(pipe).encode(["a red circle", "two blue squares"])
    cond_loaded = TextEmbeddingCache(loaded).encode(["a red circle", "two blue squares"])
    policy.set_active("teacher")
    again.set_active("teacher")
    want = velocity(policy, x, 0.5, cond, None, 1.0)
    got = velocity(again, x, 0.5, cond_loaded, None, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with policy.disable():
        assert not torch.allclose(velocity(policy, x, 0.5, cond, None, 1.0), want)  # the adapter does something


def test_cli_validate_names_the_adapter_field(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_graph(tmp_path, "missing")))
    assert runner.main(["validate", str(path)]) == 2
    assert "node 'teacher' (FlowOPDLoadAdapter), field 'adapter'" in capsys.readouterr().err


def _stamped(tmp_path: Path, base: Path) -> Path:
    from flowopd_core.models.base_stamp import stamp_adapter

    folder = tmp_path / "grpo-compose"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    stamp_adapter(folder, base)
    return folder


def test_an_adapter_stamped_with_another_base_is_refused_before_anything_runs(tmp_path):
    _stamped(tmp_path, ROOT / "models" / "binding")  # same architecture as the linked miniworld: peft would load it
    assert _issues(tmp_path, _graph(tmp_path, "grpo-compose")) == {("custom_validation_failed", "teacher", "adapter")}


def test_an_adapter_stamped_with_its_own_base_validates(tmp_path):
    _stamped(tmp_path, ROOT / "models" / "miniworld")
    validate(graph_from_data(_graph(tmp_path, "grpo-compose"), base_dir=tmp_path, default_name="g", source="<t>"))


def test_the_node_refuses_another_base_when_it_runs(tmp_path):
    # a base linked from a node whose params do not tell it (a trainer's output): the node itself checks
    folder = _stamped(tmp_path, ROOT / "models" / "binding")
    with pytest.raises(ValueError, match="was trained on the base"):
        LoadAdapter().run(ModelRef(str(ROOT / "models" / "miniworld")), str(folder), "")
    (ref,) = LoadAdapter().run(ModelRef(str(ROOT / "models" / "binding")), str(folder), "")
    assert ref.adapter == str(folder)
