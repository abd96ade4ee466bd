"""LoadModel's single files and ComfyUI dropdowns, and the LoRA saver, headless and through the ComfyUI adapter
(stand-ins for ComfyUI's folder_paths)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.files import SD3_SINGLE_FILE_MARKER
from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_nodes.comfy import plugin as comfy
from flowopd_nodes.engine import context
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.validate import validate
from flowopd_nodes.nodes.lora_export import SaveLoRA
from flowopd_nodes.nodes.model import LoadModel

ROOT = Path(__file__).resolve().parents[2]
MINIWORLD = ROOT / "models" / "miniworld"


def _fake_sd3_file(path: Path) -> Path:
    """A file whose header looks like an SD3 single file (enough for listing and validation, not for loading)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({SD3_SINGLE_FILE_MARKER: torch.zeros(3, 2)}, str(path))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model handle carrying a (random, non-zero) adapter, as a trainer's output does."""
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    policy.add_adapter("student", LoraSpec(rank=2, alpha=4.0, init=False))
    adapter = policy.save_adapter("student", tmp_path_factory.mktemp("run") / "adapter")
    return ModelRef(str(MINIWORLD), adapter=str(adapter), label="student")


# ------------------------------------------------------------------------------------------------ headless


def test_load_model_checks_single_files_and_config(tmp_path):
    single = _fake_sd3_file(tmp_path / "sd35m.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    ok = {"path": str(MINIWORLD)}
    assert LoadModel.check_params(ok) == []
    assert LoadModel.check_params({"path": str(single), "config": str(MINIWORLD)}) == []
    assert [f for f, _ in LoadModel.check_params({"path": str(single), "config": ""})] == ["config"]
    fields = [f for f, _ in LoadModel.check_params({"path": str(other), "config": str(tmp_path)})]
    assert fields == ["path", "config"]  # every problem at once: not SD3, config without model_index.json
    assert [f for f, _ in LoadModel.check_params({"path": str(MINIWORLD), "config": str(MINIWORLD)})] == ["config"]
    (ref,) = LoadModel().run(str(single), "float32", "cpu", "b", 0, str(MINIWORLD))
    assert ref.path == str(single) and ref.config == str(MINIWORLD)
    (ref,) = LoadModel().run(str(MINIWORLD), "float32", "cpu", "b", 0)
    assert ref.config == ""


def test_graph_validation_takes_a_single_file_and_names_a_missing_config(tmp_path):
    _fake_sd3_file(tmp_path / "m.safetensors")
    graph = tmp_path / "g.yaml"
    body = ("schema_version: 1\nnodes:\n  base:\n    type: FlowOPDLoadModel\n    params:\n      path: m.safetensors\n"
            "{config}  grid:\n    type: FlowOPDImageGrid\n    links:\n      images: r.images\n"
            "  r:\n    type: FlowOPDRenderGroundTruth\n    links:\n      prompts: p.prompts\n"
            "  p:\n    type: FlowOPDPromptText\n    params:\n      text: a red circle\n")
    graph.write_text(body.format(config=f"      config: {MINIWORLD}\n"))
    validate(load_graph_file(graph))  # a file where the port takes a folder or a file
    graph.write_text(body.format(config=""))
    with pytest.raises(Exception) as err:
        validate(load_graph_file(graph))
    assert "node 'base' (FlowOPDLoadModel), field 'config'" in str(err.value)
    assert "needs a config" in str(err.value)


def test_save_lora_headless_writes_both_layouts_in_its_own_folder(tmp_path, trained):
    with context.use(context.NodeContext("save", tmp_path / "art", tmp_path)):
        (tmp_path / "art").mkdir()
        lora, folder = SaveLoRA().run(trained, "student.safetensors", "both")
    assert Path(lora) == tmp_path / "art" / "student.safetensors" and Path(folder) == tmp_path / "art"
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["flowopd_label"] == "student"
    assert "lora_transformer_transformer_blocks_0_attn_to_q.alpha" in keys and len(keys) == 3 * 14
    with safe_open(str(tmp_path / "art" / "diffusers" / "student.safetensors"), "pt") as f:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in f.keys()
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == ["student.safetensors"] * 2  # nothing else


def test_save_lora_refuses_a_model_without_adapter(tmp_path):
    with context.use(context.NodeContext("save", tmp_path, tmp_path)):
        with pytest.raises(ValueError, match="carries no adapter"):
            SaveLoRA().run(ModelRef(str(MINIWORLD)), "x.safetensors", "comfyui")


# ------------------------------------------------------------------------------------------------ ComfyUI


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """ComfyUI's folder_paths with a diffusers folder, two checkpoints (one SD3) and an empty loras folder."""
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    (models / "diffusers" / "mini").symlink_to(MINIWORLD)
    _fake_sd3_file(models / "checkpoints" / "sd35_medium.safetensors")
    save_file({"x": torch.zeros(1)}, str(models / "checkpoints" / "sdxl.safetensors"))
    (models / "loras").mkdir()
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    folder_paths.get_folder_paths = lambda kind: [str(models / kind)]
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    for name in ("comfy", "comfy.utils", "server"):
        monkeypatch.setitem(sys.modules, name, None)
    return models


def test_load_model_offers_comfyui_folders_and_resolves_them(comfy_folders):
    node = comfy.NODE_CLASS_MAPPINGS["FlowOPDLoadModel"]
    spec = node.INPUT_TYPES()
    choices, _ = spec["required"]["path"]
    # the shipped base first (a new node's value), then the repository's other bases; no SDXL file
    assert choices == ["models/miniworld", "models/binding", "diffusers/mini", "checkpoints/sd35_medium.safetensors"]
    config_choices, opts = spec["required"]["config"]  # a widget with a default: "required" in ComfyUI's spec
    assert config_choices == ["", "models/miniworld", "models/binding", "diffusers/mini"] and opts["default"] == ""
    assert node.VALIDATE_INPUTS(path="diffusers/mini", input_types={}) is True
    assert node.VALIDATE_INPUTS(path="models/miniworld", input_types={}) is True
    # a plain path from an exported workflow, not in the list: validated as a path, not refused as a choice
    assert node.VALIDATE_INPUTS(path=str(MINIWORLD), input_types={}) is True
    single = node.VALIDATE_INPUTS(path="checkpoints/sd35_medium.safetensors", config="", input_types={})
    assert "needs a config" in single
    assert node.VALIDATE_INPUTS(path="checkpoints/sd35_medium.safetensors", config="diffusers/mini",
                                input_types={}) is True
    (ref,) = node().execute(unique_id="1", path="diffusers/mini")["result"]
    assert ref.path == str(comfy_folders / "diffusers" / "mini")
    out = node().execute(unique_id="1", path="checkpoints/sd35_medium.safetensors", config="diffusers/mini")
    (ref,) = out["result"]
    assert ref.path == str(comfy_folders / "checkpoints" / "sd35_medium.safetensors")
    assert ref.config == str(comfy_folders / "diffusers" / "mini")


def test_save_lora_lands_in_comfyui_loras(comfy_folders, trained):
    node = comfy.NODE_CLASS_MAPPINGS["FlowOPDSaveLoRA"]
    lora, folder = node().execute(unique_id="9", model=trained, filename="student.safetensors",
                                  format="comfyui")["result"]
    assert Path(lora) == comfy_folders / "loras" / "student.safetensors"
    assert (Path(folder) / "student.safetensors").read_bytes() == Path(lora).read_bytes()
    node().execute(unique_id="9", model=trained, filename="student.safetensors", format="comfyui")  # same file: fine
    (comfy_folders / "loras" / "mine.safetensors").write_bytes(b"somebody else's")
    with pytest.raises(FileExistsError, match="not written by FlowOPD"):
        node().execute(unique_id="9", model=trained, filename="mine.safetensors", format="comfyui")
    assert (comfy_folders / "loras" / "mine.safetensors").read_bytes() == b"somebody else's"
    lora, _ = node().execute(unique_id="9", model=trained, filename="d.safetensors", format="diffusers")["result"]
    assert not (comfy_folders / "loras" / "d.safetensors").exists() and Path(lora).parent.name == "diffusers"
