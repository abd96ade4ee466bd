"""The repository as a ComfyUI custom-node package: its entry point, the node specs ComfyUI reads, and the
adapter (context, progress, Stop, metrics events, inference mode) driven through stand-ins for ComfyUI's modules."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowopd_core.miniworld.sets import prompt_set
from flowopd_core.models.modelref import ModelRef
from flowopd_nodes.comfy import plugin as comfy
from flowopd_nodes.engine.ports import PRIMITIVES
from flowopd_nodes.nodes.registry import NODES

ROOT = Path(__file__).resolve().parents[2]
# Options ComfyUI's V1 schema knows for a widget (frontend zod schema, ComfyUI 0.3.x).
WIDGET_OPTIONS = {"default", "min", "max", "step", "tooltip", "multiline", "control_after_generate"}


def load_plugin(name: str = "custom_nodes_flowopd"):
    """Import the repository root the way ComfyUI imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_root_package_exports_the_mappings():
    plugin = load_plugin()
    ids = [cls.NODE_ID for cls in NODES]
    assert list(plugin.NODE_CLASS_MAPPINGS) == ids
    assert list(plugin.NODE_DISPLAY_NAME_MAPPINGS) == ids
    for cls in NODES:
        comfy_cls = plugin.NODE_CLASS_MAPPINGS[cls.NODE_ID]
        assert issubclass(comfy_cls, cls) and comfy_cls.RUNNER_CLASS is cls
        assert plugin.NODE_DISPLAY_NAME_MAPPINGS[cls.NODE_ID] == cls.DISPLAY_NAME != ""
    assert not hasattr(plugin, "WEB_DIRECTORY")  # no web files shipped


def test_importing_the_plugin_imports_no_comfyui_module():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('p', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m)\n"
        "print(len(m.NODE_CLASS_MAPPINGS), sorted(k for k in sys.modules if k.split('.')[0] in "
        "{'comfy', 'server', 'folder_paths', 'execution', 'nodes'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.split()[0] == str(len(NODES)) and out.stdout.strip().endswith("[]")


@pytest.mark.parametrize("cls", comfy.COMFY_NODES, ids=[c.NODE_ID for c in comfy.COMFY_NODES])
def test_input_types_have_comfyui_shape(cls):
    spec = cls.INPUT_TYPES()
    json.dumps(spec)  # served as JSON by /object_info
    assert set(spec) <= {"required", "optional", "hidden"} and spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert cls.FUNCTION == "execute" and callable(getattr(cls(), cls.FUNCTION))
    assert cls.CATEGORY.startswith("FlowOPD") and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and len(entry) == 2, name
            kind, opts = entry
            assert isinstance(opts, dict) and set(opts) <= WIDGET_OPTIONS, (name, opts)
            assert opts.get("tooltip"), f"{name} has no tooltip"
            if isinstance(kind, list):  # combo
                assert kind and all(isinstance(c, str) for c in kind)
                assert opts.get("default", kind[0]) in kind
                continue
            assert kind in PRIMITIVES or kind.startswith("FLOWOPD_") or kind == "IMAGE"
            if kind == "INT":
                assert opts["control_after_generate"] is False  # seeds stay as set: no "randomize" control
            if kind == "FLOAT":  # the canvas shows and rounds to the step's decimals: default and bounds survive
                decimals = len(f"{opts['step']:.10f}".rstrip("0").split(".")[1])
                for key in ("default", "min", "max"):
                    assert round(opts[key], decimals) == opts[key], (name, key, opts)
            if kind in ("INT", "FLOAT") and "default" in opts:
                default = opts["default"]
                assert opts.get("min", -math.inf) <= default <= opts.get("max", math.inf), name
                if kind == "INT":
                    assert isinstance(default, int) and not isinstance(default, bool)
            if kind == "BOOLEAN" and "default" in opts:
                assert isinstance(opts["default"], bool)
            if kind == "STRING" and "default" in opts:
                assert isinstance(opts["default"], str)
            if kind not in PRIMITIVES:
                assert "default" not in opts  # wire inputs are links only


def test_validate_inputs_runs_the_runners_checks_on_every_widget():
    import inspect

    load_model = comfy.NODE_CLASS_MAPPINGS["FlowOPDLoadModel"]
    # ComfyUI reads this signature: with input_types listed, it leaves every value and link-type check to us,
    # so the canvas refuses exactly what the runner refuses, with the runner's messages.
    args = inspect.getfullargspec(load_model.VALIDATE_INPUTS).args
    assert args == ["cls", "unique_id", "input_types", "path", "dtype", "device", "label", "max_sequence_length",
                    "config"]
    assert load_model.VALIDATE_INPUTS(path="models/miniworld", input_types={}) is True  # relative to the repo root
    assert "file_not_found" in load_model.VALIDATE_INPUTS(path="no/such/folder", input_types={})
    assert "not a diffusers pipeline folder" in load_model.VALIDATE_INPUTS(path="graphs", input_types={})
    assert load_model.VALIDATE_INPUTS(path=None, input_types={"path": "STRING"}) is True  # linked: known at run time
    for cls in comfy.COMFY_NODES:
        assert hasattr(cls, "VALIDATE_INPUTS"), cls.NODE_ID
        assert hasattr(cls, "IS_CHANGED") == any(p.path for p in cls.INPUTS), cls.NODE_ID


def test_cross_field_checks_refuse_a_call_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPD_COMFY_OUTPUT", str(tmp_path))
    grpo = comfy.NODE_CLASS_MAPPINGS["FlowOPDGRPOTrainer"]
    model = ModelRef(str(ROOT / "models" / "miniworld"))
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        grpo().execute(unique_id="3", model=model, prompts=prompt_set("text", "train", 2, 0), rewards="nope")
    assert not (tmp_path / "flowopd").exists()  # refused before any folder was made


def test_checks_on_linked_values_refuse_a_call_before_it_starts(tmp_path, monkeypatch):
    # what a graph file's validation reads from the upstream nodes' params, ComfyUI reads from the linked values
    from flowopd_core.models.base_stamp import stamp_adapter

    monkeypatch.setenv("FLOWOPD_COMFY_OUTPUT", str(tmp_path))
    adapter = tmp_path / "teacher"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    stamp_adapter(adapter, ROOT / "models" / "binding")
    load = comfy.NODE_CLASS_MAPPINGS["FlowOPDLoadAdapter"]
    with pytest.raises(ValueError, match=r"FlowOPDLoadAdapter \(node 4\): adapter: the adapter .* was trained on"):
        load().execute(unique_id="4", model=ModelRef(str(ROOT / "models" / "miniworld")), adapter=str(adapter))

    evaluator = comfy.NODE_CLASS_MAPPINGS["FlowOPDEvaluator"]
    base = ModelRef(str(ROOT / "models" / "miniworld"), label="base")
    with pytest.raises(ValueError, match=r"FlowOPDEvaluator \(node 5\): comparisons: .*'student'"):
        evaluator().execute(unique_id="5", prompts=prompt_set("text", "test", 2, 0), model_1=base,
                            comparisons="student vs base")
    assert not (tmp_path / "flowopd").exists()  # refused before any folder was made


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture
def fake_comfyui(tmp_path, monkeypatch):
    """Minimal stand-ins for the ComfyUI modules the adapter uses; records what the adapter does with them."""
    state = types.SimpleNamespace(bars=[], events=[], stop_after=None, updates=0, output=tmp_path / "output",
                                  checks=0, stop_at_check=None)

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id, self.current = total, node_id, 0
            state.bars.append(self)

        def update(self, value):  # ComfyUI's hook raises on Stop at every update, update(0) too
            self.current += value
            state.updates += value
            state.checks += value == 0
            if state.stop_after is not None and state.updates >= state.stop_after:
                raise Interrupted("Stop pressed")
            if state.stop_at_check is not None and state.checks >= state.stop_at_check:
                raise Interrupted("Stop pressed")

    comfy_pkg = types.ModuleType("comfy")
    comfy_utils = types.ModuleType("comfy.utils")
    comfy_utils.ProgressBar = ProgressBar
    comfy_pkg.utils = comfy_utils
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(
        instance=types.SimpleNamespace(send_sync=lambda event, data: state.events.append((event, data)))
    )
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(state.output)
    for name, module in {
        "comfy": comfy_pkg, "comfy.utils": comfy_utils, "server": server, "folder_paths": folder_paths
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state


def test_training_node_in_inference_mode_stops_on_stop_inside_an_epoch_and_resumes(fake_comfyui):
    node_cls = comfy.NODE_CLASS_MAPPINGS["FlowOPDGRPOTrainer"]
    # checkpoint_every is an advanced setting: it comes from a settings node, as on the canvas
    (settings,) = comfy.NODE_CLASS_MAPPINGS["FlowOPDGRPOSettings"]().execute(unique_id="11", checkpoint_every=5)[
        "result"]
    assert settings["checkpoint_every"] == 5 and settings["keep_checkpoints"] == 2  # every value, defaults filled
    assert not (fake_comfyui.output / "flowopd").exists()  # a settings node writes nothing
    inputs = dict(
        model=ModelRef(str(ROOT / "models" / "miniworld")), prompts=prompt_set("compose", "train", 2, 0),
        rewards="compose", label="t", epochs=3, group_size=2, prompts_per_epoch=2, steps=3, settings=settings,
        lora_rank=4, lr=0.01,
    )
    units = 1 + 2  # per epoch: one sampling batch (4 samples) and updates_per_epoch = 2 optimizer steps
    fake_comfyui.stop_after = units + 2  # Stop pressed after epoch 1's first optimizer step
    with torch.inference_mode():  # how ComfyUI runs every node
        with pytest.raises(Interrupted):
            node_cls().execute(unique_id="12", **inputs)
    assert fake_comfyui.bars[0].total == 3 * units and fake_comfyui.bars[0].node_id == "12"
    assert fake_comfyui.bars[0].current == units + 2  # it stopped at that update, inside epoch 1
    root = fake_comfyui.output / "flowopd"
    (folder,) = (root / "checkpoints").iterdir()
    assert folder.name == "12-FlowOPDGRPOTrainer"
    (ckpt,) = folder.iterdir()
    (newest,) = ckpt.iterdir()  # checkpoint_every = 5, yet the Stop kept the completed epoch 0
    assert newest.name == "epoch_000001"
    assert [h["epoch"] for h in json.loads((newest / "history.json").read_text())] == [0]  # nothing of epoch 1
    assert not (root / folder.name / ckpt.name).exists()  # no half-written artifacts
    assert [e["metrics"]["epoch"] for _, e in fake_comfyui.events] == [0]
    assert {(name, e["node"], e["class_type"]) for name, e in fake_comfyui.events} == {
        ("flowopd.metrics", "12", "FlowOPDGRPOTrainer")
    }

    fake_comfyui.stop_after = None  # queue the same graph again: the same folder, resumed from epoch 1
    inputs["settings"] = dict(settings)  # a new dict with the same values (ComfyUI re-ran the settings node)
    with torch.inference_mode():
        out = node_cls().execute(unique_id="12", **inputs)
    model, curves = out["result"]
    artifacts = root / folder.name / ckpt.name
    assert Path(model.adapter).parent == artifacts and Path(curves) == artifacts / "curves.png"
    assert [h["epoch"] for h in json.loads((artifacts / "metrics.json").read_text())] == [0, 1, 2]
    assert not ckpt.exists()  # removed once the node succeeded
    assert fake_comfyui.bars[-1].current == fake_comfyui.bars[-1].total == 3 * units  # from epoch 1's units on
    assert [e["metrics"]["epoch"] for _, e in fake_comfyui.events[1:]] == [1, 2]  # epoch 0 was not run again
    assert out["ui"]["images"] == [
        {"filename": "curves.png", "subfolder": f"flowopd/{folder.name}/{ckpt.name}", "type": "output"}
    ]
    with torch.inference_mode():  # the same call uninterrupted (another node id: its own folders)
        (straight, _) = node_cls().execute(unique_id="13", **inputs)["result"]
    resumed, want = (load_file(str(Path(m.adapter) / "adapter_model.safetensors")) for m in (model, straight))
    assert resumed.keys() == want.keys() and all(torch.equal(resumed[k], want[k]) for k in want)  # bit for bit


def test_outputs_of_one_call_land_in_a_folder_named_by_node_and_inputs(fake_comfyui):
    render = comfy.NODE_CLASS_MAPPINGS["FlowOPDRenderGroundTruth"]
    grid = comfy.NODE_CLASS_MAPPINGS["FlowOPDImageGrid"]
    prompts = prompt_set("text", "test", 3, 0)
    with torch.inference_mode():
        (images,) = render().execute(unique_id="4", prompts=prompts, size=32, seed=0)["result"]
        inference_images = images.clone()  # as another ComfyUI node would hand it over
    assert inference_images.is_inference() and images.shape == (3, 32, 32, 3)
    with torch.inference_mode():
        first = grid().execute(unique_id="5", images=inference_images, prompts=prompts, filename="g.png")
        again = grid().execute(unique_id="5", images=inference_images, prompts=prompts, filename="g.png")
        other = grid().execute(unique_id="5", images=inference_images, prompts=prompts, filename="g.png", scale=2)
    assert first["result"] == again["result"] and first["result"] != other["result"]
    path = Path(first["result"][0])
    assert path.is_file() and path.parent.parent == fake_comfyui.output / "flowopd" / "5-FlowOPDImageGrid"
    assert first["ui"]["images"][0]["subfolder"] == path.parent.relative_to(fake_comfyui.output).as_posix()


def test_without_comfyui_the_adapter_writes_under_the_fallback_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWOPD_COMFY_OUTPUT", str(tmp_path))
    for name in ("comfy", "comfy.utils", "server", "folder_paths"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as without ComfyUI
    out = comfy.NODE_CLASS_MAPPINGS["FlowOPDSavePrompts"]().execute(prompts=prompt_set("text", "test", 2, 0))
    (path,) = out["result"]
    assert (
        Path(path).is_file()
        and Path(path).is_relative_to(tmp_path / "flowopd" / "FlowOPDSavePrompts-FlowOPDSavePrompts")
    )


def test_evaluator_reports_progress_and_stops_on_stop(fake_comfyui):
    node_cls = comfy.NODE_CLASS_MAPPINGS["FlowOPDEvaluator"]
    model = ModelRef(str(ROOT / "models" / "miniworld"), label="base")
    inputs = dict(prompts=prompt_set("quality", "test", 6, 0), model_1=model, steps=2, batch_size=2, metrics="task")
    fake_comfyui.stop_after = 2  # Stop pressed after the first batch of 2 images
    with torch.inference_mode(), pytest.raises(Interrupted):
        node_cls().execute(unique_id="7", **inputs)
    assert fake_comfyui.bars[0].total == 6 and fake_comfyui.bars[0].current == 2  # stopped between batches
    assert fake_comfyui.checks == 2  # the first batch's two denoising steps were checks too
    fake_comfyui.stop_after, fake_comfyui.checks = None, 0
    fake_comfyui.stop_at_check = 3  # Stop pressed during the second batch
    with torch.inference_mode(), pytest.raises(Interrupted):
        node_cls().execute(unique_id="7", **inputs)
    assert fake_comfyui.bars[-1].current == 2 and fake_comfyui.checks == 3  # after its first denoising step
    fake_comfyui.stop_at_check = None
    fake_comfyui.stop_after = None
    with torch.inference_mode():
        node_cls().execute(unique_id="7", **inputs)
    assert fake_comfyui.bars[-1].current == fake_comfyui.bars[-1].total == 6  # every image reported
