"""The SD3.5-Medium-shaped pipeline (random weights, built locally): its reduced-depth folder (2 joint blocks,
full width) loads offline with plain diffusers and with load_pipeline, has SD3.5-Medium's widths, and runs one
GRPO epoch and one OPD epoch at 128 px (16 x 16 latents, 64 image tokens next to 77 + 256 text tokens)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.models.pipeline import TextEmbeddingCache, load_pipeline
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.models.sd35_shaped import SD35ShapedConfig, write_sd35_shaped
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult

REDUCED = SD35ShapedConfig(transformer_layers=2, text_layers=1)
PROMPTS = PromptSet((PromptSpec("a red circle", task="compose"), PromptSpec('the word "ACE"', task="text")))
SMALL_EPOCH = dict(group_size=2, prompts_per_epoch=1, steps=2, resolution=128, batch_size=4, lora_rank=4,
                   lora_alpha=4.0, epochs=1, reward_workers=0)


def brightness(images: torch.Tensor, prompts) -> RewardResult:
    """Mean pixel value of ``(B, 3, H, W)`` images in [0, 1]: ``(B,)``."""
    return RewardResult(images.float().mean((1, 2, 3)), [{} for _ in prompts])


def assert_sd35_medium_widths(pipe: StableDiffusion3Pipeline) -> None:
    config = pipe.transformer.config
    assert config.num_attention_heads * config.attention_head_dim == 1536 == config.caption_projection_dim
    assert (config.joint_attention_dim, config.pooled_projection_dim) == (4096, 2048)
    assert (config.in_channels, config.out_channels, config.patch_size) == (16, 16, 2)
    assert (config.sample_size, config.pos_embed_max_size, config.qk_norm) == (128, 384, "rms_norm")
    assert config.num_layers == 2 and tuple(config.dual_attention_layers) == (0,)
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[1].attn2 is None  # MMDiT-X dual attention in block 0
    assert blocks[0].attn.norm_q.__class__.__name__ == "RMSNorm"
    widths = [(e.config.hidden_size, e.config.projection_dim) for e in (pipe.text_encoder, pipe.text_encoder_2)]
    assert widths == [(768, 768), (1280, 1280)]
    t5 = pipe.text_encoder_3.config
    assert (t5.d_model, t5.d_kv, t5.num_heads, t5.d_ff) == (4096, 64, 64, 10240)
    vae = pipe.vae.config
    assert (vae.latent_channels, tuple(vae.block_out_channels), vae.scaling_factor, vae.shift_factor) == (
        16, (128, 256, 512, 512), 1.5305, 0.0609)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv and pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.shift == 3.0
    assert (pipe.tokenizer.model_max_length, pipe.tokenizer_3.model_max_length) == (77, 256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The reduced folder (2.8 GB in float32), removed afterwards (pytest keeps its last 3 temporary folders)."""
    path = write_sd35_shaped(tmp_path_factory.mktemp("sd35m") / "sd35m-2layers", REDUCED)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def policy_and_pipe(folder):
    pipe = load_pipeline(folder)
    return Policy(pipe.transformer), pipe


def test_reduced_folder_loads_offline_with_plain_diffusers(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    assert_sd35_medium_widths(pipe)
    assert sorted(p.name for p in folder.glob("*/*.safetensors")) == sorted(
        ["diffusion_pytorch_model.safetensors"] * 2 + ["model.safetensors"] * 3)


def test_load_pipeline_encodes_sd35_medium_text_shapes(policy_and_pipe):
    _, pipe = policy_and_pipe
    assert_sd35_medium_widths(pipe)
    embeds = TextEmbeddingCache(pipe, max_sequence_length=256).encode(["a red circle"])  # the tokenizer's length
    assert embeds.prompt_embeds.shape == (1, 77 + 256, 4096) and embeds.pooled.shape == (1, 2048)


@pytest.mark.slow
def test_reduced_model_runs_a_grpo_epoch_at_128px(policy_and_pipe):
    policy, pipe = policy_and_pipe
    config = GRPOConfig(**SMALL_EPOCH)
    metrics = GRPOTrainer(pipe, policy, "grpo", {"bright": brightness}, config, PROMPTS).epoch()
    assert math.isfinite(metrics.loss) and metrics.first_update_ratio_dev < 1e-5


@pytest.mark.slow
def test_reduced_model_runs_an_opd_epoch_at_128px(policy_and_pipe):
    policy, pipe = policy_and_pipe
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=4.0, init=False))
    pool = TeacherPool(policy, {"compose": "t_compose", "text": "t_text"})
    config = OPDConfig(**SMALL_EPOCH)
    metrics = OPDTrainer(pipe, pool, "student", config, PROMPTS).epoch()
    assert math.isfinite(metrics.kl) and metrics.kl > 0 and math.isfinite(metrics.opd_loss)
