"""Single-file SD3-family checkpoints: loaded with diffusers' from_single_file against a local config folder.

The fixture turns the shipped mini-world pipeline into an original-layout single file (Stability's MMDiT keys
under ``model.diffusion_model.``, text encoders under ``text_encoders.*`` as SD3's files hold them); the layout
is the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``, written out here by hand, so a
mis-mapped key on either side makes the weights differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.pipeline import is_sd3_single_file, load_pipeline

MINIWORLD = Path(__file__).resolve().parents[2] / "models" / "miniworld"


def _swap(w: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift`` (its own inverse): (shift, scale) <-> (scale, shift)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def original_layout(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict in the original MMDiT layout (no prefix)."""
    sd = dict(sd)
    out = {
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
        "t_embedder.mlp.0.weight": sd.pop("time_text_embed.timestep_embedder.linear_1.weight"),
        "t_embedder.mlp.0.bias": sd.pop("time_text_embed.timestep_embedder.linear_1.bias"),
        "t_embedder.mlp.2.weight": sd.pop("time_text_embed.timestep_embedder.linear_2.weight"),
        "t_embedder.mlp.2.bias": sd.pop("time_text_embed.timestep_embedder.linear_2.bias"),
        "y_embedder.mlp.0.weight": sd.pop("time_text_embed.text_embedder.linear_1.weight"),
        "y_embedder.mlp.0.bias": sd.pop("time_text_embed.text_embedder.linear_1.bias"),
        "y_embedder.mlp.2.weight": sd.pop("time_text_embed.text_embedder.linear_2.weight"),
        "y_embedder.mlp.2.bias": sd.pop("time_text_embed.text_embedder.linear_2.bias"),
        "context_embedder.weight": sd.pop("context_embedder.weight"),
        "context_embedder.bias": sd.pop("context_embedder.bias"),
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
        "final_layer.linear.bias": sd.pop("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap(sd.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap(sd.pop("norm_out.linear.bias")),
    }
    if "pos_embed.pos_embed" in sd:
        out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        for end in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{end}"] = torch.cat([sd.pop(f"{d}attn.to_{c}.{end}") for c in "qkv"])
            out[f"{o}context_block.attn.qkv.{end}"] = torch.cat([sd.pop(f"{d}attn.add_{c}_proj.{end}") for c in "qkv"])
            out[f"{o}x_block.attn.proj.{end}"] = sd.pop(f"{d}attn.to_out.0.{end}")
            out[f"{o}x_block.adaLN_modulation.1.{end}"] = sd.pop(f"{d}norm1.linear.{end}")
            ctx_mod = sd.pop(f"{d}norm1_context.linear.{end}")
            out[f"{o}context_block.adaLN_modulation.1.{end}"] = _swap(ctx_mod) if last else ctx_mod
            out[f"{o}x_block.mlp.fc1.{end}"] = sd.pop(f"{d}ff.net.0.proj.{end}")
            out[f"{o}x_block.mlp.fc2.{end}"] = sd.pop(f"{d}ff.net.2.{end}")
            if f"{d}attn2.to_q.{end}" in sd:  # SD3.5's dual attention (x_block self-attention)
                out[f"{o}x_block.attn2.qkv.{end}"] = torch.cat([sd.pop(f"{d}attn2.to_{c}.{end}") for c in "qkv"])
                out[f"{o}x_block.attn2.proj.{end}"] = sd.pop(f"{d}attn2.to_out.0.{end}")
            if not last:
                out[f"{o}context_block.attn.proj.{end}"] = sd.pop(f"{d}attn.to_add_out.{end}")
                out[f"{o}context_block.mlp.fc1.{end}"] = sd.pop(f"{d}ff_context.net.0.proj.{end}")
                out[f"{o}context_block.mlp.fc2.{end}"] = sd.pop(f"{d}ff_context.net.2.{end}")
        for name, (block, attn, which) in {"norm_q": ("x_block", "attn", "ln_q"), "norm_k": ("x_block", "attn", "ln_k"),
                                           "norm_added_q": ("context_block", "attn", "ln_q"),
                                           "norm_added_k": ("context_block", "attn", "ln_k")}.items():
            if f"{d}attn.{name}.weight" in sd:  # SD3.5's RMS qk-norm
                out[f"{o}{block}.{attn}.{which}.weight"] = sd.pop(f"{d}attn.{name}.weight")
        for name in ("norm_q", "norm_k"):
            if f"{d}attn2.{name}.weight" in sd:
                out[f"{o}x_block.attn2.ln_{name[-1]}.weight"] = sd.pop(f"{d}attn2.{name}.weight")
    assert not sd, f"keys the fixture does not map: {sorted(sd)[:5]}"
    return out


def write_single_file(path: Path, text_encoders: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The mini-world as one original-layout file; returns the source weights per component."""
    import json

    source = {"transformer": load_file(str(MINIWORLD / "transformer" / "diffusion_pytorch_model.safetensors"))}
    layers = json.loads((MINIWORLD / "transformer" / "config.json").read_text())["num_layers"]
    tensors = {f"model.diffusion_model.{k}": v for k, v in original_layout(source["transformer"], layers).items()}
    if text_encoders:
        # T5 only: the mini-world's two CLIPs have the same width, and diffusers tells SD3's CLIP-L (768) from
        # CLIP-G (1280) by width, so CLIP weights in this file would all be read as CLIP-L. (diffusers also sets
        # a single file's CLIP-L text projection to the identity.) The CLIPs come from the config folder.
        for component, prefix in (("text_encoder_3", "t5xxl"),):
            source[component] = load_file(str(MINIWORLD / component / "model.safetensors"))
            tensors.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in source[component].items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return source


def _assert_same(module: torch.nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    state = module.state_dict()
    for key, value in source.items():
        if key not in state:  # tied or derived entries transformers drops on load (e.g. T5's encoder.embed_tokens)
            continue
        assert torch.equal(state[key], value), f"{what}: {key} differs from the source"
    checked = sum(1 for k in source if k in state)
    assert checked >= 0.9 * len(source), f"{what}: only {checked} of {len(source)} source weights found"


@pytest.mark.parametrize("text_encoders", [True, False], ids=["with-text-encoders", "transformer-only"])
def test_single_file_loads_the_same_weights(tmp_path, text_encoders):
    path = tmp_path / "miniworld_single.safetensors"
    source = write_single_file(path, text_encoders)
    assert is_sd3_single_file(path) and not is_sd3_single_file(MINIWORLD / "transformer" /
                                                                "diffusion_pytorch_model.safetensors")
    pipe = load_pipeline(path, config=MINIWORLD)
    _assert_same(pipe.transformer, source["transformer"], "transformer")
    assert set(pipe.transformer.state_dict()) == set(source["transformer"])
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        # from the file when it holds them, else from the config folder: the same weights either way here
        expected = source.get(component) or load_file(str(MINIWORLD / component / "model.safetensors"))
        _assert_same(getattr(pipe, component), expected, component)
    assert pipe.vae is None and pipe.vae_scale_factor == 1  # the mini-world is pixel space


def test_single_file_is_refused_without_a_config_or_with_a_wrong_file(tmp_path):
    path = tmp_path / "m.safetensors"
    write_single_file(path, text_encoders=False)
    with pytest.raises(FileNotFoundError, match="config"):
        load_pipeline(path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(path, config=tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an SD3"):
        load_pipeline(other, config=MINIWORLD)


def test_model_ref_carries_the_config(tmp_path):
    path = tmp_path / "m.safetensors"
    write_single_file(path, text_encoders=False)
    ref = ModelRef(str(path), config=str(MINIWORLD))
    assert ModelRef.from_json(ref.to_json()) == ref
    assert ref.base_key != ModelRef(str(path)).base_key
    assert ref.load().transformer.config.num_layers == 4


def test_sd35_layout_with_qk_norm_and_dual_attention(tmp_path):
    """An SD3.5-Medium-like transformer (RMS qk-norm, x_block self-attention 'attn2' in block 0), transformer only:
    the text encoders, tokenizers and scheduler come from the config folder."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_()  # no two weights alike: a swapped or misplaced key shows
    config = tmp_path / "config"
    config.mkdir()
    for entry in MINIWORLD.iterdir():
        if entry.name != "transformer":
            (config / entry.name).symlink_to(entry)
    transformer.save_pretrained(config / "transformer")
    source = {k: v.clone() for k, v in transformer.state_dict().items()}
    path = tmp_path / "sd35_like.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original_layout(source, 3).items()}, str(path))
    pipe = load_pipeline(path, config=config)
    assert set(pipe.transformer.state_dict()) == set(source)
    _assert_same(pipe.transformer, source, "transformer")
    assert list(pipe.transformer.config.dual_attention_layers) == [0]


def test_a_config_naming_another_class_is_refused(tmp_path, miniworld_with_index):
    """The classes of the components the file lacks come from a literal list: a model_index.json entry naming any
    other class (here of an allowed library; other libraries are refused earlier, test_pipeline.py) is refused,
    naming the component."""
    config = miniworld_with_index({"text_encoder": ["transformers", "BertModel"]}, folder="config")
    path = tmp_path / "m.safetensors"
    write_single_file(path, text_encoders=False)
    with pytest.raises(ValueError, match="text_encoder is \\['transformers', 'BertModel'\\]"):
        load_pipeline(path, config=config)
