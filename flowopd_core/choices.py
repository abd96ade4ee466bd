"""The library's literal choice lists (and a few limits), in a module that imports nothing: graph nodes declare
their ports from them and validate graphs without importing torch. The modules that implement each choice import
them from here (and re-export them under their old names)."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Compute precision of the model calls (:mod:`flowopd_core.models.pipeline`)."""
MAX_T5_LENGTH = 512
"""The longest T5 text a pipeline may be asked for (T5's trained length)."""

SAMPLER_KINDS = ("sde", "cps", "ode")
"""``sde``: Flow-GRPO SDE (§1); ``cps``: coefficients-preserving SDE (§1); ``ode``: deterministic Euler."""
STOCHASTIC_KINDS = ("sde", "cps")
LOGPROB_REDUCES = ("mean", "sum")
"""``mean``: log-density averaged over the D elements (Flow-GRPO, clip range 1e-4); ``sum``: the true one."""

REWARD_MODES = ("sum", "normalised")
"""GRPO multi-reward modes (:mod:`flowopd_core.grpo.loss`)."""
KL_FORMS = ("flow_grpo", "true", "mean")
"""See :func:`flowopd_core.grpo.loss.kl_to_reference`."""

ROUTE_MODES = ("hard", "soft")
"""``hard``: the prompt's task tag picks one teacher (the authors' code); ``soft``: v_tgt = sum_k alpha_k v_k."""
DISTILL_MODES = ("paper", "authors", "direct")
"""See :mod:`flowopd_core.distill.loss`."""

MERGE_METHODS = ("factor_mean", "delta_mean", "task_arithmetic", "ties")
"""The cold-start merges of docs/method.md §3 (:mod:`flowopd_core.models.merge`)."""
COLD_STARTS = ("none", *MERGE_METHODS, "sft")
"""``none``: a fresh zero-B student (= the base); a merge method; or ``sft``."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The weight dtypes a :class:`~flowopd_core.models.modelref.ModelRef` may name (``DTYPES`` maps them to torch's)."""
DEVICES = ("auto", "cpu", "cuda")

METRIC_MODES: dict[str, str] = {
    "task": "each task's own reward (TASK_REWARDS) only",
    "task+quality": "each task's own reward plus 'quality' on every task as a side metric",
    "all": "every given reward on every task (NaN where a reward cannot score a prompt)",
}
"""Which rewards the evaluator scores per task (:mod:`flowopd_core.eval.evaluate`)."""

LORA_FILE_FORMATS = ("comfyui", "diffusers", "both")
"""What the LoRA saver writes (:func:`flowopd_core.models.lora_format.export_adapter`): ComfyUI's LoRA file, diffusers'
SD3 LoRA file, or both."""
