"""The SD3.5 architecture (MMDiT-X: dual attention layers, RMS qk-norm) on the same code path as the mini-world:
teachers as adapters, merges, GRPO and OPD epochs run on a tiny SD3.5-shaped transformer."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from flowopd_core.distill.coldstart import merge_cold_start
from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult

PROMPTS = PromptSet((PromptSpec("a red circle", task="compose"), PromptSpec('the word "ACE"', task="text")))


def sd35_pipeline():
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**config, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
    pipe.register_modules(transformer=transformer.eval())
    return pipe


def test_sd35_blocks_get_adapters_on_both_attentions_and_distil():
    pipe = sd35_pipeline()
    assert pipe.transformer.transformer_blocks[0].attn2 is not None  # dual attention (MMDiT-X)
    policy = Policy(pipe.transformer)
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=4.0, init=False))
    wrapped = [n for n, _ in policy.model.named_modules() if n.endswith("attn2.to_q.lora_A.t_compose")]
    assert wrapped, "the second (dual) attention must get LoRA too"
    merge_cold_start(policy, ["t_compose", "t_text"], "student", "delta_mean", rank=8, alpha=8.0)
    pool = TeacherPool(policy, {"compose": "t_compose", "text": "t_text"})
    config = OPDConfig(group_size=2, prompts_per_epoch=2, steps=3, batch_size=8, epochs=2, lr=3e-3, reward_workers=0)
    trainer = OPDTrainer(pipe, pool, "student", config, PROMPTS)
    history = trainer.train()
    assert all(torch.isfinite(torch.tensor(m.kl)) and m.kl > 0 for m in history)


def test_sd35_grpo_epoch_runs_with_ratio_one():
    pipe = sd35_pipeline()
    bright = lambda images, prompts: RewardResult(images.float().mean((1, 2, 3)), [{} for _ in prompts])  # noqa: E731
    config = GRPOConfig(group_size=2, prompts_per_epoch=2, steps=3, batch_size=8, lora_rank=4, lora_alpha=8.0,
                        epochs=1, reward_workers=0)
    metrics = GRPOTrainer(pipe, Policy(pipe.transformer), "teacher", {"bright": bright}, config, PROMPTS).epoch()
    assert metrics.first_update_ratio_dev < 1e-5
