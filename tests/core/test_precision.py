"""Mixed precision, activation checkpointing and the T5 text length on the tiny pipeline (CPU): bf16 autocast
keeps the numbers close to fp32 and every statistic in fp32; checkpointing changes no gradient; the text length
reaches the text encoder."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.pipeline import TextEmbeddingCache, autocast, load_pipeline, resolve_precision
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards.base import RewardResult
from flowopd_core.training.config import use_checkpointing

PROMPTS = PromptSet((
    PromptSpec("a red circle", task="compose"),
    PromptSpec("two blue squares", task="compose"),
    PromptSpec('the word "ACE"', task="text"),
    PromptSpec('the word "SEA"', task="text"),
))


def _bright(images, prompts):
    return RewardResult(images.float().mean((1, 2, 3)), [{} for _ in prompts])


def _opd(**overrides) -> OPDTrainer:
    """A student at the base and two random teachers far enough from it that the KL is signal, not rounding:
    bf16 rounds each CFG-combined velocity by ~1e-2, which is most of a KL between near-equal models (teachers
    at alpha 4: KL 0.83 in fp32, +23 % in bf16; at alpha 16: KL 91, +0.13 %)."""
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(100 + seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=16.0, init=False))
    pool = TeacherPool(policy, {"compose": "t_compose", "text": "t_text"})
    config = OPDConfig(**{**dict(group_size=2, prompts_per_epoch=4, steps=4, batch_size=8, lora_rank=4,
                                 lora_alpha=8.0, lr=3e-2, epochs=2, reward_workers=0), **overrides})
    return OPDTrainer(pipe, pool, "student", config, PROMPTS)


def _grpo(**overrides) -> GRPOTrainer:
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    config = GRPOConfig(**{**dict(group_size=4, prompts_per_epoch=2, steps=4, batch_size=8, lora_rank=4,
                                  lora_alpha=8.0, lr=1e-2, beta=0.04, reward_workers=0), **overrides})
    return GRPOTrainer(pipe, Policy(pipe.transformer), "student", {"bright": _bright}, config, PROMPTS)


def test_precision_settings_resolve_and_fp16_training_is_refused():
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="precision 'fp16' is not supported for training.*use 'bf16'"):
        OPDConfig(precision="fp16")
    with autocast("cpu", "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_distillation_step_is_close_to_fp32_and_keeps_fp32_state():
    trainer = _opd()
    batch = trainer.collect()  # one batch of rollouts and targets, shared by both precisions
    rows = torch.arange(len(batch))
    fp32 = trainer.step_loss(batch, rows, 0)
    trainer.precision = "bf16"  # what precision='bf16' in the config sets: targets and student under autocast
    targets, _ = trainer._targets(batch.rollout, batch.prompts, batch.plan, batch.train_steps)
    bf16 = trainer.step_loss(dataclasses.replace(batch, targets=targets), rows, 0)
    assert bf16.kl.dtype == torch.float32 and bf16.total.dtype == torch.float32
    assert torch.isfinite(bf16.total) and torch.isfinite(bf16.kl).all()
    relative = abs(bf16.kl_mean.item() - fp32.kl_mean.item()) / fp32.kl_mean.item()
    print(f"per-step KL: fp32 {fp32.kl_mean.item():.6g}, bf16 {bf16.kl_mean.item():.6g} ({relative:.3%})")
    assert relative < 0.02, f"the step's KL differs by {relative:.2%} between bf16 autocast and fp32"
    bf16.total.backward()
    trainer._optimizer_step()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.params.values())
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert moments and all(m.dtype == torch.float32 for m in moments)


def test_bf16_grpo_epoch_keeps_log_probs_and_kl_in_fp32():
    trainer = _grpo(precision="bf16")
    assert trainer.precision == "bf16"
    batch = trainer.collect()
    assert batch.rollout.log_probs.dtype == torch.float32 and batch.rollout.latents.dtype == torch.float32
    terms = trainer.step_loss(batch, torch.arange(len(batch)), batch.train_steps[:, 0])
    assert terms.kl.dtype == torch.float32 and terms.ppo.ratio.dtype == torch.float32
    metrics = trainer.epoch()
    assert torch.isfinite(torch.tensor([metrics.loss, metrics.kl, metrics.grad_norm])).all()


def test_checkpointing_gives_the_same_gradients():
    assert use_checkpointing("auto", 2_500_000_000) and not use_checkpointing("auto", 2_300_000)
    assert use_checkpointing("on", 1) and not use_checkpointing("off", 10**10)
    grads = {}
    for mode in ("off", "on"):
        trainer = _opd(gradient_checkpointing=mode)
        assert trainer.gradient_checkpointing == (mode == "on")
        assert trainer.policy.model.base_model.model.gradient_checkpointing == (mode == "on")
        torch.manual_seed(0)
        with torch.no_grad():  # a non-zero student, so that every LoRA factor gets a gradient
            for p in trainer.params.values():
                p.add_(0.05 * torch.randn_like(p))
        batch = trainer.collect()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step_loss(batch, torch.arange(len(batch)), 0).total.backward()
        grads[mode] = {k: p.grad.detach().clone() for k, p in trainer.params.items()}
    assert grads["off"].keys() == grads["on"].keys()
    for name, g in grads["off"].items():
        assert g.abs().max() > 0, name
        relative = ((grads["on"][name] - g).abs().max() / g.abs().max()).item()
        assert relative < 1e-5, (name, relative)


def test_text_length_reaches_the_text_encoder_and_the_cache_key(tmp_path):
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    pipe.save_pretrained(tmp_path / "model")
    calls = []
    for length in (0, 8, 24):
        loaded = load_pipeline(tmp_path / "model", max_sequence_length=length)
        real = loaded.encode_prompt

        def spy(*args, real=real, **kwargs):
            calls.append(kwargs["max_sequence_length"])
            return real(*args, **kwargs)

        loaded.encode_prompt = spy
        cache = TextEmbeddingCache(loaded)
        embeds = cache.encode(["a red circle"]).prompt_embeds
        clip_tokens = loaded.tokenizer.model_max_length
        want = length or min(loaded.tokenizer_3.model_max_length, 128)
        assert cache.max_sequence_length == want and embeds.shape[1] == clip_tokens + want
        assert ("a red circle", want) in cache._rows  # the cache is keyed by the text length too
    assert calls == [16, 8, 24]
    ref = ModelRef(str(tmp_path / "model"), max_sequence_length=8)
    assert TextEmbeddingCache(ref.load(fresh=True)).max_sequence_length == 8
    assert ref.base_key != dataclasses.replace(ref, max_sequence_length=0).base_key
    with pytest.raises(ValueError, match="max_sequence_length must be in"):
        load_pipeline(tmp_path / "model", max_sequence_length=513)


def test_bad_precision_and_text_length_are_refused_where_they_are_set():
    from flowopd_core.eval.config import EvalConfig
    from flowopd_core.sampling.generate import SampleConfig

    for make in (lambda: EvalConfig(precision="fp8"), lambda: SampleConfig(precision="half")):
        with pytest.raises(ValueError, match="precision must be one of"):
            make()
    with pytest.raises(ValueError, match="max_sequence_length must be in"):
        ModelRef("models/miniworld", max_sequence_length=600)
