"""The ComfyUI adapter: the only module that touches ComfyUI (every ComfyUI import is guarded).

ComfyUI gets, for each registered node, a thin subclass (same id, ports, display name, category) whose
``FUNCTION`` wraps the node's ``run`` in what the runner's scheduler does for it:

- a :class:`~flowopd_nodes.engine.context.NodeContext`: artifacts go to ``<ComfyUI output>/flowopd/<node>/<key>/``
  (``key`` hashes the node type, its code version and its inputs, so the same node on the same inputs writes
  to the same place), resumable state to ``<ComfyUI output>/flowopd/checkpoints/<node>/<key>/`` (kept when the
  call fails or is stopped, removed once it succeeds: queueing the same graph again resumes a stopped run);
- progress through ``comfy.utils.ProgressBar``, which is also where ComfyUI's Stop (POST /interrupt) takes
  effect: a node stops at its next progress update (the Evaluator after its sampling batch, a trainer after
  its sampling batch or optimizer step), a trainer keeping its last completed epoch as a checkpoint and
  discarding the unfinished one;
- metrics as websocket events (``PromptServer.instance.send_sync("flowopd.metrics", ...)``);
- ``torch.inference_mode(False)`` + ``torch.enable_grad()`` around the call (ComfyUI runs graphs in inference
  mode; training nodes build the modules they train inside this block), and IMAGE inputs made by other nodes
  under inference mode are cloned into ordinary tensors first;
- every PNG a node writes at the top of its artifact folder is shown on the node (``{"ui": {"images": ...}}``).

``VALIDATE_INPUTS`` runs the runner's checks on each node's inputs when a prompt is queued (types, ranges,
choices, file names, paths, link types, the node's own cross-field and link checks); the node's own checks
run again as it starts, with the values of linked widgets. Relative paths typed on the canvas resolve
against the repository root.
Without ComfyUI (tests, the runner) everything here still works: no progress bar, no events, and artifacts
under ``$FLOWOPD_COMFY_OUTPUT`` (default ``<repo>/runs/comfy``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from flowopd_core.models.modelref import ModelRef
from flowopd_core.prompts import PromptSet
from flowopd_nodes.engine import context
from flowopd_nodes.engine.errors import GraphIssue
from flowopd_nodes.engine.graph import inside
from flowopd_nodes.engine.ports import REQUIRED, SETTINGS_INPUT, Node, SettingsNode, all_ports, merge_settings
from flowopd_nodes.engine.types import WIRE_TYPES
from flowopd_nodes.engine.validate import check_inputs, node_problems
from flowopd_nodes.nodes.registry import NODES

ROOT = Path(__file__).resolve().parents[2]  # the repository root: relative paths typed on the canvas start here
METRICS_EVENT = "flowopd.metrics"
MAX_PREVIEWS = 16
log = logging.getLogger("flowopd")


# --- the host: ComfyUI when it is there, inert stand-ins when it is not ------------------------------------


def output_root() -> Path:
    """``<ComfyUI output directory>/flowopd``; without ComfyUI ``$FLOWOPD_COMFY_OUTPUT`` or ``<repo>/runs/comfy``."""
    try:
        import folder_paths  # ComfyUI

        base = Path(folder_paths.get_output_directory())
    except ImportError:
        base = Path(os.environ.get("FLOWOPD_COMFY_OUTPUT", ROOT / "runs" / "comfy"))
    return base / "flowopd"


def _output_base() -> Path:
    return output_root().parent


# --- ComfyUI's model folders (folder_paths): LoadModel's dropdowns, SaveLoRA's models/loras ---------------------
# LoadModel's ``path`` and ``config`` (listed in the node's COMFY_MODEL_CHOICES) become COMBOs: the repository's
# own pipeline folders ("models/miniworld"), every diffusers folder under ComfyUI's "diffusers" folders
# ("diffusers/<name>": a folder with model_index.json) and, for ``path``, every SD3-family single file under
# "checkpoints" ("checkpoints/<file>"). Such a value is resolved to its real path before validation and before
# the node runs; any other value (a plain path from an exported workflow or a YAML graph) is taken as a path,
# relative to the repository root. ComfyUI checks a COMBO value against the list only for inputs its
# VALIDATE_INPUTS does not take; ours takes every widget, so a value not in the list reaches our own checks
# (path exists, pipeline folder or SD3 single file) instead of failing as value_not_in_list.

DIFFUSERS_PREFIX, CHECKPOINTS_PREFIX = "diffusers/", "checkpoints/"
_SD3_FILES: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime) -> is an SD3 single file (header read once)


def comfy_folders(kind: str) -> list[Path]:
    """ComfyUI's folders of type ``kind`` ("diffusers", "checkpoints", "loras"); none without ComfyUI."""
    try:
        import folder_paths  # ComfyUI

        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    except (ImportError, AttributeError, KeyError):
        return []


def _pipeline_folders(base: Path) -> list[str]:
    found = []
    if not base.is_dir():
        return found
    for folder, dirs, files in os.walk(base, followlinks=True):
        if "model_index.json" in files:
            found.append(Path(folder).relative_to(base).as_posix())
            dirs.clear()  # a pipeline's own subfolders are components
        dirs.sort()
    return found


def _is_sd3_file(path: Path) -> bool:
    from flowopd_core.models.files import is_sd3_single_file

    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SD3_FILES:
        _SD3_FILES[key] = is_sd3_single_file(path)
    return _SD3_FILES[key]


SHIPPED_BASE = "models/miniworld"  # the embedded default: first in LoadModel's dropdown, so a new node loads it


def model_choices(single_files: bool = True) -> list[str]:
    """The dropdown of LoadModel: repository pipeline folders (the shipped base first, then the others, e.g.
    ``models/binding``), ComfyUI's diffusers folders, SD3 single files."""
    repository = [f"models/{name}" for name in _pipeline_folders(ROOT / "models") if "/" not in name and name != "."]
    choices = sorted(repository, key=lambda choice: choice != SHIPPED_BASE)  # stable: the others stay sorted
    for base in comfy_folders("diffusers"):
        choices += [DIFFUSERS_PREFIX + name for name in _pipeline_folders(base) if name != "."]
    if single_files:
        for base in comfy_folders("checkpoints"):
            if base.is_dir():
                choices += [CHECKPOINTS_PREFIX + f.relative_to(base).as_posix()
                            for f in sorted(base.rglob("*.safetensors")) if _is_sd3_file(f)]
    return list(dict.fromkeys(choices))


def resolve_model_choice(value: Any) -> Any:
    """A dropdown entry ("diffusers/<name>", "checkpoints/<file>") -> its absolute path; anything else as is."""
    if not isinstance(value, str):
        return value
    for prefix, kind in ((DIFFUSERS_PREFIX, "diffusers"), (CHECKPOINTS_PREFIX, "checkpoints")):
        if value.startswith(prefix) and ".." not in Path(value[len(prefix):]).parts:
            for base in comfy_folders(kind):
                candidate = base / value[len(prefix):]
                if candidate.exists():
                    return str(candidate)
    return value


def _written_by_flowopd(path: Path) -> bool:
    from flowopd_core.models.files import safetensors_metadata

    try:
        return "flowopd_lora_format" in safetensors_metadata(path)
    except (OSError, ValueError):
        return False


def _choice_inputs(cls: type[Node]) -> dict[str, str]:
    return dict(getattr(cls, "COMFY_MODEL_CHOICES", {}))


def export_to_folders(cls: type[Node], inputs: dict[str, Any], values: tuple) -> tuple:
    """Copy the files of the outputs a node names in ``comfy_folder_outputs(inputs)`` into the first ComfyUI
    folder of that type (SaveLoRA: the ComfyUI LoRA file into models/loras) and pass the copy on. A file of the
    same name there is replaced only if FlowOPD wrote it (its header names the layout, ``flowopd_lora_format``);
    any other file is refused, never overwritten. Without ComfyUI nothing is copied."""
    wanted = cls.comfy_folder_outputs(inputs) if hasattr(cls, "comfy_folder_outputs") else {}
    if not wanted:
        return values
    names = [o.name for o in cls.OUTPUTS]
    out = list(values)
    for output, kind in wanted.items():
        folders = comfy_folders(kind)
        if not folders:
            continue
        source = Path(out[names.index(output)])
        target = folders[0] / source.name
        if target.exists() and not _written_by_flowopd(target):
            raise FileExistsError(f"{cls.NODE_ID}: {target} exists and was not written by FlowOPD: choose another "
                                  "filename (such a file is never overwritten)")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
        out[names.index(output)] = str(target)
        log.info("%s: %s copied to %s", cls.NODE_ID, source.name, target)
    return tuple(out)


class _ComfyProgress:
    """``comfy.utils.ProgressBar`` behind our Progress protocol; ``update`` raises ComfyUI's interrupt on Stop."""

    def __init__(self, bar: Any):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass


def _progress_factory(node_id: str):
    try:
        import comfy.utils  # ComfyUI
    except ImportError:
        return context._null_progress

    def make(total: int, desc: str) -> context.Progress:
        return _ComfyProgress(comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id))

    return make


def send_event(event: str, data: dict[str, Any]) -> None:
    """A custom websocket event to ComfyUI's clients (nothing without ComfyUI)."""
    try:
        from server import PromptServer  # ComfyUI
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


# --- fingerprints of a call's inputs (where its artifacts and checkpoints live) ----------------------------


def _fingerprint(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest = hashlib.sha256(str((tuple(data.shape), str(data.dtype))).encode())
        digest.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else data.float().numpy().tobytes())
        return {"tensor": digest.hexdigest()}
    if isinstance(value, (PromptSet, ModelRef)):
        return {type(value).__name__: value.to_json()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):  # a settings node's values
        return {"dict": {k: _fingerprint(v) for k, v in sorted(value.items())}}
    return {"object": type(value).__qualname__, "id": id(value)}  # unknown objects: never shared by mistake


def call_key(cls: type[Node], inputs: dict[str, Any]) -> str:
    """Hash of the node type, its code version and its inputs: one folder per distinct call."""
    payload = {
        "type": cls.NODE_ID,
        "code": cls.code_version(),
        "inputs": {k: _fingerprint(v) for k, v in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_name(node_id: str, cls: type[Node]) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", node_id)[:40] or "node"
    return f"{safe}-{cls.NODE_ID}"


# --- inputs as ComfyUI passes them -> inputs as run() expects them -----------------------------------------


def _resolve_path(value: str) -> str:
    path = Path(resolve_model_choice(value)).expanduser()
    return str(path if path.is_absolute() else ROOT / path)


def complete_inputs(cls: type[Node], given: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults of absent widgets, make paths absolute, clone IMAGE tensors made under inference mode."""
    values: dict[str, Any] = {}
    for port in cls.INPUTS:
        if port.name in given:
            value = given[port.name]
        elif port.is_widget and port.default is not REQUIRED:
            value = port.default
        else:
            continue  # an unconnected optional wire input: run() has its own default
        if port.path and isinstance(value, str) and value:
            value = _resolve_path(value)
        if port.type == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, torch.Tensor) and value.is_inference():
            with torch.inference_mode(False):
                value = value.clone()
        values[port.name] = value
    return values


def _previews(artifact_dir: Path) -> list[dict[str, str]]:
    """ComfyUI ``ui.images`` entries for the PNG files at the top of ``artifact_dir`` (type "output")."""
    base = _output_base().resolve()
    images = []
    for png in sorted(artifact_dir.glob("*.png"))[:MAX_PREVIEWS]:
        try:
            subfolder = png.parent.resolve().relative_to(base).as_posix()
        except ValueError:
            continue
        images.append({"filename": png.name, "subfolder": subfolder, "type": "output"})
    return images


def execute(node: Node, unique_id: str | None = None, **given: Any) -> dict[str, Any]:
    """Run one node the way ComfyUI calls it; returns ``{"ui": {...}, "result": (...)}``."""
    cls = type(node).RUNNER_CLASS
    node_id = str(unique_id) if unique_id is not None else cls.NODE_ID
    inputs = merge_settings(cls, complete_inputs(cls, given))  # a linked settings value spread over the inputs
    if issubclass(cls, SettingsNode):  # its values, passed on: no folders, nothing to show
        return {"ui": {}, "result": cls.run(node, **inputs)}
    problems = run_checks(cls, inputs)
    if problems:  # before any work or folder: what the runner reports at validation
        raise ValueError(f"{cls.NODE_ID} (node {node_id}): " + "; ".join(problems))
    key = call_key(cls, inputs)
    root = output_root()
    folder = _folder_name(node_id, cls)
    artifact_dir = inside(root, folder, key)
    checkpoint_dir = inside(root, "checkpoints", folder, key)
    if artifact_dir.exists():  # a previous call on the same inputs: start from an empty folder, as the runner does
        shutil.rmtree(artifact_dir)
    artifact_dir.mkdir(parents=True)

    def metrics(values: dict[str, Any]) -> None:
        log.info("node %s metrics %s", node_id, json.dumps(values, default=str))
        send_event(METRICS_EVENT, {"node": node_id, "class_type": cls.NODE_ID, "metrics": values})

    ctx = context.NodeContext(
        node_id=node_id,
        artifact_dir=artifact_dir,
        run_dir=root,
        progress=_progress_factory(node_id),
        metrics=metrics,
        log=log,
        checkpoint_dir=checkpoint_dir,
    )
    try:
        with context.use(ctx), torch.inference_mode(False), torch.enable_grad():
            values = cls.run(node, **inputs)
    except BaseException:
        shutil.rmtree(artifact_dir, ignore_errors=True)  # the checkpoint folder stays: queue again to resume
        raise
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if isinstance(values, dict) and "result" in values:
        values = values["result"]
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    values = export_to_folders(cls, inputs, values)
    ui: dict[str, Any] = {}
    images = _previews(artifact_dir)
    if images:
        ui["images"] = images
    return {"ui": ui, "result": values}


# --- validation ---------------------------------------------------------------------------------------------
# VALIDATE_INPUTS takes every widget input, the node's id and ``input_types`` (the types of the outputs linked to
# its inputs), so ComfyUI hands every value check to it (it then skips its own range, choice and link-type
# checks for them) and the checks are the runner's own (flowopd_nodes.engine.validate): types, ranges and
# choices, file names, paths (relative to the repository root), link types, the node's cross-field and link
# checks. ComfyUI shows VALIDATE_INPUTS only the node's own inputs: checks across nodes (soft-routing weights
# against the linked pool's tasks, an adapter against its base) run when the node is called (run_checks), on
# what the linked values tell. A widget fed by a link arrives as None.


def validation_issues(cls: type[Node], node_id: str, given: dict[str, Any],
                      input_types: dict[str, Any] | None = None) -> list[GraphIssue]:
    """What the runner's validation finds in one node's inputs as ComfyUI passes them to VALIDATE_INPUTS."""
    linked = {name: kind if isinstance(kind, str) else None for name, kind in (input_types or {}).items()}
    values = {name: value for name, value in given.items() if value is not None and name not in linked}
    params, issues = check_inputs(cls, node_id, values, linked, ROOT)
    issues = [i for i in issues if i.type != "required_input_missing"]  # ComfyUI reports those itself
    if cls.SETTINGS is not None and input_types is not None and SETTINGS_INPUT not in linked:
        # no settings node linked: its defaults apply (linked: its values arrive when the node starts)
        params = merge_settings(cls, params)
    if not issues:
        connected = frozenset(linked) if input_types is not None else None  # None: not told, link checks wait
        issues = [GraphIssue("custom_validation_failed", message, node=node_id, field=field, class_type=cls.NODE_ID)
                  for field, message in node_problems(cls, params, connected)]
    return issues


def run_checks(cls: type[Node], inputs: dict[str, Any]) -> list[str]:
    """The node's cross-field and link checks on the values of one call (as the runner runs them at validation),
    then its checks against what the linked values tell (:meth:`Node.check_facts`: the runner reads those facts
    from the upstream nodes' params, ComfyUI from the values that reach the node)."""
    params = {p.name: inputs.get(p.name) for p in all_ports(cls) if p.is_widget}  # settings spread (execute)
    wired = {p.name: p.type for p in cls.INPUTS if not p.is_widget and inputs.get(p.name) is not None}
    problems = node_problems(cls, params, frozenset(wired))
    if not problems:
        facts = {name: WIRE_TYPES[kind].facts(inputs[name])
                 if kind in WIRE_TYPES and WIRE_TYPES[kind].check(inputs[name]) else {} for name, kind in wired.items()}
        problems = cls.check_facts(params, facts)
    return [f"{field or 'node'}: {message}" for field, message in problems]


def _validate_inputs(cls: type[Node], unique_id: Any = None, input_types: Any = None, **given: Any) -> bool | str:
    runner_cls = cls.RUNNER_CLASS
    node_id = str(unique_id) if unique_id is not None else runner_cls.NODE_ID
    for name in _choice_inputs(runner_cls):
        if name in given:
            given[name] = resolve_model_choice(given[name])
    issues = validation_issues(runner_cls, node_id, given, input_types if isinstance(input_types, dict) else None)
    return True if not issues else "; ".join(str(issue) for issue in issues)


def _with_signature(func: Any, names: list[str]) -> Any:
    """``func`` advertising ``(cls, <names>)``: ComfyUI reads the signature to know which inputs it takes."""
    import inspect

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    func.__signature__ = inspect.Signature(
        [inspect.Parameter("cls", kind)] + [inspect.Parameter(n, kind, default=None) for n in names]
    )
    return func


def _is_changed(cls: type[Node], **given: Any) -> str:
    """Re-run a node whose path inputs changed on disk even though the path string did not."""
    from flowopd_nodes.engine.scheduler import path_fingerprint

    given.pop("unique_id", None)
    files = {
        p.name: path_fingerprint(_resolve_path(given[p.name]))
        for p in cls.RUNNER_CLASS.INPUTS
        if p.path and isinstance(given.get(p.name), str) and given[p.name]
    }
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


# --- the ComfyUI classes ------------------------------------------------------------------------------------


def _decimals(x: float) -> int:
    text = f"{x:.10f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def float_step(opts: dict[str, Any]) -> float:
    """A FLOAT widget's step for the canvas, fine enough to show the default and the bounds exactly.

    The frontend shows (and rounds what is typed to) as many decimals as the step has, 0.5 when none is
    given: a learning rate of 0.0003 would read 0.0. One decimal finer than the finest of default/min/max.
    """
    digits = max(_decimals(float(opts[k])) for k in ("default", "min", "max") if k in opts) if opts else 0
    return 10.0 ** -min(max(digits + 1, 2), 8)


def comfy_input_types(cls: type[Node]) -> dict[str, dict[str, tuple]]:
    """``cls.INPUT_TYPES()`` plus the hidden node id; INT widgets get ``control_after_generate: False`` (the
    frontend would otherwise add a "randomize after each run" control to every input named ``seed``)."""
    spec = {section: dict(entries) for section, entries in cls.INPUT_TYPES().items()}
    for section in ("required", "optional"):
        for name, (kind, opts) in list(spec.get(section, {}).items()):
            if kind == "INT":
                spec[section][name] = (kind, {**opts, "control_after_generate": False})
            elif kind == "FLOAT" and "step" not in opts:
                spec[section][name] = (kind, {**opts, "step": float_step(opts)})
    for name, kind in _choice_inputs(cls).items():
        section = "required" if name in spec.get("required", {}) else "optional"
        if name not in spec.get(section, {}):
            continue
        opts = dict(spec[section][name][1])
        choices = model_choices(single_files=kind == "models")
        if kind == "configs":
            choices = ["", *choices]
        default = opts.get("default")
        if default is not None and default not in choices:
            choices = [default, *choices]
        opts.pop("multiline", None)
        spec[section][name] = (choices, opts)
    spec["hidden"] = {"unique_id": "UNIQUE_ID"}
    return spec


def adapt(cls: type[Node]) -> type[Node]:
    """The ComfyUI class of a registered node (a subclass: same id, ports and metadata)."""
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": cls.__doc__,
        "__qualname__": f"Comfy{cls.__name__}",
        "RUNNER_CLASS": cls,
        "FUNCTION": "execute",
        "INPUT_TYPES": classmethod(lambda c: comfy_input_types(cls)),
        "execute": execute,
    }
    widgets = [p.name for p in cls.INPUTS if p.is_widget]
    validate = _with_signature(lambda c, **given: _validate_inputs(c, **given), ["unique_id", "input_types", *widgets])
    attrs["VALIDATE_INPUTS"] = classmethod(validate)
    if any(p.path for p in cls.INPUTS):
        attrs["IS_CHANGED"] = classmethod(_is_changed)
    return type(f"Comfy{cls.__name__}", (cls,), attrs)


COMFY_NODES: list[type[Node]] = [adapt(cls) for cls in NODES]
NODE_CLASS_MAPPINGS: dict[str, type[Node]] = {cls.NODE_ID: cls for cls in COMFY_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.NODE_ID: cls.DISPLAY_NAME or cls.NODE_ID for cls in COMFY_NODES}
