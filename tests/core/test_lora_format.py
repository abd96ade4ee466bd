"""LoRA files for ComfyUI and diffusers, from a peft adapter folder (tiny SD3 model).

The ComfyUI key names and the alpha rule are the ones ComfyUI 0.3.64's ``model_lora_keys_unet`` / ``load_lora``
map and apply for SD3-family models (checked against that code; docs/comfyui.md): written here as constants so
that this test needs no ComfyUI.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models import lora_format as lf
from flowopd_core.models.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSpec, Policy

RANK, ALPHA = 4, 12.0  # scale 3: a wrong alpha rule shows


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random (non-zero B) adapter on the tiny transformer, saved in peft's format; with its peft deltas."""
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    policy.add_adapter("student", LoraSpec(rank=RANK, alpha=ALPHA, init=False))
    folder = policy.save_adapter("student", tmp_path_factory.mktemp("adapter") / "adapter")
    layers = {name: m for name, m in policy.model.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "student" in m.lora_A}
    deltas = {name: layer.get_delta_weight("student").detach().clone() for name, layer in layers.items()}
    bases = {name: layer.base_layer.weight.detach().clone() for name, layer in layers.items()}
    return folder, deltas, bases


def test_read_peft_adapter_every_module_and_scale(adapter):
    folder, deltas, _ = adapter
    factors = lf.read_peft_adapter(folder)
    assert set(factors) == set(deltas) and len(factors) == 2 * 8 - 2  # 2 blocks x 8 targets; the
    # last block (context_pre_only) has no to_add_out, and its add_q_proj is a dead target
    assert "transformer_blocks.1.attn.add_q_proj" not in factors  # context_pre_only last block: dead target
    for module, f in factors.items():
        assert f.rank == RANK and f.scale == pytest.approx(ALPHA / RANK)
        torch.testing.assert_close(f.delta, deltas[module])  # scale * B @ A is exactly peft's delta


def test_comfyui_keys_alpha_and_patched_weight(adapter, tmp_path):
    folder, deltas, bases = adapter
    factors = lf.read_peft_adapter(folder)
    path = lf.save_comfyui_lora(factors, tmp_path / "student.safetensors", {"flowopd_base": "tiny"})
    tensors = load_file(str(path))
    # ComfyUI's spelling, written out (not derived): OneTrainer's lora_transformer_ prefix, kohya's suffixes.
    for name in ("to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            assert f"lora_transformer_transformer_blocks_0_attn_{name}{suffix}" in tensors
    assert len(tensors) == 3 * len(deltas)  # every adapter module, nothing else
    for module, delta in deltas.items():
        key = "lora_transformer_" + module.replace(".", "_")
        down, up, alpha = tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"], tensors[key + ".alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == pytest.approx(ALPHA)
        # comfy/weight_adapter/lora.py: W + strength * (alpha / rank) * up @ down, rank = down.shape[0]
        patched = bases[module] + float(alpha) / down.shape[0] * (up @ down)
        torch.testing.assert_close(patched, bases[module] + delta)
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["flowopd_lora_format"] == "comfyui" and header["flowopd_base"] == "tiny"
    assert header["ss_network_dim"] == str(RANK) and header["ss_network_alpha"] == "12"


def test_comfyui_round_trip(adapter):
    factors = lf.read_peft_adapter(adapter[0])
    back = lf.from_comfyui(lf.to_comfyui(factors), list(factors))
    assert set(back) == set(factors)
    for module, f in factors.items():
        torch.testing.assert_close(back[module].A, f.A)
        torch.testing.assert_close(back[module].B, f.B)
        assert back[module].scale == pytest.approx(f.scale)
    tensors = lf.to_comfyui(factors)
    tensors.pop(next(k for k in tensors if k.endswith(".alpha")))
    with pytest.raises(ValueError, match="missing"):
        lf.from_comfyui(tensors, list(factors))


def test_diffusers_file_loads_with_the_same_delta(adapter, tmp_path):
    folder, deltas, bases = adapter
    path = lf.save_diffusers_lora(lf.read_peft_adapter(folder), tmp_path / "student_diffusers.safetensors")
    keys = set(load_file(str(path)))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys and len(keys) == 2 * len(deltas)
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="student", use_safetensors=True)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    weights = dict(pipe.transformer.named_parameters())
    for module, delta in deltas.items():
        name = module + (".base_layer.weight" if module + ".base_layer.weight" in weights else ".weight")
        torch.testing.assert_close(weights[name].detach(), bases[module] + delta)


def test_alpha_pattern_rslora_and_refusals(adapter, tmp_path):
    folder = adapter[0]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))

    def variant(name, **changes):
        out = tmp_path / name
        out.mkdir()
        (out / ADAPTER_CONFIG).write_text(json.dumps({**config, **changes}))
        save_file(tensors, str(out / ADAPTER_WEIGHTS))
        return out

    factors = lf.read_peft_adapter(variant("pattern", alpha_pattern={"to_out.0": 2.0}))
    assert factors["transformer_blocks.0.attn.to_out.0"].scale == pytest.approx(2.0 / RANK)
    assert factors["transformer_blocks.0.attn.to_add_out"].scale == pytest.approx(ALPHA / RANK)
    assert lf.to_comfyui(factors)["lora_transformer_transformer_blocks_0_attn_to_out_0.alpha"] == pytest.approx(2.0)
    config_pattern = lf.diffusers_lora_config(factors)
    assert config_pattern["lora_alpha"] == ALPHA and len(config_pattern["alpha_pattern"]) == 2  # one per block
    rs = lf.read_peft_adapter(variant("rslora", use_rslora=True))
    assert rs["transformer_blocks.0.attn.to_q"].scale == pytest.approx(ALPHA / math.sqrt(RANK))
    with pytest.raises(ValueError, match="DoRA"):
        lf.read_peft_adapter(variant("dora", use_dora=True))
    extra = dict(tensors, **{"base_model.model.proj_out.bias": torch.zeros(3)})
    out = tmp_path / "extra"
    out.mkdir()
    (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(extra, str(out / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="unexpected tensor"):
        lf.read_peft_adapter(out)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lf.read_peft_adapter(tmp_path / "nowhere")
