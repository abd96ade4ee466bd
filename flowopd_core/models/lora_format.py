"""LoRA files for other tools: a flowopd adapter folder (peft's format) as a ComfyUI or a diffusers LoRA file.

Trainers, the cold start and the distiller keep their adapter as a peft folder (``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, and ``adapter_config.json`` with
``r`` and ``lora_alpha``); the adapter adds ``scale * B @ A`` to each target weight, ``scale = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with rsLoRA). ``<module>`` is a diffusers ``SD3Transformer2DModel`` module name, e.g.
``transformer_blocks.0.attn.to_q``.

**ComfyUI** (:func:`to_comfyui`, :func:`save_comfyui_lora`). ComfyUI's core ``LoraLoader`` (``comfy/lora.py``,
``model_lora_keys_unet``) maps, for an SD3-family model (``comfy.model_base.SD3``: SD3 and SD3.5), every
diffusers transformer weight name ``<module>.weight`` of ``comfy.utils.mmdit_to_diffusers`` to ComfyUI's own
MMDiT weight under several key spellings; we write OneTrainer's (:data:`COMFY_PREFIX`):

    lora_transformer_<module with "." -> "_">.lora_down.weight   A (r, in)
    lora_transformer_<module with "." -> "_">.lora_up.weight     B (out, r)
    lora_transformer_<module with "." -> "_">.alpha              0-d float32 tensor

``comfy/weight_adapter/lora.py`` applies ``W + strength * (alpha / rank) * up @ down`` with ``rank =
down.shape[0]``, so ``alpha`` is written as ``scale * r``: at strength 1 ComfyUI adds exactly peft's delta.
``to_q`` / ``to_k`` / ``to_v`` (and ``add_*_proj``, ``attn2.*``) land on row slices of ComfyUI's fused ``qkv``
weights; ``to_out.0`` / ``to_add_out`` on ``attn.proj`` / ``context_block.attn.proj``. Checked against
ComfyUI 0.3.64's own ``model_lora_keys_unet`` + ``load_lora`` for the mini-world and an SD3.5-Medium-shaped
model: every key is consumed and the patched weights equal the peft-merged ones (docs/comfyui.md).

**diffusers** (:func:`save_diffusers_lora`): diffusers' own SD3 LoRA file (``StableDiffusion3Pipeline
.save_lora_weights``: keys ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``, rank and alpha in the
``lora_adapter_metadata`` header), which ``pipe.load_lora_weights(folder, weight_name=...)`` loads with the same
scale.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowopd_core.choices import LORA_FILE_FORMATS
from flowopd_core.models.merge import LoraFactors
from flowopd_core.models.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS

PEFT_PREFIX = "base_model.model."
"""Prefix of every key of a peft adapter file saved from a ``PeftModel`` around the transformer."""
COMFY_PREFIX = "lora_transformer_"
"""The ComfyUI key spelling written (``model_lora_keys_unet``, SD3 branch: "OneTrainer lora")."""
COMFY_DOWN, COMFY_UP, COMFY_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
DIFFUSERS_PREFIX = "transformer."
"""diffusers' SD3 LoRA files prefix transformer keys with the component name."""
FORMAT_KEY = "flowopd_lora_format"
"""Header entry naming the layout of a file written here (``comfyui`` or ``diffusers``)."""

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


# ----------------------------------------------------------------------------------------------------------
# Reading a peft adapter folder
# ----------------------------------------------------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


def read_peft_adapter(directory: str | Path) -> dict[str, LoraFactors]:
    """A peft LoRA adapter folder as ``module name -> LoraFactors`` (``scale`` as peft applies it).

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` for what has no LoRA file form here
    (DoRA, trained biases or other extra tensors, a module with only one factor).
    """
    directory = Path(directory)
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"no LoRA adapter at {str(directory)!r}: {required} is missing")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type {config.get('peft_type')!r} is not a LoRA")
    if config.get("use_dora"):
        raise ValueError(f"{directory}: DoRA adapters have no plain LoRA file form")
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"{directory}: unexpected tensor {key!r} (only LoRA A / B weights can be exported)")
        parts.setdefault(match["module"], {})[match["ab"]] = value
    if not parts:
        raise ValueError(f"{directory}: the adapter holds no LoRA weights")
    factors = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{directory}: module {module!r} has only lora_{''.join(ab)}")
        rank = ab["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[module] = LoraFactors(A=ab["A"], B=ab["B"], scale=scale)
    return factors


# ----------------------------------------------------------------------------------------------------------
# ComfyUI
# ----------------------------------------------------------------------------------------------------------


def comfy_key(module: str) -> str:
    """The ComfyUI LoRA key prefix of a diffusers transformer module (``transformer_blocks.0.attn.to_q`` ->
    ``lora_transformer_transformer_blocks_0_attn_to_q``)."""
    return COMFY_PREFIX + module.replace(".", "_")


def to_comfyui(factors: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """``module -> LoraFactors`` as ComfyUI's LoRA tensors: ``down`` = A, ``up`` = B, ``alpha`` = scale * r."""
    out: dict[str, torch.Tensor] = {}
    for module, f in factors.items():
        key = comfy_key(module)
        if key + COMFY_DOWN in out:
            raise ValueError(f"two modules give the ComfyUI key {key!r}")
        out[key + COMFY_DOWN] = f.A.detach().contiguous()
        out[key + COMFY_UP] = f.B.detach().contiguous()
        out[key + COMFY_ALPHA] = torch.tensor(f.scale * f.rank, dtype=torch.float32)
    return out


def from_comfyui(tensors: Mapping[str, torch.Tensor], modules: list[str] | tuple[str, ...]) -> dict[str, LoraFactors]:
    """The inverse of :func:`to_comfyui` for the diffusers module names ``modules`` (underscores make the flat
    key ambiguous, so the names are given). Raises on a missing or an unknown key."""
    by_key = {comfy_key(m): m for m in modules}
    known = {k + s for k in by_key for s in (COMFY_DOWN, COMFY_UP, COMFY_ALPHA)}
    extra = sorted(set(tensors) - known)
    if extra:
        raise ValueError(f"keys of no given module: {extra[:3]}")
    factors = {}
    for key, module in by_key.items():
        try:
            down, up, alpha = (tensors[key + s] for s in (COMFY_DOWN, COMFY_UP, COMFY_ALPHA))
        except KeyError as exc:
            raise ValueError(f"module {module!r}: missing {exc.args[0]!r}") from None
        factors[module] = LoraFactors(A=down, B=up, scale=float(alpha) / down.shape[0])
    return factors


def _header(factors: Mapping[str, LoraFactors], layout: str, extra: Mapping[str, str]) -> dict[str, str]:
    ranks = sorted({f.rank for f in factors.values()})
    header = {"format": "pt", FORMAT_KEY: layout, "flowopd_modules": str(len(factors)),
              "ss_network_dim": ",".join(map(str, ranks))}
    alphas = sorted({round(f.scale * f.rank, 6) for f in factors.values()})
    header["ss_network_alpha"] = ",".join(f"{a:g}" for a in alphas)
    header.update({str(k): str(v) for k, v in extra.items()})
    return header


def save_comfyui_lora(factors: Mapping[str, LoraFactors], path: str | Path,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``factors`` as a ComfyUI LoRA ``.safetensors`` file (header: layout, ranks, alphas, ``metadata``)."""
    path = Path(path)
    save_file(to_comfyui(factors), str(path), metadata=_header(factors, "comfyui", metadata or {}))
    return path


# ----------------------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------------------


def diffusers_lora_config(factors: Mapping[str, LoraFactors]) -> dict:
    """The peft ``LoraConfig`` fields diffusers reads from a LoRA file's header: the most common rank and alpha,
    and exact-name patterns for modules that differ."""
    def common(values: list[float]) -> float:
        return max(set(values), key=values.count)

    ranks = {m: f.rank for m, f in factors.items()}
    alphas = {m: f.scale * f.rank for m, f in factors.items()}
    r, alpha = common(list(ranks.values())), common(list(alphas.values()))
    return {
        "r": int(r),
        "lora_alpha": float(alpha),
        "target_modules": sorted(factors),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def to_diffusers(factors: Mapping[str, LoraFactors]) -> dict[str, torch.Tensor]:
    """``module -> LoraFactors`` as the transformer layers of a diffusers SD3 LoRA (without the ``transformer.``
    prefix, which diffusers' ``save_lora_weights`` adds)."""
    out = {}
    for module, f in factors.items():
        out[f"{module}.lora_A.weight"] = f.A.detach().contiguous()
        out[f"{module}.lora_B.weight"] = f.B.detach().contiguous()
    return out


def save_diffusers_lora(factors: Mapping[str, LoraFactors], path: str | Path) -> Path:
    """Write ``factors`` as diffusers' SD3 LoRA file ``path`` (load it with ``pipe.load_lora_weights(path.parent,
    weight_name=path.name)``); rank and alpha travel in the header diffusers reads."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    StableDiffusion3Pipeline.save_lora_weights(
        path.parent, transformer_lora_layers=to_diffusers(factors), weight_name=path.name,
        transformer_lora_adapter_metadata=diffusers_lora_config(factors), safe_serialization=True,  # safetensors
    )
    return path


# ----------------------------------------------------------------------------------------------------------
# One call for a saver
# ----------------------------------------------------------------------------------------------------------

DIFFUSERS_SUBFOLDER = "diffusers"
"""The diffusers file goes to ``<out>/diffusers/<filename>`` (``pipe.load_lora_weights(<out>/diffusers,
weight_name=<filename>)``), so that both layouts can keep the one file name."""


def export_adapter(adapter_dir: str | Path, out_dir: str | Path, filename: str, file_format: str,
                   metadata: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write the peft adapter ``adapter_dir`` as LoRA file(s) named ``filename`` under ``out_dir``.

    ``file_format``: one of :data:`LORA_FILE_FORMATS`. Returns ``{"comfyui": path, "diffusers": path}`` for the
    files written. ``metadata`` goes into the safetensors header of each file.
    """
    if file_format not in LORA_FILE_FORMATS:
        raise ValueError(f"file_format must be one of {LORA_FILE_FORMATS}, got {file_format!r}")
    if Path(filename).name != filename or not filename.endswith(".safetensors"):
        raise ValueError(f"filename must be a plain .safetensors file name, got {filename!r}")
    factors = read_peft_adapter(adapter_dir)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if file_format in ("comfyui", "both"):
        written["comfyui"] = save_comfyui_lora(factors, out_dir / filename, metadata)
    if file_format in ("diffusers", "both"):
        (out_dir / DIFFUSERS_SUBFOLDER).mkdir(parents=True, exist_ok=True)
        written["diffusers"] = save_diffusers_lora(factors, out_dir / DIFFUSERS_SUBFOLDER / filename)
    return written
