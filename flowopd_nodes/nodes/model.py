"""Model nodes: load a local pipeline folder, sample images from it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flowopd_core.choices import DEVICES, DTYPE_NAMES, MAX_T5_LENGTH, SAMPLER_KINDS
from flowopd_core.prompts import PromptSet
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import In, Node, Out

if TYPE_CHECKING:
    from flowopd_core.models.modelref import ModelRef


class LoadModel(Node):
    NODE_ID = "FlowOPDLoadModel"
    DISPLAY_NAME = "Load model"
    CATEGORY = "FlowOPD/model"
    DESCRIPTION = (
        "A local diffusers StableDiffusion3Pipeline folder (the shipped mini-world, SD3 or SD3.5), or a single-file "
        "SD3 / SD3.5 checkpoint (.safetensors) loaded against a local diffusers folder of the same architecture "
        "('config'). Passed on as a handle; the weights load where they are used. Never downloads anything. In "
        "ComfyUI, 'path' lists ComfyUI's diffusers folders and SD3-family checkpoints."
    )
    INPUTS = (
        In("path", "STRING", help="pipeline folder (with model_index.json) or single-file SD3 / SD3.5 checkpoint "
           "(.safetensors), relative to the graph file", path=True, must_exist=True, folder=None),
        In("dtype", "COMBO", "float32", "weights dtype (step arithmetic stays float32)", choices=DTYPE_NAMES),
        In("device", "COMBO", "auto", "auto = cuda when available, else cpu", choices=DEVICES),
        In("label", "STRING", "base", "name shown in reports"),
        In("max_sequence_length", "INT", 0, "T5 text tokens per prompt; 0 = 128 (Flow-GRPO's and the authors' "
           "length), or the tokenizer's shorter limit", min=0, max=MAX_T5_LENGTH),
        In("config", "STRING", "", "single-file checkpoints only: a local diffusers folder of the same "
           "architecture (its configs, and the text encoders, tokenizers and scheduler the file lacks)",
           path=True, folder=True),
    )
    OUTPUTS = (Out("model", "FLOWOPD_MODEL", "the model handle"),)
    COMFY_MODEL_CHOICES = {"path": "models", "config": "configs"}
    """In ComfyUI (flowopd_nodes.comfy.plugin) these inputs become dropdowns of ComfyUI's model folders:
    ``path`` every diffusers folder and SD3-family checkpoint, ``config`` every diffusers folder (or none)."""

    @classmethod
    def check_params(cls, params: dict) -> list[tuple[str, str]]:
        # Checked before anything runs, without loading weights (loading here would keep a second copy in
        # memory next to the fresh one a training node loads). Reads at most a safetensors header.
        from flowopd_core.models.files import SD3_SINGLE_FILE_MARKER, is_sd3_single_file

        path, config = Path(params["path"]), params.get("config", "")
        problems = []
        if path.is_dir() and not (path / "model_index.json").is_file():  # a missing path: file_not_found
            problems.append(("path", f"{params['path']!r} is not a diffusers pipeline folder (no model_index.json)"))
        if path.is_dir() and config:
            problems.append(("config", "a config is only for a single-file checkpoint; 'path' is a pipeline folder "
                             "(leave config empty)"))
        if path.is_file():
            if not is_sd3_single_file(path):
                problems.append(("path", f"{params['path']!r} is not an SD3 / SD3.5 single-file checkpoint "
                                 f"(.safetensors holding {SD3_SINGLE_FILE_MARKER!r})"))
            elif not config:
                problems.append(("config", "a single-file checkpoint needs a config: a local diffusers folder of "
                                 "the same architecture (e.g. the SD3.5-Medium diffusers folder); nothing is "
                                 "downloaded"))
        if config and Path(config).is_dir() and not (Path(config) / "model_index.json").is_file():
            problems.append(("config", f"{config!r} is not a diffusers pipeline folder (no model_index.json)"))
        if config and not Path(config).exists():
            problems.append(("config", f"{config!r} does not exist"))
        return problems

    @classmethod
    def output_facts(cls, params: dict, inputs: dict) -> dict:
        facts = super().output_facts(params, inputs)
        if isinstance(params.get("path"), str) and Path(params["path"]).exists():
            facts.setdefault("model", {})["base"] = params["path"]  # an adapter loader checks its stamp against it
        return facts

    def run(self, path: str, dtype: str, device: str, label: str, max_sequence_length: int,
            config: str = "") -> tuple[ModelRef]:
        from flowopd_core.models.modelref import ModelRef

        return (ModelRef(path, dtype, device, label=label, max_sequence_length=max_sequence_length,
                         config=config if Path(path).is_file() else ""),)


class Sample(Node):
    NODE_ID = "FlowOPDSample"
    DISPLAY_NAME = "Sample images"
    CATEGORY = "FlowOPD/model"
    DESCRIPTION = "Samples images for a prompt set (ODE, Flow-GRPO SDE or CPS), with batched classifier-free guidance."
    INPUTS = (
        In("model", "FLOWOPD_MODEL", help="the model to sample"),
        In("prompts", "FLOWOPD_PROMPTS", help="prompts; each gets images_per_prompt images"),
        In("steps", "INT", 20, "sampling steps", min=1, max=1000),
        In("guidance_scale", "FLOAT", 4.5, "classifier-free guidance w (1 = off)", min=0.0, max=50.0, step=0.1),
        In("sampler", "COMBO", "ode", "ode = deterministic; sde / cps = stochastic (docs/method.md §1)",
           choices=SAMPLER_KINDS),
        In("noise_level", "FLOAT", 0.7, "SDE noise level a", min=0.0, max=2.0, step=0.05),
        In("images_per_prompt", "INT", 1, "images per prompt", min=1, max=256),
        In("seed", "INT", 0, "seed of the noise", min=0, max=2**31 - 1),
        In("batch_size", "INT", 32, "images per transformer batch", min=1, max=4096),
    )
    OUTPUTS = (
        Out("images", "IMAGE", "the images, prompt-major"),
        Out("prompts", "FLOWOPD_PROMPTS", "one prompt per image, aligned with images (for captions and rewards)"),
    )

    def run(
        self,
        model: ModelRef,
        prompts: PromptSet,
        steps: int,
        guidance_scale: float,
        sampler: str,
        noise_level: float,
        images_per_prompt: int,
        seed: int,
        batch_size: int,
    ) -> tuple:
        from flowopd_core.eval.evaluate import targets_from_refs
        from flowopd_core.images import to_comfy
        from flowopd_core.sampling.generate import SampleConfig, generate

        config = SampleConfig(steps, guidance_scale, sampler, noise_level, batch_size, seed)
        expanded = PromptSet(tuple(p for p in prompts for _ in range(images_per_prompt)), name=prompts.name)
        (target,) = targets_from_refs([model])  # the base, or base + the model's adapter (never a copy)
        names = [target.adapter] * len(expanded) if target.adapter else None
        bar = context.current().progress(len(expanded), "sample")
        try:
            rollout = generate(
                target.pipeline, expanded.texts, config, transformer=target.transformer, adapter_names=names,
                progress=bar.update, keep_latents=False,
                step_progress=lambda j, steps: bar.update(0),  # ComfyUI's Stop takes effect within a step
            )
        finally:
            bar.close()
        return (to_comfy(rollout.images), expanded)
