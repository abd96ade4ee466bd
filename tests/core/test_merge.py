"""Cold-start merges of LoRA adapters (docs/method.md §3): exact on hand-built factors, and written into a Policy."""

from __future__ import annotations

import pytest
import torch

from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline
from flowopd_core.models.merge import (
    MERGE_METHODS,
    LoraFactors,
    delta_mean,
    factor_mean,
    merge_adapters,
    read_adapter_factors,
    refactor,
    task_arithmetic,
    ties,
    write_adapter_factors,
)
from flowopd_core.models.pipeline import TextEmbeddingCache, velocity
from flowopd_core.models.policy import LoraSpec, Policy

D64 = torch.float64


def _rank1(u, v, scale=1.0):
    """Rank-1 factors with scale * B @ A = outer(u, v) * scale."""
    return LoraFactors(A=torch.tensor([v], dtype=D64), B=torch.tensor(u, dtype=D64)[:, None], scale=scale)


def _random(rank, out, inp, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(A=torch.randn(rank, inp, generator=g, dtype=D64),
                       B=torch.randn(out, rank, generator=g, dtype=D64), scale=scale)


def test_refactor_is_exact_up_to_rank_and_reports_the_truncation_error():
    f = _random(3, 6, 5, seed=0, scale=0.5)
    exact, err = refactor(f.delta, rank=3, scale=4.0)
    assert err < 1e-12 and torch.allclose(exact.delta, f.delta, atol=1e-12) and exact.A.shape == (3, 5)
    padded, err = refactor(f.delta, rank=8, scale=1.0)  # rank > min(out, in): zero columns
    assert padded.B.shape == (6, 8) and err < 1e-12 and torch.allclose(padded.delta, f.delta, atol=1e-12)
    truncated, err = refactor(f.delta, rank=1, scale=1.0)
    s = torch.linalg.svdvals(f.delta)
    assert err == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-9)  # Eckart-Young
    zero, err = refactor(torch.zeros(4, 3, dtype=D64), rank=2, scale=1.0)
    assert err == 0.0 and not zero.delta.any()


def test_delta_mean_of_rank1_deltas_is_exact_when_their_sum_fits_the_rank():
    a = {"q": _rank1([1.0, 0.0, 2.0], [0.0, 1.0], scale=2.0)}
    b = {"q": _rank1([0.0, 3.0, 1.0], [1.0, 1.0], scale=0.5)}
    result = delta_mean([a, b], rank=2, alpha=4.0)
    expected = (a["q"].delta + b["q"].delta) / 2
    assert result.rank == 2 and result.factors["q"].scale == 2.0
    assert torch.allclose(result.factors["q"].delta, expected, atol=1e-12) and result.max_relative_error < 1e-12
    lossy = delta_mean([a, b], rank=1, alpha=1.0)  # rank-2 sum into rank 1: the error is reported
    assert lossy.max_relative_error > 0.1


def test_factor_mean_is_the_mean_of_the_factors_not_of_the_deltas():
    a = {"q": _rank1([1.0, 0.0], [1.0, 0.0])}
    b = {"q": _rank1([0.0, 1.0], [0.0, 1.0])}
    fm = factor_mean([a, b])
    assert torch.equal(fm.factors["q"].A, torch.tensor([[0.5, 0.5]], dtype=D64))
    assert torch.equal(fm.factors["q"].B, torch.tensor([[0.5], [0.5]], dtype=D64))
    # closed form: (B_a + B_b)(A_a + A_b) / 4 = all entries 1/4, cross terms included
    assert torch.equal(fm.factors["q"].delta, torch.full((2, 2), 0.25, dtype=D64))
    dm = delta_mean([a, b], rank=1, alpha=1.0)  # mean of deltas = diag(1/2), whose best rank-1 part differs
    assert not torch.allclose(fm.factors["q"].delta, dm.factors["q"].delta, atol=1e-3)
    assert torch.allclose(delta_mean([a, b], rank=2, alpha=2.0).factors["q"].delta, 0.5 * torch.eye(2, dtype=D64))
    assert (fm.rank, fm.alpha, fm.max_relative_error) == (1, 1.0, 0.0)
    with pytest.raises(ValueError, match="equal ranks and scales"):
        factor_mean([a, {"q": _rank1([1.0, 0.0], [1.0, 0.0], scale=2.0)}])


def test_task_arithmetic_sums_weighted_deltas():
    a, b = {"q": _random(2, 5, 4, seed=1)}, {"q": _random(2, 5, 4, seed=2)}
    result = task_arithmetic([a, b], rank=4, alpha=4.0, weights=[0.3, -1.5])
    assert torch.allclose(result.factors["q"].delta, 0.3 * a["q"].delta - 1.5 * b["q"].delta, atol=1e-12)
    with pytest.raises(ValueError, match="one weight per adapter"):
        task_arithmetic([a, b], rank=4, alpha=4.0, weights=[1.0])


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean():
    # Deltas (scale 1, A = identity) of three tasks on a 1 x 4 module.
    t1 = torch.tensor([[4.0, -1.0, 0.5, 2.0]], dtype=D64)
    t2 = torch.tensor([[2.0, 3.0, -0.2, -6.0]], dtype=D64)
    t3 = torch.tensor([[-1.0, 2.5, 3.0, 1.0]], dtype=D64)
    adapters = [{"q": LoraFactors(A=torch.eye(4, dtype=D64), B=t, scale=1.0)} for t in (t1, t2, t3)]
    result = ties(adapters, rank=1, alpha=1.0, density=0.5)  # keep the 2 largest |entries| per task
    # trimmed: t1 -> [4, 0, 0, 2]; t2 -> [0, 3, 0, -6]; t3 -> [0, 2.5, 3, 0]
    # elected signs (sum): [+, +, +, -] -> disjoint means: [4, (3 + 2.5) / 2, 3, -6]
    expected = torch.tensor([[4.0, 2.75, 3.0, -6.0]], dtype=D64)
    assert torch.allclose(result.factors["q"].delta, expected, atol=1e-12) and result.max_relative_error < 1e-12
    with pytest.raises(ValueError, match="density"):
        ties(adapters, rank=1, alpha=1.0, density=0.0)


def test_merge_checks_targets_and_method():
    a, b = {"q": _random(2, 3, 3, seed=0)}, {"k": _random(2, 3, 3, seed=1)}
    with pytest.raises(ValueError, match="other targets"):
        delta_mean([a, b], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="merge method"):
        merge_adapters("average", [a], rank=2, alpha=2.0)
    for method in MERGE_METHODS:
        assert merge_adapters(method, [a, a], rank=2, alpha=4.0).method == method
    with pytest.raises(ValueError, match="keeps the adapters"):
        merge_adapters("factor_mean", [a, a], rank=3, alpha=4.0)


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merged_adapter_in_a_policy_equals_base_plus_delta_applied_by_hand(method):
    torch.manual_seed(0)
    policy = Policy(build_tiny_pipeline(TEST_CONFIG, seed=0).transformer)
    spec = LoraSpec(rank=2, alpha=4.0, targets=("to_q", "to_k"), init=False)
    for name in ("t1", "t2"):
        policy.add_adapter(name, spec)
    teachers = [read_adapter_factors(policy, name) for name in ("t1", "t2")]
    assert teachers[0] and all(f.scale == 2.0 and f.rank == 2 for f in teachers[0].values())
    merged = merge_adapters(method, teachers, rank=2, alpha=4.0, density=0.5)
    policy.add_adapter("student", LoraSpec(rank=2, alpha=4.0, targets=("to_q", "to_k")))
    write_adapter_factors(policy, "student", merged.factors)
    policy.set_active("student")
    modules = dict(policy.model.named_modules())
    for module, f in merged.factors.items():
        layer = modules["base_model.model." + module]
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            got = layer(x)
            expected = layer.get_base_layer()(x) + x @ f.delta.T
        assert torch.allclose(got, expected, atol=1e-5), module
    # whole network: the policy with the merged adapter == a fresh base whose weights got the deltas by hand
    pipe = build_tiny_pipeline(TEST_CONFIG, seed=0)
    by_hand = pipe.transformer
    weights = dict(by_hand.named_modules())
    with torch.no_grad():
        for module, f in merged.factors.items():
            weights[module].weight += f.delta.to(torch.float32)
    cond = TextEmbeddingCache(pipe).encode(["a red circle", "two blue squares"])
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.allclose(velocity(policy, x, t, cond), velocity(by_hand, x, t, cond), atol=1e-4)
        with policy.disable():
            assert not torch.allclose(velocity(policy, x, t, cond), velocity(by_hand, x, t, cond), atol=1e-4)
    with pytest.raises(ValueError, match="targets differ"):
        write_adapter_factors(policy, "student", dict(list(merged.factors.items())[1:]))
