"""Merging K LoRA adapters of the same targets into one adapter: the cold start of Flow-OPD (docs/method.md §3).

Notation: an adapter is a mapping ``module name -> LoraFactors``; for one module, ``A`` is ``(r, in)``, ``B`` is
``(out, r)`` and ``scale`` = alpha / r, so the adapter adds the weight delta Delta = scale * B @ A ``(out, in)``.
K = number of adapters merged.

Methods (``MERGE_METHODS``):

- ``factor_mean`` (the authors' code): A' = mean_k A_k, B' = mean_k B_k, same rank and scale. This is NOT the
  mean of the deltas: scale * B' A' = scale / K^2 * sum_{k,l} B_k A_l contains the cross terms B_k A_l (k != l)
  and only 1/K^2 of each own term B_k A_k. Nothing is re-factored.
- ``delta_mean``: Delta' = mean_k Delta_k, re-factored to rank r by truncated SVD.
- ``task_arithmetic``: Delta' = sum_k lambda_k Delta_k, re-factored.
- ``ties`` (TIES-merging, via ``peft.utils.merge_utils.ties``): per module and per task, keep the top ``density``
  fraction of |Delta_k| entries; elect each entry's sign as the sign of the sum of the trimmed deltas (sign of
  the total mass); average, per entry, the lambda-weighted trimmed deltas that agree with the elected sign
  (disjoint mean); re-factored.

Re-factoring (:func:`refactor`): Delta = U S V^T, B' = U_r sqrt(S_r / scale), A' = sqrt(S_r / scale) V_r^T, so
that scale * B' A' is the best rank-r approximation of Delta (Eckart-Young); its relative Frobenius error is
reported per module. The SVD runs in float64; factors are returned in the inputs' dtype.

Adapters of a :class:`flowopd_core.models.policy.Policy` are read with :func:`read_adapter_factors` and written with
:func:`write_adapter_factors` (through peft's ``LoraLayer``: ``lora_A[name]``, ``lora_B[name]``,
``scaling[name]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.merge_utils import ties as peft_ties

from flowopd_core.choices import MERGE_METHODS
from flowopd_core.models.policy import Policy

# MERGE_METHODS (flowopd_core.choices, re-exported here): the cold-start merges of docs/method.md §3 (module doc).
_PEFT_PREFIX = "base_model.model."

Adapter = Mapping[str, "LoraFactors"]
"""``module name -> LoraFactors`` of one LoRA adapter."""


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA factors of one module: ``A`` ``(r, in)``, ``B`` ``(out, r)``, ``scale`` = alpha / r."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"need A (r, in) and B (out, r), got {tuple(self.A.shape)} and {tuple(self.B.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def delta(self) -> torch.Tensor:
        """The weight delta scale * B @ A ``(out, in)``."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class MergeResult:
    """A merged adapter.

    factors: ``module name -> LoraFactors`` of the merged adapter (rank ``rank``, scale ``alpha / rank``).
    relative_error: per module ||scale B' A' - Delta'||_F / ||Delta'||_F of the re-factoring (0 when Delta' = 0,
        and 0 for ``factor_mean``, which re-factors nothing).
    """

    method: str
    factors: dict[str, LoraFactors]
    rank: int
    alpha: float
    relative_error: dict[str, float]

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)


# ----------------------------------------------------------------------------------------------------------
# Re-factoring
# ----------------------------------------------------------------------------------------------------------


def refactor(delta: torch.Tensor, rank: int, scale: float) -> tuple[LoraFactors, float]:
    """Best rank-``rank`` LoRA factors of ``delta`` ``(out, in)`` with ``scale * B @ A ~ delta`` (truncated SVD).

    Returns the factors (``A`` ``(rank, in)``, ``B`` ``(out, rank)``, ``delta``'s dtype; zero-padded when
    ``rank > min(out, in)``) and the relative Frobenius error of the approximation.
    """
    if rank < 1 or scale <= 0:
        raise ValueError(f"need rank >= 1 and scale > 0, got rank={rank}, scale={scale}")
    d64 = delta.detach().to(torch.float64)
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    keep = min(rank, s.numel())
    root = torch.sqrt(s[:keep] / scale)
    b = d64.new_zeros(d64.shape[0], rank)
    a = d64.new_zeros(rank, d64.shape[1])
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    norm = torch.linalg.matrix_norm(d64)
    error = torch.linalg.matrix_norm(scale * b @ a - d64) / norm if norm > 0 else torch.zeros(())
    return LoraFactors(A=a.to(delta.dtype), B=b.to(delta.dtype), scale=float(scale)), float(error)


def _refactor_all(method: str, deltas: dict[str, torch.Tensor], rank: int, alpha: float) -> MergeResult:
    factors, errors = {}, {}
    for module, delta in deltas.items():
        factors[module], errors[module] = refactor(delta, rank, alpha / rank)
    return MergeResult(method=method, factors=factors, rank=rank, alpha=float(alpha), relative_error=errors)


def _modules(adapters: Sequence[Adapter]) -> list[str]:
    """The common module names (in the first adapter's order); raises unless all adapters have the same."""
    if not adapters:
        raise ValueError("need at least one adapter to merge")
    names = list(adapters[0])
    for k, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != set(names):
            missing, extra = sorted(set(names) - set(adapter)), sorted(set(adapter) - set(names))
            raise ValueError(f"adapter {k} has other targets than adapter 0: missing {missing[:3]}, extra {extra[:3]}")
    return names


def _weights(weights: Sequence[float] | None, count: int, default: float) -> list[float]:
    if weights is None:
        return [default] * count
    if len(weights) != count:
        raise ValueError(f"need one weight per adapter ({count}), got {len(weights)}")
    return [float(w) for w in weights]


# ----------------------------------------------------------------------------------------------------------
# Merges
# ----------------------------------------------------------------------------------------------------------


def factor_mean(adapters: Sequence[Adapter]) -> MergeResult:
    """The authors' merge: A' = mean_k A_k, B' = mean_k B_k per module (docs/method.md §3).

    Needs equal ranks and scales. NOT the mean of the deltas B_k A_k (see the module doc); exact by
    construction, so ``relative_error`` is 0.
    """
    factors = {}
    for module in _modules(adapters):
        parts = [adapter[module] for adapter in adapters]
        if len({(p.rank, p.scale) for p in parts}) != 1:
            shapes = [(p.rank, p.scale) for p in parts]
            raise ValueError(f"factor_mean needs equal ranks and scales; {module}: (rank, scale) = {shapes}")
        a_mean = torch.stack([p.A for p in parts]).mean(0)
        b_mean = torch.stack([p.B for p in parts]).mean(0)
        factors[module] = LoraFactors(A=a_mean, B=b_mean, scale=parts[0].scale)
    first = next(iter(factors.values()))
    return MergeResult(
        method="factor_mean", factors=factors, rank=first.rank, alpha=first.scale * first.rank,
        relative_error={module: 0.0 for module in factors},
    )


def task_arithmetic(
    adapters: Sequence[Adapter], rank: int, alpha: float, weights: Sequence[float] | None = None
) -> MergeResult:
    """Delta' = sum_k lambda_k Delta_k per module, re-factored to rank ``rank``, scale alpha / rank (docs/method.md §3).

    ``weights`` = (lambda_1 .. lambda_K), default all 1.
    """
    lambdas = _weights(weights, len(adapters), 1.0)
    deltas = {
        module: sum(lam * adapter[module].delta for lam, adapter in zip(lambdas, adapters))
        for module in _modules(adapters)
    }
    return _refactor_all("task_arithmetic", deltas, rank, alpha)


def delta_mean(adapters: Sequence[Adapter], rank: int, alpha: float) -> MergeResult:
    """Delta' = mean_k scale_k B_k A_k per module, re-factored to rank ``rank`` (docs/method.md §3)."""
    result = task_arithmetic(adapters, rank, alpha, weights=[1.0 / len(adapters)] * len(adapters))
    return MergeResult("delta_mean", result.factors, result.rank, result.alpha, result.relative_error)


def ties(
    adapters: Sequence[Adapter],
    rank: int,
    alpha: float,
    density: float = 0.2,
    weights: Sequence[float] | None = None,
) -> MergeResult:
    """TIES-merging of the deltas per module, re-factored (docs/method.md §3; ``peft.utils.merge_utils.ties``).

    Trim: keep the floor(density * numel) largest |Delta_k| entries of each task. Elect: sign of
    sum_k trimmed Delta_k per entry (ties -> +). Disjoint mean: per entry, the mean of lambda_k trimmed Delta_k
    over the tasks whose trimmed entry has the elected sign (0 where none). ``weights`` = lambda_k (default 1;
    peft applies them before the disjoint mean).
    """
    if not 0 < density < 1:
        raise ValueError(f"ties density must be in (0, 1), got {density}")
    lambdas = torch.tensor(_weights(weights, len(adapters), 1.0), dtype=torch.float64)
    deltas = {}
    for module in _modules(adapters):
        tasks = [adapter[module].delta.detach().to(torch.float64) for adapter in adapters]
        merged = peft_ties(tasks, lambdas, density=density, majority_sign_method="total")
        deltas[module] = merged.to(adapters[0][module].A.dtype)
    return _refactor_all("ties", deltas, rank, alpha)


def merge_adapters(
    method: str,
    adapters: Sequence[Adapter],
    *,
    rank: int,
    alpha: float,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
) -> MergeResult:
    """Dispatch to one of ``MERGE_METHODS``. ``factor_mean`` ignores ``weights`` and ``density`` and keeps the
    inputs' rank and alpha (it raises if they differ from ``rank`` / ``alpha``); ``delta_mean`` ignores both."""
    if method == "factor_mean":
        result = factor_mean(adapters)
        if (result.rank, result.alpha) != (rank, float(alpha)):
            raise ValueError(f"factor_mean keeps the adapters' rank/alpha {result.rank}/{result.alpha}, "
                             f"asked for {rank}/{alpha}")
        return result
    if method == "delta_mean":
        return delta_mean(adapters, rank, alpha)
    if method == "task_arithmetic":
        return task_arithmetic(adapters, rank, alpha, weights)
    if method == "ties":
        return ties(adapters, rank, alpha, density, weights)
    raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")


# ----------------------------------------------------------------------------------------------------------
# Policy adapters
# ----------------------------------------------------------------------------------------------------------


def _lora_layers(policy: Policy, name: str) -> dict[str, LoraLayer]:
    if name not in policy.adapters:
        raise KeyError(f"unknown adapter {name!r} (have {list(policy.adapters)})")
    return {
        module.removeprefix(_PEFT_PREFIX): layer
        for module, layer in policy.model.named_modules()
        if isinstance(layer, LoraLayer) and name in layer.lora_A
    }


def read_adapter_factors(policy: Policy, name: str) -> dict[str, LoraFactors]:
    """Adapter ``name`` of ``policy`` as ``module name -> LoraFactors`` (detached copies)."""
    return {
        module: LoraFactors(
            A=layer.lora_A[name].weight.detach().clone(),
            B=layer.lora_B[name].weight.detach().clone(),
            scale=float(layer.scaling[name]),
        )
        for module, layer in _lora_layers(policy, name).items()
    }


def write_adapter_factors(policy: Policy, name: str, factors: Mapping[str, LoraFactors]) -> None:
    """Copy ``factors`` into the existing adapter ``name`` (create it first with the merge's rank and alpha).

    Raises if the modules, shapes or scales differ.
    """
    layers = _lora_layers(policy, name)
    if set(layers) != set(factors):
        missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(f"adapter {name!r} targets differ from the factors: missing {missing[:3]}, extra {extra[:3]}")
    with torch.no_grad():
        for module, layer in layers.items():
            f, a, b = factors[module], layer.lora_A[name].weight, layer.lora_B[name].weight
            if f.A.shape != a.shape or f.B.shape != b.shape:
                raise ValueError(f"{module}: adapter {name!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                 f"factors have A {tuple(f.A.shape)}, B {tuple(f.B.shape)}")
            if abs(float(layer.scaling[name]) - f.scale) > 1e-9 * max(1.0, f.scale):
                raise ValueError(f"{module}: adapter {name!r} has scale {layer.scaling[name]}, factors {f.scale}")
            a.copy_(f.A)
            b.copy_(f.B)
