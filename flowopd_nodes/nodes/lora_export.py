"""Save a trained adapter as a LoRA file for ComfyUI's LoraLoader and / or diffusers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowopd_core.choices import LORA_FILE_FORMATS
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import In, Node, Out

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef


class SaveLoRA(Node):
    NODE_ID = "FlowOPDSaveLoRA"
    DISPLAY_NAME = "Save LoRA"
    CATEGORY = "FlowOPD/output"
    DESCRIPTION = (
        "Writes the adapter a model carries (a trainer's, the distiller's or the cold start's output) as a LoRA "
        "file: 'comfyui' in the key layout ComfyUI's core LoraLoader applies to SD3 / SD3.5 (in ComfyUI it lands "
        "in models/loras), 'diffusers' as diffusers' SD3 LoRA file (pipe.load_lora_weights), or both. Headless "
        "both go to the node's own folder in the run directory."
    )
    OUTPUT_NODE = True
    INPUTS = (
        In("model", "FLOWOPD_MODEL", help="a model carrying an adapter (trainer, distiller or cold start output)"),
        In("filename", "STRING", "flowopd_lora.safetensors", "LoRA file name (in ComfyUI: under models/loras)",
           artifact=".safetensors"),
        In("format", "COMBO", "both", "comfyui = ComfyUI's LoraLoader layout, diffusers = diffusers' SD3 LoRA "
           "file (written to a 'diffusers' subfolder), both", choices=LORA_FILE_FORMATS),
    )
    OUTPUTS = (
        Out("lora", "FLOWOPD_FILE", "the ComfyUI LoRA file (the diffusers file with format = diffusers); in "
            "ComfyUI, the copy in models/loras"),
        Out("folder", "FLOWOPD_FILE", "the node's folder holding every file written"),
    )

    @classmethod
    def comfy_folder_outputs(cls, inputs: dict) -> dict[str, str]:
        """In ComfyUI the adapter (flowopd_nodes.comfy.plugin) copies the file of output ``lora`` into the first
        ``folder_paths`` folder of type "loras" when it is the ComfyUI file, and passes that path on."""
        return {"lora": "loras"} if inputs.get("format") != "diffusers" else {}

    def run(self, model: ModelRef, filename: str, format: str) -> tuple[str, str]:
        from flowopd_core.models.lora_format import export_adapter

        if not model.adapter:
            raise ValueError(
                f"model {model.name!r} carries no adapter: link the model output of a trainer, the distiller or "
                "the cold start (a loaded base model has nothing to save)"
            )
        out = context.current().artifact_dir
        metadata = {"flowopd_label": model.name, "flowopd_base": Path(model.path).name}
        written = export_adapter(model.adapter, out, filename, format, metadata)
        lora = written.get("comfyui") or written["diffusers"]
        return (str(lora), str(out))
