"""Wire types: what travels on a link, and how the runner caches it on disk.

Every output value is written to its node's cache entry as JSON (``encode``) and read back on a cache hit
(``decode``). Values are handles — small objects that point at files (prompt sets, image tensors in
safetensors, adapter folders) — so nothing large is serialised as Python objects and in-memory objects (models)
are rebuilt from their files by whoever needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowopd_core.prompts import PromptSet

if TYPE_CHECKING:
    import torch

    from flowopd_core.distill.trainer import TeacherRefs
    from flowopd_core.models.modelref import ModelRef

# torch, the model handles and the teacher pools are imported where a value is checked, encoded or decoded (a
# run), not with this module: validating a graph never needs them.


@dataclass(frozen=True)
class WireType:
    name: str
    help: str
    check: Callable[[Any], bool]
    encode: Callable[[Any, Path, str], Any]  # (value, entry_dir, output name) -> JSON-able
    decode: Callable[[Any, Path], Any]  # (JSON, entry_dir) -> value
    facts: Callable[[Any], dict[str, Any]] = lambda value: {}
    """What a value tells a downstream node's :meth:`~flowopd_nodes.engine.ports.Node.check_facts`: the facts a
    graph file's validation reads from the source's params (``output_facts``), read here from the value itself
    (ComfyUI, which runs a node's checks when its linked values exist)."""


def _plain(value: Any, entry: Path, name: str) -> Any:
    return value


def _plain_decode(data: Any, entry: Path) -> Any:
    return data


def _encode_image(value: torch.Tensor, entry: Path, name: str) -> dict[str, str]:
    from safetensors.torch import save_file

    file = f"{name}.safetensors"
    save_file({"images": value.detach().to("cpu").contiguous()}, str(entry / file))
    return {"file": file}


def _decode_image(data: dict[str, str], entry: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(entry / data["file"]))["images"]


def _encode_prompts(value: PromptSet, entry: Path, name: str) -> dict[str, Any]:
    return value.to_json()


def _decode_prompts(data: dict[str, Any], entry: Path) -> PromptSet:
    return PromptSet.from_json(data)


def _encode_path(value: str, entry: Path, name: str) -> str:
    """Paths inside the cache entry are stored relative to it, so a run directory can be moved; any other path
    is stored absolute (a relative one would be read back relative to the entry, not to the working folder)."""
    path = Path(value)
    try:
        return path.resolve().relative_to(entry.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _decode_path(data: str, entry: Path) -> str:
    path = Path(data)
    return str(path if path.is_absolute() else entry / path)


def _encode_model(value: ModelRef, entry: Path) -> dict[str, Any]:
    data = value.to_json()
    data["path"] = _encode_path(value.path, entry, "")
    if value.adapter:
        data["adapter"] = _encode_path(value.adapter, entry, "")
    if data.get("config"):
        data["config"] = _encode_path(value.config, entry, "")
    return data


def _decode_model(data: dict[str, Any], entry: Path) -> ModelRef:
    from flowopd_core.models.modelref import ModelRef

    adapter, config = data.get("adapter", ""), data.get("config", "")
    return ModelRef.from_json(
        {**data, "path": _decode_path(data["path"], entry), "adapter": _decode_path(adapter, entry) if adapter else "",
         **({"config": _decode_path(config, entry)} if config else {})}
    )


def _encode_teachers(value: TeacherRefs, entry: Path) -> dict[str, Any]:
    return {
        "teachers": [{"task": task, "model": _encode_model(ref, entry)} for task, ref in value.teachers],
        "route": value.route,
        "task_weights": value.task_weights,
    }


def _decode_teachers(data: dict[str, Any], entry: Path) -> TeacherRefs:
    from flowopd_core.distill.trainer import TeacherRefs

    teachers = tuple((item["task"], _decode_model(item["model"], entry)) for item in data["teachers"])
    return TeacherRefs(teachers, data["route"], data["task_weights"])


def _is_image(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[-1] == 3


def _is_model(value: Any) -> bool:
    from flowopd_core.models.modelref import ModelRef

    return isinstance(value, ModelRef)


def _is_teachers(value: Any) -> bool:
    from flowopd_core.distill.trainer import TeacherRefs

    return isinstance(value, TeacherRefs)


SETTINGS_TYPES = {
    "FLOWOPD_GRPO_SETTINGS": "the Flow-GRPO trainer's advanced settings (name -> value)",
    "FLOWOPD_DISTILL_SETTINGS": "the Flow-OPD distiller's advanced settings (name -> value)",
    "FLOWOPD_COLDSTART_SETTINGS": "the cold start's SFT settings (name -> value)",
    "FLOWOPD_PRETRAIN_SETTINGS": "the mini-world pretraining's architecture and optimiser settings (name -> value)",
    "FLOWOPD_EVAL_SETTINGS": "the Evaluator's advanced settings (name -> value)",
}
"""The values of settings nodes (:class:`~flowopd_nodes.engine.ports.SettingsNode`): plain JSON data."""


def _is_settings(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


WIRE_TYPES: dict[str, WireType] = {
    t.name: t
    for t in [
        WireType("INT", "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), _plain, _plain_decode),
        WireType(
            "FLOAT",
            "a number",
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            _plain,
            _plain_decode,
        ),
        WireType("STRING", "text", lambda v: isinstance(v, str), _plain, _plain_decode),
        WireType("BOOLEAN", "true/false", lambda v: isinstance(v, bool), _plain, _plain_decode),
        WireType(
            "IMAGE",
            "ComfyUI images: float tensor (B, H, W, 3) in [0, 1]",
            _is_image,
            _encode_image,
            _decode_image,
        ),
        WireType(
            "FLOWOPD_PROMPTS",
            "a prompt set: prompts with task tags and ground-truth specs",
            lambda v: isinstance(v, PromptSet),
            _encode_prompts,
            _decode_prompts,
            lambda v: {"tasks": tuple(v.tasks)},
        ),
        WireType(
            "FLOWOPD_MODEL",
            "a model handle: a local diffusers pipeline folder, dtype and device",
            _is_model,
            lambda v, entry, name: _encode_model(v, entry),
            lambda d, entry: _decode_model(d, entry),
            lambda v: {"label": v.name, "base": v.path},
        ),
        WireType(
            "FLOWOPD_TEACHERS",
            "a teacher pool: one LoRA teacher per task on one shared base, with its routing (hard/soft)",
            _is_teachers,
            lambda v, entry, name: _encode_teachers(v, entry),
            lambda d, entry: _decode_teachers(d, entry),
            lambda v: {"tasks": tuple(task for task, _ in v.teachers), "route": (v.route, dict(v.task_weights))},
        ),
        WireType(
            "FLOWOPD_FILE",
            "a path to a file or folder written by a node (report, grid, adapter)",
            lambda v: isinstance(v, str),
            _encode_path,
            _decode_path,
        ),
        *(WireType(name, help, _is_settings, _plain, _plain_decode) for name, help in SETTINGS_TYPES.items()),
    ]
}


def encode_outputs(types: tuple[str, ...], names: tuple[str, ...], values: tuple, entry: Path) -> list[Any]:
    return [WIRE_TYPES[t].encode(v, entry, n) for t, n, v in zip(types, names, values)]


def decode_outputs(types: tuple[str, ...], data: list[Any], entry: Path) -> tuple:
    return tuple(WIRE_TYPES[t].decode(d, entry) for t, d in zip(types, data))
