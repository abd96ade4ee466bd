"""Evaluation: deterministic ODE sampling of one or several models on held-out prompts, every metric per task,
means with confidence intervals, and the files a reader checks (issue 4; docs/method.md §1 "Evaluation uses the
deterministic ODE", §6-7).

One model (:func:`evaluate_model`): the prompts (each ``images_per_prompt`` times) are sampled in batches with
the ODE, 40 steps and CFG 4.5 by default (the paper's evaluation settings). Sample i of a run starts from noise
seeded by ``(seed, i)``, so its noise depends neither on the batch size nor on the other models. While batch
k+1 samples, batch k is scored in one background thread (as Flow-GRPO does); at most two batches are in flight
and scores are gathered in batch order, so a concurrent run equals a sequential one exactly.

Models (:class:`EvalTarget`): a name, a pipeline and optionally a peft-wrapped transformer plus an adapter
name. A teacher LoRA and the student that share ONE base are evaluated by selecting their adapter per sample
(peft's ``adapter_names``; ``"__base__"`` = adapters off), never by copying the model, and without changing
which adapter is active.

Metrics (``EvalConfig.metrics``, :data:`METRIC_MODES`): which rewards score the prompts of each task.
``task+quality`` (default): a task's own reward (``TASK_REWARDS``) plus ``quality`` on every task as a side
metric (it shows whether a task's gain costs image quality, the paper's seesaw); ``task``: only the own
reward; ``all``: every given reward on every task (NaN where a reward cannot score a prompt, e.g. OCR on a
prompt without a word). Reward names are the metric names.

Statistics and files (means with Student-t intervals over prompts, ``results.json``, ``results.md``,
grids, a chart) live in :mod:`flowopd_core.eval.report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from flowopd_core.choices import METRIC_MODES as METRIC_MODES
from flowopd_core.eval.config import SIDE_METRICS as SIDE_METRICS
from flowopd_core.eval.config import EvalConfig as EvalConfig
from flowopd_core.eval.config import comparison_problems, metric_plan, parse_comparisons
from flowopd_core.models.modelref import ModelRef
from flowopd_core.models.pipeline import TextEmbeddingCache
from flowopd_core.models.policy import BASE_ADAPTER, Policy
from flowopd_core.prompts import PromptSet, PromptSpec
from flowopd_core.rewards import REWARDS, Reward, make_reward
from flowopd_core.sampling.generate import SampleConfig, generate

Sampler = Callable[[Sequence[str], Sequence[int]], torch.Tensor]
"""``sampler(texts, indices) -> images (B, 3, H, W)`` in [0, 1]: sample i of the run for ``texts[k]`` where
``i = indices[k]`` (the index seeds the sample's noise)."""


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True, eq=False)
class EvalTarget:
    """A model to evaluate: ``pipeline`` with its own transformer, or with ``transformer`` (a :class:`Policy`
    or ``PeftModel`` around the pipeline's transformer) and ``adapter`` (``None`` = adapters off: the base)."""

    name: str
    pipeline: StableDiffusion3Pipeline
    transformer: Policy | PeftModel | None = None
    adapter: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an evaluation target needs a name")
        if self.transformer is None:
            if self.adapter is not None:
                raise ValueError(f"{self.name}: adapter {self.adapter!r} needs the peft-wrapped transformer")
            if any(isinstance(m, BaseTunerLayer) for m in self.pipeline.transformer.modules()):
                raise ValueError(f"{self.name}: the pipeline's transformer carries LoRA adapters; pass the "
                                 "peft-wrapped transformer (adapter=None evaluates the base)")
        elif self.adapter is not None and self.adapter not in adapter_names(self.transformer):
            have = list(adapter_names(self.transformer))
            raise KeyError(f"{self.name}: unknown adapter {self.adapter!r} (have {have})")


def adapter_names(transformer: Policy | PeftModel) -> tuple[str, ...]:
    """The LoRA adapters of a :class:`Policy` or ``PeftModel``."""
    if isinstance(transformer, Policy):
        return transformer.adapters
    if isinstance(transformer, PeftModel):
        return tuple(transformer.peft_config)
    raise TypeError(f"transformer must be a Policy or a PeftModel, got {type(transformer).__name__}")


def target_sampler(target: EvalTarget, config: EvalConfig, cache: TextEmbeddingCache | None = None,
                   check: Callable[[], None] | None = None) -> Sampler:
    """The ODE :data:`Sampler` of ``target``: the same images as :func:`flowopd_core.sampling.generate.generate` with
    ``kind="ode"`` for the same sample indices (docs/method.md §1; CFG with the negative prompt "").
    ``check()`` is called after each denoising step (a host that stops work raises from it)."""
    pipe = target.pipeline
    model = target.transformer if target.transformer is not None else pipe.transformer
    peft = target.transformer is not None and bool(adapter_names(target.transformer))
    adapter = (target.adapter or BASE_ADAPTER) if peft else None
    cache = cache or TextEmbeddingCache(pipe)
    sample_config = SampleConfig(
        steps=config.steps, guidance_scale=config.guidance_scale, kind="ode", batch_size=max(1, config.batch_size),
        seed=config.seed, height=config.resolution, width=config.resolution, precision=config.precision,
    )

    def sample_images(texts: Sequence[str], indices: Sequence[int]) -> torch.Tensor:
        first = int(indices[0])
        if list(indices) != list(range(first, first + len(indices))):
            raise ValueError("sample indices must be consecutive")
        names = [adapter] * len(texts) if adapter is not None else None
        rollout = generate(
            pipe, list(texts), sample_config, cache=cache, transformer=model, adapter_names=names,
            keep_latents=False, first_index=first,
            step_progress=(lambda j, steps: check()) if check is not None else None,
        )
        return rollout.images.cpu()

    return sample_images


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class ScoreTable:
    """Per-sample scores of N samples. ``scores[m]`` ``(N,)`` float32 in [0, 1], NaN = not scored (the reward
    cannot score it, or ``m`` is not planned for the sample's task); ``strict[m]`` ``(N,)`` 1/0/NaN for rewards
    whose reward returned a strict form; ``details[m]`` one dict per sample (empty where not planned)."""

    scores: dict[str, torch.Tensor]
    strict: dict[str, torch.Tensor]
    details: dict[str, list[dict[str, Any]]]

    def __len__(self) -> int:
        return len(next(iter(self.details.values()), []))

    @staticmethod
    def cat(parts: Sequence[ScoreTable]) -> ScoreTable:
        """Concatenate batches; a batch without a metric's strict form (nothing planned for it) gets NaN."""
        first = parts[0]
        strict = list(dict.fromkeys(m for p in parts for m in p.strict))
        return ScoreTable(
            scores={m: torch.cat([p.scores[m] for p in parts]) for m in first.scores},
            strict={m: torch.cat([p.strict.get(m, torch.full((len(p),), math.nan)) for p in parts]) for m in strict},
            details={m: [d for p in parts for d in p.details[m]] for m in first.details},
        )


def score_images(
    images: torch.Tensor,
    samples: Sequence[PromptSpec],
    plan: Mapping[str, Sequence[str]],
    rewards: Mapping[str, Reward],
) -> ScoreTable:
    """Score ``images`` ``(B, 3, H, W)`` (sample k drawn for ``samples[k]``) with every metric of ``plan``; a
    metric sees only the samples of the tasks it is planned for."""
    metrics = list(dict.fromkeys(m for task in plan for m in plan[task]))
    table = ScoreTable({}, {}, {})
    for metric in metrics:
        rows = [k for k, s in enumerate(samples) if metric in plan[s.task]]
        table.scores[metric] = torch.full((len(samples),), math.nan)
        table.details[metric] = [{} for _ in samples]
        if not rows:
            continue
        result = rewards[metric](images[rows], [samples[k] for k in rows])
        table.scores[metric][rows] = result.scores
        for k, d in zip(rows, result.details):
            table.details[metric][k] = d
        if result.strict is not None:
            table.strict[metric] = torch.full((len(samples),), math.nan)
            table.strict[metric][rows] = result.strict
    return table


@dataclass
class ModelEval:
    """Everything measured for one model. ``samples[i]`` is the prompt of sample i (image
    ``i % images_per_prompt`` of ``prompts[i // images_per_prompt]``); ``table`` its scores; ``images``
    ``(K, 3, H, W)`` in [0, 1] the kept samples ``image_index`` (``EvalConfig.keep_images`` per task)."""

    name: str
    prompts: PromptSet
    samples: tuple[PromptSpec, ...]
    config: EvalConfig
    plan: dict[str, tuple[str, ...]]
    table: ScoreTable
    images: torch.Tensor
    image_index: tuple[int, ...]
    seconds: float

    def sample_rows(self, task: str) -> list[int]:
        """Sample indices of ``task``."""
        return [i for i, s in enumerate(self.samples) if s.task == task]


def _run_now(fn: Callable[..., ScoreTable], *args: Any) -> Future:
    future: Future = Future()
    future.set_result(fn(*args))
    return future


def evaluate_model(
    name: str,
    sampler: Sampler | StableDiffusion3Pipeline,
    prompts: PromptSet,
    config: EvalConfig = EvalConfig(),
    rewards: Mapping[str, Reward] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ModelEval:
    """Sample and score one model on ``prompts`` (module doc). ``sampler``: a :data:`Sampler` or a pipeline
    (its own transformer). ``rewards``: metric name -> reward; default: the registered rewards the plan needs.
    ``progress(n)``: called after each sampled batch with its number of images (a progress bar's ``update``; a
    host that stops work raises from it, between batches), and with 0 after each denoising step when
    ``sampler`` is a pipeline (:func:`evaluate_targets` does the same), so a Stop takes effect within a step."""
    if isinstance(sampler, StableDiffusion3Pipeline):
        sampler = target_sampler(EvalTarget(name, sampler), config,
                                 check=(lambda: progress(0)) if progress is not None else None)
    plan = metric_plan(
        prompts.tasks, config.metrics, list(rewards if rewards is not None else REWARDS), config.task_rewards
    )
    rewards = rewards if rewards is not None else default_rewards(plan)
    if not len(prompts):
        raise ValueError(f"{name}: no prompts to evaluate")
    samples = tuple(p for p in prompts for _ in range(config.images_per_prompt))
    keep = kept_samples(samples, config.keep_images)
    tables, kept, pending = [], [], None
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        submit = pool.submit if config.concurrent else _run_now
        for start in range(0, len(samples), config.batch_size):
            rows = range(start, min(start + config.batch_size, len(samples)))
            images = sampler([samples[i].text for i in rows], rows)
            if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[:2] == (len(rows), 3)):
                raise ValueError(f"{name}: the sampler must return ({len(rows)}, 3, H, W) images, "
                                 f"got {getattr(images, 'shape', type(images))}")
            kept += [(i, images[i - start].float().cpu()) for i in rows if i in keep]
            if pending is not None:
                tables.append(pending.result())
            pending = submit(score_images, images, [samples[i] for i in rows], plan, rewards)
            if progress is not None:
                progress(len(rows))
        tables.append(pending.result())
    return ModelEval(
        name=name, prompts=prompts, samples=samples, config=config, plan=plan, table=ScoreTable.cat(tables),
        images=torch.stack([img for _, img in kept]), image_index=tuple(i for i, _ in kept),
        seconds=time.perf_counter() - started,
    )


def default_rewards(plan: Mapping[str, Sequence[str]]) -> dict[str, Reward]:
    """A registered reward (default config) for every metric of ``plan``."""
    return {m: make_reward(m) for m in dict.fromkeys(m for task in plan for m in plan[task])}


def kept_samples(samples: Sequence[PromptSpec], per_task: int) -> set[int]:
    """Indices of ``per_task`` samples of each task (all for 0) for the grids, spread over the task's categories
    (round robin, in order of first appearance, each category's samples in order): a compose grid shows single,
    count, pair and position prompts, not only the first category's."""
    if per_task == 0:
        return set(range(len(samples)))
    by_task: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, {}).setdefault(s.category, []).append(i)
    keep: set[int] = set()
    for categories in by_task.values():
        queues = [iter(rows) for rows in categories.values()]
        taken = 0
        while queues and taken < per_task:
            for queue in list(queues):
                index = next(queue, None)
                if index is None:
                    queues.remove(queue)
                elif taken < per_task:
                    keep.add(index)
                    taken += 1
    return keep


def evaluate_targets(
    targets: Sequence[EvalTarget],
    prompts: PromptSet,
    config: EvalConfig = EvalConfig(),
    rewards: Mapping[str, Reward] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ModelEval]:
    """:func:`evaluate_model` for each target with shared rewards and one text cache per pipeline; ``progress``
    counts the images of all targets (``len(targets) * len(prompts) * images_per_prompt`` in all) and is called
    with 0 after each denoising step (a point where a host may stop the work by raising)."""
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    problems = comparison_problems(parse_comparisons(config.comparisons), names, prompts.tasks)
    if problems:  # before any sampling
        raise ValueError(f"comparisons: {'; '.join(problems)}")
    if rewards is None:
        rewards = default_rewards(metric_plan(prompts.tasks, config.metrics, list(REWARDS), config.task_rewards))
    caches: dict[int, TextEmbeddingCache] = {}
    evals = []
    for target in targets:
        cache = caches.setdefault(id(target.pipeline), TextEmbeddingCache(target.pipeline))
        sampler = target_sampler(target, config, cache,
                                 check=(lambda: progress(0)) if progress is not None else None)
        evals.append(evaluate_model(target.name, sampler, prompts, config, rewards, progress=progress))
    return evals


def targets_from_refs(refs: Sequence[ModelRef]) -> list[EvalTarget]:
    """Evaluation targets for model handles, sharing ONE loaded base per base folder.

    Refs on the same base (path, dtype, device) share one pipeline; their adapters are loaded side by side on
    its transformer through one :class:`Policy` and selected per sample, never copied. A ref without adapter
    is the base (adapters off).
    """
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, ref in enumerate(refs):
        groups.setdefault(ref.base_key, []).append(i)
    targets: list[EvalTarget | None] = [None] * len(refs)
    for members in groups.values():
        first = refs[members[0]]
        adapted = [i for i in members if refs[i].adapter]
        if not adapted:
            pipe = first.load()
            for i in members:
                targets[i] = EvalTarget(refs[i].name, pipe)
            continue
        pipe = first.load(fresh=True)  # adapters are added to this transformer: never the shared one
        policy = Policy(pipe.transformer)
        for n, i in enumerate(adapted):
            policy.load_adapter(f"eval_{n}", refs[i].adapter)
        names = {i: f"eval_{n}" for n, i in enumerate(adapted)}
        for i in members:
            targets[i] = EvalTarget(refs[i].name, pipe, transformer=policy, adapter=names.get(i))
    return [t for t in targets if t is not None]
