"""Flow-OPD cold start (docs/method.md §3): merges into a student adapter and SFT on routed-teacher samples."""

from __future__ import annotations

import pytest
import torch

from flowopd_core.distill.coldstart import SFTConfig, adapter_spec, merge_cold_start, sft_cold_start
from flowopd_core.distill.trainer import TeacherPool
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.merge import read_adapter_factors
from flowopd_core.models.pipeline import TextEmbeddingCache
from flowopd_core.models.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.training.pretrain import flow_matching_loss

PROMPTS = PromptSet((
    PromptSpec("a red circle", task="compose"),
    PromptSpec("two blue squares", task="compose"),
    PromptSpec('the word "ACE"', task="text"),
))


def _pool():
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    policy = Policy(pipe.transformer)
    for seed, name in enumerate(("t_compose", "t_text")):
        torch.manual_seed(10 + seed)
        policy.add_adapter(name, LoraSpec(rank=4, alpha=2.0, init=False))
    return pipe, TeacherPool(policy, {"compose": "t_compose", "text": "t_text"})


def test_factor_mean_cold_start_is_the_mean_of_the_teachers_factors():
    _, pool = _pool()
    merged = merge_cold_start(pool.policy, ["t_compose", "t_text"], "student", "factor_mean")
    spec = adapter_spec(pool.policy, "student")
    assert (spec.rank, spec.alpha) == (4, 2.0)
    a, b, s = (read_adapter_factors(pool.policy, n) for n in ("t_compose", "t_text", "student"))
    assert set(s) == set(a) == set(merged.factors)
    for module in s:
        torch.testing.assert_close(s[module].A, (a[module].A + b[module].A) / 2)
        torch.testing.assert_close(s[module].B, (b[module].B + a[module].B) / 2)
    with pytest.raises(ValueError, match="merge method"):
        merge_cold_start(pool.policy, ["t_compose"], "s2", "average")


def test_delta_mean_cold_start_at_double_rank_is_exactly_the_mean_delta():
    _, pool = _pool()
    merge_cold_start(pool.policy, ["t_compose", "t_text"], "student", "delta_mean", rank=8, alpha=4.0)
    a, b, s = (read_adapter_factors(pool.policy, n) for n in ("t_compose", "t_text", "student"))
    for module in s:
        torch.testing.assert_close(s[module].delta, (a[module].delta + b[module].delta) / 2, atol=1e-5, rtol=1e-4)


def test_sft_fits_the_student_to_its_routed_teachers():
    pipe, pool = _pool()
    config = SFTConfig(samples_per_prompt=4, sample_steps=4, train_steps=60, batch_size=12, lr=1e-2, lora_rank=4,
                       lora_alpha=4.0, cfg_dropout=0.0)
    result = sft_cold_start(pipe, pool, "student", PROMPTS, config)
    assert result.samples == 12 and len(result.losses) == 60
    assert sum(result.losses[-10:]) < sum(result.losses[:10])
    # on the teacher samples (same t, eps), the student's rectified-flow loss is below the base's
    data = result.data
    cond = TextEmbeddingCache(pipe).encode([p.text for p in PROMPTS for _ in range(4)])
    gen = torch.Generator().manual_seed(5)
    t, eps = torch.rand(12, generator=gen), torch.randn(data.shape, generator=gen)
    policy = pool.policy
    policy.set_active("student")
    with torch.no_grad():
        student = flow_matching_loss(policy, data, cond, t, eps).item()
        with policy.disable():
            base = flow_matching_loss(policy, data, cond, t, eps).item()
    assert student < base - 0.03, (student, base)
