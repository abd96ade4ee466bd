"""Adapter nodes: put a saved LoRA adapter (a teacher or student trained earlier, e.g. the shipped teachers in
``models/teachers/``) on a base model, so a graph can start from adapters as the paper's stage 2 does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowopd_nodes.engine.ports import In, Node, Out

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef

# the two files of a peft LoRA folder (flowopd_core.models.policy writes them; named here without importing torch)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_folder_problem(path: Path) -> str | None:
    """Why ``path`` (an existing folder) is not a peft LoRA adapter folder, or None."""
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        return f"{str(path)!r} is not a LoRA adapter folder ({', '.join(missing)} missing)"
    try:
        config = json.loads((path / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{ADAPTER_FILES[0]} in {str(path)!r} is not readable JSON ({exc})"
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        return f"{ADAPTER_FILES[0]} in {str(path)!r} does not describe a LoRA adapter (peft_type LORA)"
    return None


class LoadAdapter(Node):
    NODE_ID = "FlowOPDLoadAdapter"
    DISPLAY_NAME = "Load LoRA adapter"
    CATEGORY = "FlowOPD/model"
    DESCRIPTION = (
        "A saved LoRA adapter folder (peft format: what every trainer writes to nodes/<node>/adapter) on the "
        "linked base model: a teacher for the teacher pool, or a student to evaluate. The adapter must have been "
        "trained on the same base: an adapter flowopd saved names its base's weights (flowopd_base.json), and "
        "one trained on other weights is refused; one without that file (another tool's) is checked by shape only."
    )
    INPUTS = (
        In("model", "FLOWOPD_MODEL", help="the base model the adapter was trained on (its own adapter is replaced)"),
        In("adapter", "STRING", help="adapter folder (adapter_config.json + adapter_model.safetensors), relative "
           "to the graph file", path=True, must_exist=True, folder=True),
        In("label", "STRING", "", "name shown in reports (empty: the adapter folder's name)"),
    )
    OUTPUTS = (Out("model", "FLOWOPD_MODEL", "the base with the adapter"),)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        path = Path(params["adapter"])
        if not path.is_dir():
            return []  # missing: the engine's file check names it
        problem = adapter_folder_problem(path)
        return [("adapter", problem)] if problem else []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        label = params.get("label")
        if label == "" and isinstance(params.get("adapter"), str):
            label = Path(params["adapter"]).name  # the name ModelRef gives it
        facts = {"label": label} if isinstance(label, str) and label else {}
        if "base" in inputs.get("model", {}):
            facts["base"] = inputs["model"]["base"]  # the same base, another adapter
        return {"model": facts} if facts else {}

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        from flowopd_core.models.base_stamp import base_mismatch

        base, adapter = inputs.get("model", {}).get("base"), params.get("adapter")
        if not isinstance(base, str) or not isinstance(adapter, str) or adapter_folder_problem(Path(adapter)):
            return []  # the base is linked from a node that does not tell it, or the folder is refused already
        problem = base_mismatch(adapter, base)
        return [("adapter", problem)] if problem else []

    def run(self, model: ModelRef, adapter: str, label: str) -> tuple[ModelRef]:
        from flowopd_core.models.base_stamp import base_mismatch

        problem = base_mismatch(adapter, model.path)  # ComfyUI, and bases that validation could not see
        if problem:
            raise ValueError(problem)
        return (model.with_adapter(adapter, label),)
