"""The GPU suite (issue 21): Flow-GRPO and Flow-OPD iterations on an SD3.5-Medium-shaped model, on one CUDA GPU.

    python bench/gpu_suite.py [--output bench/RESULTS-gpu.md] [--layers 24] [--repeats 3] [--budget 420]
    python bench/gpu_suite.py --tiny [--output FILE]   # the same code on the CPU with a tiny model (CI)

Writes Markdown to ``--output`` (rewritten after every section, so a run cut short leaves what it measured) and
prints it. The model: :func:`flowopd_core.models.sd35_shaped.build_sd35_shaped` (SD3.5-Medium's MMDiT-X at
``--layers`` blocks, random weights, built on the GPU in bfloat16), 512 px (1,024 image tokens) next to
77 CLIP + 128 T5 text tokens. Every figure is the median of ``--repeats`` runs after a warm-up; every
comparison is measured in this one run, one scenario after another, each on the same resident base
transformer (LoRA adapters are added for a scenario and unloaded after it).

1. One Flow-GRPO iteration (a single LoRA policy) and one Flow-OPD iteration (K=3 teacher adapters + an anchor
   adapter on the ONE base, MAR on), 16 images each, at each trainer's default batch size: seconds, images per
   second, peak GPU memory (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``).
2. The training forward + backward (one CFG velocity with grad, then backward) and the no-grad forward at a
   micro-batch of 8 images: seconds, peak memory and model-FLOPs utilisation, for bf16 (the defaults:
   checkpointing ``auto`` = on above 500 M parameters, T5 128), checkpointing flipped, T5 256 and, last, fp32
   (fp32 weights, no autocast, TF32 as torch's default: off). A setting that runs out of memory says so.
   FLOPs per image, from the shapes: linear layers 2 x in x out x rows for every ``nn.Linear`` (LoRA included;
   rows = the tokens the layer sees, counted with forward hooks in one forward), attention 4 x tokens^2 x width
   per joint attention (every block, tokens = image + text) plus 4 x image tokens^2 x width per MMDiT-X
   image-only attention, x2 rows for CFG. Training = 2 x linear + 3 x attention: the base is frozen, so its
   backward computes input gradients only (no weight gradients), and attention's backward is twice its
   forward; recomputation by checkpointing is not counted (model FLOPs). The 6ND convention (3 x everything)
   is shown next to it. ``torch.utils.flop_counter`` counts one forward + backward as a cross-check. Peak: the
   device's dense bf16 figure from :data:`PEAK_BF16_TFLOPS`.
3. The authors' loop structure (``AuthorsLoop`` of bench/bench_opd.py) at THEIR shapes: each of the K=3 teachers a
   whole bf16 transformer copy, text 77 + 128, micro-batch 4 for sampling and training, the teacher and anchor
   (the policy with adapters off, their default) forwards inside the training loop, no checkpointing
   (Flow-GRPO's scripts/train_sd3.py, which their script builds on, enables none; with checkpointing, noted,
   if that runs out of memory). Against ours at its defaults
   and at the largest batch that fits (``--batch-candidates``, largest first, skipping those that run out of
   memory or would overrun ``--budget``), with as many images per iteration as that batch.

Without a CUDA device (and without ``--tiny``) the script exits with status 2. ``--tiny`` runs every function
on the CPU with the mini-world's unit-test pipeline (bfloat16 weights, autocast on the CPU), memory as the
process's peak RSS, no MFU (no peak figure for a CPU); its verdict lines read "Check (--tiny ...)" so that
bench/run_all.py never takes them for targets.

On a lent GPU machine (the device tool: one prepared call, about 8 minutes; that machine's image may lack
diffusers and have an older peft, so bring the wheels along in an ignored folder, e.g. ``.whl/``, as ``carry``):
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
HF_HUB_OFFLINE=1 python3 bench/gpu_suite.py --output $OUT/RESULTS-gpu.md --commit <short hash> --budget 360``,
then copy RESULTS-gpu.md to bench/.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_opd import TASKS, AuthorsLoop, PeakRSS, add_teachers, base_copy  # noqa: E402
from flowopd_core.distill.trainer import OPDConfig, OPDTrainer, TeacherPool  # noqa: E402
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer  # noqa: E402
from flowopd_core.miniworld.sets import prompt_set  # noqa: E402
from flowopd_core.miniworld.tiny import TEST_CONFIG, build_tiny_pipeline  # noqa: E402
from flowopd_core.models.pipeline import (  # noqa: E402
    TextEmbeddingCache,
    TextEmbeddings,
    latent_shape,
    set_text_length,
    velocity,
)
from flowopd_core.models.policy import LoraSpec, Policy  # noqa: E402
from flowopd_core.models.sd35_shaped import SD35ShapedConfig, build_sd35_shaped  # noqa: E402
from flowopd_core.prompts import PromptSet  # noqa: E402
from flowopd_core.rewards import RewardResult  # noqa: E402
from flowopd_core.training.config import use_checkpointing  # noqa: E402

DEFAULT_OUTPUT = ROOT / "bench" / "RESULTS-gpu.md"
PRECISION = "bf16"
"""Compute precision of every measured scenario but the fp32 one (``auto`` resolves to it on CUDA)."""
PEAK_BF16_TFLOPS = (
    # (the device name contains all of, none of, dense bf16 TFLOP/s, which figure)
    (("H100", "PCIe"), (), 756.0, "H100 PCIe"),
    (("H100",), ("PCIe", "NVL"), 989.0, "H100 SXM"),
    (("H200",), ("NVL",), 989.0, "H200"),
    (("A100",), (), 312.0, "A100"),
)
MEMORY_TARGET = 1.1
SPEED_TARGET = 1.5
MFU_TARGET = 0.35
CFG_SCALE = 4.5


@dataclass(frozen=True)
class Suite:
    """Shapes, repeats and time budget of one run (defaults: the GPU run; :data:`TINY`: the CPU check)."""

    tiny: bool = False  # the mini-world's unit-test pipeline on the CPU instead of the SD3.5-shaped one
    layers: int = 24  # transformer blocks of the SD3.5-shaped model (SD3.5-Medium: 24)
    resolution: int = 512  # image height = width in pixels
    steps: int = 10  # sampling steps per rollout (Flow-GRPO's 10; int(0.99 T) of them trained)
    images: int = 16  # images per iteration (GRPO: 4 per prompt; OPD and the authors' loop: 2 per prompt)
    authors_batch: int = 4  # the authors' micro-batch (sampling and training)
    micro_batch: int = 8  # images of the forward / forward + backward measurements (CFG: twice the rows)
    text_lengths: tuple[int, int] = (128, 256)  # T5 tokens: the default, then the compared longer one
    batch_candidates: tuple[int, ...] = (32, 64)  # batches tried for "ours at the largest batch that fits"
    warmup: int = 1  # untimed runs before each figure's timed ones
    repeats: int = 3  # timed runs per figure (the median is reported)
    budget: float = 420.0  # seconds from the build on: optional figures that would overrun it are skipped


TINY = Suite(tiny=True, layers=TEST_CONFIG.num_layers, resolution=TEST_CONFIG.image_size, steps=3, images=4,
             authors_batch=2, micro_batch=4, text_lengths=(16, 32), batch_candidates=(4, 8), budget=80.0)


# ----------------------------------------------------------------------------------------------------------
# Set-up, memory, timing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    suite: Suite
    device: torch.device
    pipe: StableDiffusion3Pipeline
    prompts: PromptSet
    caches: dict[int, TextEmbeddingCache]
    started: float

    @property
    def cache(self) -> TextEmbeddingCache:
        """The embeddings at the default T5 length (the first of ``suite.text_lengths``)."""
        return self.caches[self.suite.text_lengths[0]]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.suite.budget - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {message}", file=sys.stderr, flush=True)


def brightness(images: torch.Tensor, prompts) -> RewardResult:
    """A stand-in reward: the mean pixel of each image ``(B, 3, H, W)`` (distinct per sample, so every GRPO
    group has advantages)."""
    return RewardResult(scores=images.float().mean(dim=(1, 2, 3)), details=[{} for _ in prompts])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak memory from construction to :meth:`read`, in bytes: ``torch.cuda.max_memory_allocated`` (after
    ``reset_peak_memory_stats``) on a GPU, the process's peak RSS (:class:`bench.bench_opd.PeakRSS`) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self._rss = device, None
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self._rss = PeakRSS()

    def read(self) -> float:
        sync(self.device)
        if self._rss is None:
            return float(torch.cuda.max_memory_allocated(self.device))
        return self._rss.stop() * 1024.0


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (CPU)"


@dataclass
class Runs:
    """Wall seconds and results of timed calls (the warm-up excluded)."""

    seconds: list[float]
    results: list

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_result(self):
        """The result of the run with the median time (the lower middle one for an even count)."""
        order = sorted(range(len(self.seconds)), key=self.seconds.__getitem__)
        return self.results[order[(len(order) - 1) // 2]]


def time_runs(ctx: Context, fn: Callable[[], object]) -> Runs:
    """``suite.warmup`` untimed calls of ``fn``, then ``suite.repeats`` timed ones, synchronised."""
    for _ in range(ctx.suite.warmup):
        fn()
    seconds, results = [], []
    for _ in range(ctx.suite.repeats):
        sync(ctx.device)
        start = time.perf_counter()
        results.append(fn())
        sync(ctx.device)
        seconds.append(time.perf_counter() - start)
    return Runs(seconds, results)


def build(suite: Suite, device: torch.device) -> Context:
    """The pipeline (bfloat16 transformer), the prompts and the text embeddings at each T5 length (encoded
    once, shared by every trainer, so that text encoding stays out of every timed region)."""
    started = time.perf_counter()
    if suite.tiny:
        pipe = build_tiny_pipeline(TEST_CONFIG)
        pipe.transformer.to(torch.bfloat16)
    else:
        config = SD35ShapedConfig(transformer_layers=suite.layers, dtype="bfloat16")
        try:
            with torch.device(device):  # random init on the GPU: seconds instead of a minute or two on the CPU
                pipe = build_sd35_shaped(config)
        except Exception as error:  # one untested GPU path must not cost the whole run
            print(f"building on {device} failed ({error!r}); building on the CPU instead", file=sys.stderr)
            release(device)
            pipe = build_sd35_shaped(config)
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # AuthorsLoop samples at the model's native size: make that the suite's resolution (sample_size is read
    # at construction only; the forward crops SD3.5's 384 x 384 position table to the input's size).
    pipe.transformer.register_to_config(sample_size=suite.resolution // pipe.vae_scale_factor)
    per_task = math.ceil(max(suite.images, suite.micro_batch, *suite.batch_candidates) / 2 / len(TASKS)) + 1
    prompts = PromptSet(tuple(p for task in TASKS for p in prompt_set(task, "train", per_task=per_task)))
    caches = {}
    for length in suite.text_lengths:
        caches[length] = TextEmbeddingCache(pipe, max_sequence_length=length)
        caches[length].encode(prompts.texts)
        caches[length].negative()
        caches[length].close()
    set_text_length(pipe, suite.text_lengths[0])
    if device.type == "cuda":  # the encoders are done: keep them out of every memory figure
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(pipe, name).to("cpu")
    ctx = Context(suite, device, pipe, prompts, caches, started)
    release(device)
    return ctx


@contextmanager
def policy_on(ctx: Context) -> Iterator[Policy]:
    """A :class:`Policy` on the resident base for one scenario; afterwards its adapters are unloaded (peft's
    ``unload``: the bare base again), checkpointing is off and memory is released."""
    policy = Policy(ctx.pipe.transformer)
    try:
        yield policy
    finally:
        if policy.adapters:
            policy.model.unload()
        ctx.pipe.transformer.disable_gradient_checkpointing()
        release(ctx.device)


# ----------------------------------------------------------------------------------------------------------
# 1 + 3. Iterations
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Iteration:
    """One trainer's iteration: median wall seconds, of which sampling (rollouts), images, peak memory."""

    name: str
    seconds: float
    sampling: float
    images: int
    peak: float
    batch: int
    checkpointing: bool

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def measure_iteration(ctx: Context, name: str, trainer, images: int, batch: int,
                      sampling: Callable[[object], float]) -> Iteration:
    memory = PeakMemory(ctx.device)
    runs = time_runs(ctx, trainer.epoch)
    peak = memory.read()
    result = Iteration(name, runs.median, sampling(runs.median_result), images, peak, batch,
                       trainer.gradient_checkpointing)
    ctx.log(f"{name}: {result.seconds:.2f} s, {result.images_per_second:.2f} images/s, {peak / 1e9:.2f} GB")
    return result


def opd_config(ctx: Context, images: int, **overrides) -> OPDConfig:
    suite = ctx.suite
    return OPDConfig(group_size=2, prompts_per_epoch=images // 2, steps=suite.steps, resolution=suite.resolution,
                     anchor_weight=0.04, reward_workers=0, precision=PRECISION, **overrides)


def grpo_iteration(ctx: Context) -> Iteration:
    """A Flow-GRPO iteration of one LoRA policy (GRPOConfig defaults, 4 samples per prompt)."""
    suite = ctx.suite
    config = GRPOConfig(group_size=4, prompts_per_epoch=suite.images // 4, steps=suite.steps,
                        resolution=suite.resolution, reward_workers=0, precision=PRECISION)
    with policy_on(ctx) as policy:
        trainer = GRPOTrainer(ctx.pipe, policy, "student", {"brightness": brightness}, config, ctx.prompts)
        trainer.cache = ctx.cache
        result = measure_iteration(ctx, "GRPO", trainer, suite.images, config.batch_size,
                                   lambda metrics: metrics.sample_seconds)
        del trainer
    return result


def opd_iteration(ctx: Context, name: str, images: int, batch: int | None = None) -> Iteration:
    """A Flow-OPD iteration (ours): K=3 teacher adapters + an anchor adapter on the one base, MAR on;
    OPDConfig defaults but for the iteration size (and ``batch``, when given)."""
    config = opd_config(ctx, images, **({"batch_size": batch} if batch else {}))
    with policy_on(ctx) as policy:
        add_teachers(policy, 32, 64.0, tuple(f"teacher_{t}" for t in TASKS) + ("anchor",))
        pool = TeacherPool(policy, {t: f"teacher_{t}" for t in TASKS}, anchor="anchor")
        trainer = OPDTrainer(ctx.pipe, pool, "student", config, ctx.prompts)
        trainer.cache = ctx.cache
        result = measure_iteration(ctx, name, trainer, images, config.batch_size,
                                   lambda metrics: metrics.sample_seconds)
        del trainer, pool
    return result


def authors_once(ctx: Context, checkpointing: str) -> Iteration:
    suite = ctx.suite
    config = opd_config(ctx, suite.images, batch_size=suite.authors_batch, gradient_checkpointing=checkpointing)
    teachers = {task: base_copy(ctx.pipe.transformer) for task in TASKS}
    with policy_on(ctx) as policy:
        trainer = AuthorsLoop(ctx.pipe, policy, "student", teachers, None, config, ctx.prompts)
        trainer.cache = ctx.cache
        result = measure_iteration(ctx, "authors' structure", trainer, suite.images, config.batch_size,
                                   lambda phases: phases["sample"])
        del trainer, teachers
    return result


def authors_iteration(ctx: Context) -> tuple[Iteration | None, list[str]]:
    """The authors' structure at their shapes (module doc, 3.): K=3 whole bf16 transformer copies as teachers,
    the policy with adapters off as the anchor, micro-batch ``suite.authors_batch``, no checkpointing (with
    checkpointing when that runs out of memory, noted)."""
    notes = []
    for checkpointing in ("off", "on"):
        try:
            return authors_once(ctx, checkpointing), notes
        except torch.OutOfMemoryError:
            notes.append(f"the authors' structure with checkpointing {checkpointing}: out of memory")
        release(ctx.device)  # outside the except block: the traceback no longer holds the tensors
        ctx.log(notes[-1])
    return None, notes


def largest_batch(ctx: Context, reference: Iteration) -> tuple[Iteration | None, list[str]]:
    """Ours at the largest of ``suite.batch_candidates`` that fits, with as many images per iteration: largest
    first; a candidate that runs out of memory, or whose estimated time (``reference``'s seconds per image)
    would overrun the budget, is skipped with a note."""
    notes = []
    for batch in sorted(ctx.suite.batch_candidates, reverse=True):
        estimate = reference.seconds / reference.images * batch * (ctx.suite.warmup + ctx.suite.repeats)
        if estimate > ctx.remaining():
            notes.append(f"batch {batch}: skipped (about {estimate:.0f} s; {max(ctx.remaining(), 0):.0f} s of the "
                         f"{ctx.suite.budget:.0f} s budget left)")
            continue
        try:
            return opd_iteration(ctx, f"ours, batch {batch}", batch, batch), notes
        except torch.OutOfMemoryError:
            notes.append(f"batch {batch}: out of memory")
        release(ctx.device)  # outside the except block: the traceback no longer holds the batch's tensors
        ctx.log(notes[-1])
    return None, notes


# ----------------------------------------------------------------------------------------------------------
# 2. The training forward + backward: cost and FLOPs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flops:
    """Model FLOPs of one image's CFG velocity (2 rows): forward ``linear`` and ``attention`` (module doc, 2.)."""

    linear: float
    attention: float

    @property
    def forward(self) -> float:
        return self.linear + self.attention

    @property
    def train(self) -> float:
        """Forward + backward with a frozen base: input gradients only (2 x linear), attention 3x."""
        return 2 * self.linear + 3 * self.attention

    @property
    def convention(self) -> float:
        """The 6ND convention: 3 x the forward."""
        return 3 * self.forward


@dataclass
class StepCost:
    """Median seconds of the no-grad forward and of the forward + backward of ``samples`` images, peak memory."""

    name: str
    samples: int
    text_length: int
    text_tokens: int
    forward: float
    train: float
    peak: float
    note: str = ""


@dataclass
class Inputs:
    """One CFG velocity's inputs: latents ``x`` ``(B, C, H, W)``, times ``t`` ``(B,)``, text embeddings."""

    x: torch.Tensor
    t: torch.Tensor
    cond: TextEmbeddings
    uncond: TextEmbeddings

    def velocity(self, policy: Policy, precision: str) -> torch.Tensor:
        return velocity(policy, self.x, self.t, self.cond, self.uncond, CFG_SCALE, precision=precision)


def step_inputs(ctx: Context, samples: int, text_length: int) -> Inputs:
    """Random latents at the suite's resolution, random times, the prompts' embeddings at ``text_length``."""
    generator = torch.Generator().manual_seed(0)
    shape = latent_shape(ctx.pipe, samples, ctx.suite.resolution, ctx.suite.resolution)
    cache = ctx.caches[text_length]
    texts = [ctx.prompts.texts[i % len(ctx.prompts)] for i in range(samples)]
    return Inputs(torch.randn(shape, generator=generator).to(ctx.device),
                  torch.rand(samples, generator=generator).to(ctx.device),
                  cache.encode(texts), cache.negative(samples))


def student(policy: Policy) -> list[torch.nn.Parameter]:
    """Add the trained adapter (OPDConfig's default rank 16, alpha 32) and return its parameters."""
    policy.add_adapter("student", LoraSpec(rank=16, alpha=32.0))
    policy.set_active("student")
    return policy.trainable_parameters("student")


def step_cost(ctx: Context, policy: Policy, params: list, name: str, *, precision: str = PRECISION,
              checkpointing: bool, text_length: int) -> StepCost:
    """Median seconds of the no-grad CFG forward and of the forward + backward at ``suite.micro_batch``."""
    policy.set_gradient_checkpointing(checkpointing)
    inputs = step_inputs(ctx, ctx.suite.micro_batch, text_length)

    def forward() -> None:
        with torch.no_grad():
            inputs.velocity(policy, precision)

    def train() -> None:
        inputs.velocity(policy, precision).square().mean().backward()

    tokens = inputs.cond.prompt_embeds.shape[1]
    cost = StepCost(name, ctx.suite.micro_batch, text_length, tokens, math.nan, math.nan, math.nan)
    try:
        memory = PeakMemory(ctx.device)
        cost.forward, cost.train = time_runs(ctx, forward).median, time_runs(ctx, train).median
        cost.peak = memory.read()
    except torch.OutOfMemoryError:
        cost.note = "out of memory"
    for p in params:
        p.grad = None
    release(ctx.device)
    ctx.log(f"step, {name}: forward {cost.forward:.3f} s, forward+backward {cost.train:.3f} s {cost.note}")
    return cost


def count_flops(ctx: Context, policy: Policy, text_length: int) -> Flops:
    """:class:`Flops` of one image: linear layers by forward hooks, attention from the config (module doc)."""
    inputs = step_inputs(ctx, 1, text_length)
    total = 0

    def hook(module: torch.nn.Linear, args, output) -> None:
        nonlocal total
        total += 2 * args[0].numel() * module.out_features

    handles = [m.register_forward_hook(hook) for m in policy.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            inputs.velocity(policy, PRECISION)
    finally:
        for handle in handles:
            handle.remove()
    config = ctx.pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    image = inputs.x.shape[-2] * inputs.x.shape[-1] // config.patch_size**2
    tokens = image + inputs.cond.prompt_embeds.shape[1]
    dual = len(config.dual_attention_layers or ())
    attention = 2 * (4 * tokens**2 * width * config.num_layers + 4 * image**2 * width * dual)  # x2: CFG rows
    return Flops(float(total), float(attention))


def counted_flops(ctx: Context, policy: Policy, params: list) -> float:
    """FLOPs of one image's forward + backward (checkpointing off) as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    policy.set_gradient_checkpointing(False)
    inputs = step_inputs(ctx, 1, ctx.suite.text_lengths[0])
    with FlopCounterMode(display=False) as counter:
        inputs.velocity(policy, PRECISION).square().mean().backward()
    for p in params:
        p.grad = None
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """The device's dense bf16 TFLOP/s from :data:`PEAK_BF16_TFLOPS` and which row matched (None: unknown)."""
    if device.type != "cuda":
        return None, f"no peak figure for device {device.type!r}"
    name = torch.cuda.get_device_name(device).lower()
    for must, must_not, tflops, label in PEAK_BF16_TFLOPS:
        if all(s.lower() in name for s in must) and not any(s.lower() in name for s in must_not):
            return tflops, label
    return None, f"no peak figure for {torch.cuda.get_device_name(device)!r} in the table"


@dataclass
class StepResults:
    costs: list[StepCost]
    flops: dict[int, Flops]
    counted: float
    default_checkpointing: bool
    fp32_note: str = ""


def step_costs(ctx: Context) -> StepResults:
    """bf16 with the default checkpointing, checkpointing flipped, the longer T5 text (all on bf16 weights)."""
    short, long = ctx.suite.text_lengths
    costs = []
    with policy_on(ctx) as policy:
        params = student(policy)
        default = use_checkpointing("auto", policy.base_parameters)
        flops = {n: count_flops(ctx, policy, n) for n in (short, long)}
        counted = counted_flops(ctx, policy, params)
        for checkpointing, length in ((default, short), (not default, short), (default, long)):
            auto = " (auto)" if checkpointing == default else ""
            name = f"bf16, checkpointing {on_off(checkpointing)}{auto}, T5 {length}"
            costs.append(step_cost(ctx, policy, params, name, checkpointing=checkpointing, text_length=length))
    return StepResults(costs, flops, counted, default)


def fp32_step_cost(ctx: Context, results: StepResults) -> None:
    """fp32 weights, no autocast, at the default checkpointing and T5 length. Converts the resident base to
    float32 for good: the last measurement of a run. Skipped when its estimate would overrun the budget."""
    default = results.costs[0]
    estimate = 10 * (default.forward + default.train) * (ctx.suite.warmup + ctx.suite.repeats)
    if not estimate <= ctx.remaining():  # NaN (the default step ran out of memory) skips it too
        results.fp32_note = (f"fp32: skipped (about {estimate:.0f} s; {max(ctx.remaining(), 0):.0f} s of the "
                             f"{ctx.suite.budget:.0f} s budget left)")
        return
    ctx.pipe.transformer.to(torch.float32)
    release(ctx.device)
    with policy_on(ctx) as policy:
        params = student(policy)
        short = ctx.suite.text_lengths[0]
        name = f"fp32 weights and compute, checkpointing {on_off(results.default_checkpointing)}, T5 {short}"
        results.costs.append(step_cost(ctx, policy, params, name, precision="fp32",
                                       checkpointing=results.default_checkpointing, text_length=short))


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def gb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value / 1e9:.2f}"


def flop(value: float) -> str:
    return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def target_head(ctx: Context) -> str:
    """"Target (issue 21)", which bench/run_all.py reads; under --tiny a "Check" it ignores (a toy model's)."""
    return "Check (--tiny, the code path only; no target)" if ctx.suite.tiny else "Target (issue 21)"


def verdict_line(ctx: Context, what: str, met: bool, value: str) -> str:
    return f"{target_head(ctx)}: {what}: **{'met' if met else 'MISSED'}** ({value})"


def _git(*args: str) -> str:
    """git's output in the repository; "" where there is no git or no repository (a copy of the tree)."""
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return out.stdout.rstrip() if out.returncode == 0 else ""


def text_tokens(ctx: Context, length: int) -> tuple[int, int]:
    """(CLIP tokens, T5 tokens) the transformer sees at T5 length ``length``."""
    total = ctx.caches[length].encode(ctx.prompts.texts[:1]).prompt_embeds.shape[1]
    return total - length, length


def header(ctx: Context, build_seconds: float, commit: str = "") -> list[str]:
    suite, device = ctx.suite, ctx.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                 f"TF32 matmul {on_off(torch.backends.cuda.matmul.allow_tf32)}")
    else:
        where = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads"
    versions = ", ".join(f"{name} {__import__(name).__version__}" for name in ("diffusers", "peft", "transformers"))
    dirty = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    commit = (_git("rev-parse", "--short", "HEAD") or commit or "unknown") + (
        f" plus uncommitted changes to {', '.join(dirty[:6])}{' ...' if len(dirty) > 6 else ''}" if dirty else "")
    config = ctx.pipe.transformer.config
    params = sum(p.numel() for p in ctx.pipe.transformer.parameters())
    image_tokens = (suite.resolution // ctx.pipe.vae_scale_factor // config.patch_size) ** 2
    clip, t5 = text_tokens(ctx, suite.text_lengths[0])
    model = ("the mini-world's unit-test pipeline (TEST_CONFIG, pixel space)" if suite.tiny else
             "an SD3.5-Medium-shaped MMDiT-X (flowopd_core.models.sd35_shaped, random weights)")
    return [
        f"Device: {where}. torch {torch.__version__}, {versions}, Python {platform.python_version()}.",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Commit: {commit}.",
        f"Model: {model}, {config.num_layers} blocks, {params / 1e6:,.1f} M transformer parameters in bfloat16, "
        f"built in {build_seconds:.0f} s; {suite.resolution} px = {image_tokens} image tokens next to {clip} CLIP + "
        f"{t5} T5 text tokens; {suite.steps} SDE steps ({int(suite.steps * 0.99)} trained), CFG {CFG_SCALE}; "
        f"precision {PRECISION} (autocast; LoRA weights, gradients, AdamW state, SDE arithmetic and losses fp32).",
        f"Every figure: the median of {suite.repeats} runs after {suite.warmup} warm-up; memory: "
        f"{memory_kind(ctx.device)} over a scenario's warm-up and runs, resident base included (GB = 1e9 bytes).",
    ]


def iteration_row(label: str, r: Iteration, base: Iteration, with_images: bool = False) -> str:
    images = f" {r.images} |" if with_images else ""
    return (f"| {label} | {r.batch} |{images} {on_off(r.checkpointing)} | {r.seconds:.2f} | {r.sampling:.2f} | "
            f"{r.images_per_second:.2f} | {r.images_per_second / base.images_per_second:.2f} | {gb(r.peak)} | "
            f"{r.peak / base.peak:.2f} |")


def iteration_lines(ctx: Context, grpo: Iteration, opd: Iteration) -> list[str]:
    ratio = opd.peak / grpo.peak
    return [
        "### 1. Flow-GRPO and Flow-OPD iterations",
        "",
        f"{grpo.images} images per iteration at each trainer's default batch size (GRPO: 4 samples per prompt, "
        f"beta 0.04 = one reference forward per trained step, 2 optimizer steps; OPD: 2 samples per prompt, K=3 "
        f"teacher adapters (rank 32) + an anchor adapter, MAR 0.04, targets once per rollout in mixed-adapter "
        f"batches, 1 optimizer step); checkpointing auto.",
        "",
        "| iteration | batch | checkpointing | s / iteration | of which sampling s | images / s | ratio "
        "| peak memory GB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        iteration_row("Flow-GRPO, one LoRA policy", grpo, grpo),
        iteration_row("Flow-OPD, K=3 teacher adapters + anchor adapter on one base", opd, grpo),
        "",
        verdict_line(ctx, f"OPD peak memory with K=3 + anchor <= {MEMORY_TARGET}x a single-policy GRPO iteration",
                     ratio <= MEMORY_TARGET, f"{ratio:.2f}x"),
        "",
    ]


def step_lines(ctx: Context, results: StepResults) -> list[str]:
    peak, source = peak_tflops(ctx.device)
    f = results.flops[ctx.suite.text_lengths[0]]
    lines = [
        "### 2. Training forward + backward: precision, checkpointing, text length, MFU",
        "",
        f"One CFG velocity of {ctx.suite.micro_batch} images ({2 * ctx.suite.micro_batch} transformer rows) on "
        f"random latents with the student LoRA (rank 16) active: the no-grad forward (as in sampling and the "
        f"targets) and the forward + backward of a training step.",
        "",
        f"FLOPs per image at T5 {ctx.suite.text_lengths[0]}, from the shapes: linear layers = sum of 2 x in x out x "
        f"rows over every nn.Linear (LoRA included; rows = the tokens each sees, by forward hooks) = "
        f"{flop(f.linear)}; attention = 2 CFG rows x (4 x tokens^2 x width x blocks + 4 x image tokens^2 x width x "
        f"MMDiT-X blocks) = {flop(f.attention)}; forward = {flop(f.forward)}; training forward + backward = 2 x "
        f"linear + 3 x attention = {flop(f.train)} (the base is frozen: its backward computes input gradients "
        f"only; an overcount of about 1 % at 24 blocks: block 0's input projections and the "
        f"embedders need none; checkpointing's recompute is not counted); the 6ND convention (3 x forward) = "
        f"{flop(f.convention)}. Cross-check: torch.utils.flop_counter counts {flop(results.counted)} for one "
        f"image's forward + backward without checkpointing"
        + (" (on the CPU it does not see the fused attention kernel)." if ctx.device.type != "cuda" else "."),
        "MFU = FLOPs x images / seconds / peak; peak: "
        + (f"{peak:.0f} TFLOP/s dense bf16 ({source})." if peak else f"none ({source}): MFU skipped."),
        "",
        "| setting | text tokens | forward s | forward + backward s | images / s (train) | peak memory GB "
        "| MFU (train) | MFU (train, 6ND) | MFU (forward) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mfu = {}
    for cost in results.costs:
        g = results.flops[cost.text_length]
        if peak and cost.name.startswith("bf16") and not cost.note:
            mfu[cost.name] = g.train * cost.samples / cost.train / (peak * 1e12)
            shares = (f"{mfu[cost.name]:.1%} | {g.convention * cost.samples / cost.train / (peak * 1e12):.1%} | "
                      f"{g.forward * cost.samples / cost.forward / (peak * 1e12):.1%}")
        else:
            shares = "- | - | -"
        if cost.note:
            lines.append(f"| {cost.name} | {cost.text_tokens} | {cost.note} | | | | {shares} |")
        else:
            lines.append(f"| {cost.name} | {cost.text_tokens} | {cost.forward:.3f} | {cost.train:.3f} | "
                         f"{cost.samples / cost.train:.2f} | {gb(cost.peak)} | {shares} |")
    if results.fp32_note:
        lines.append(f"| {results.fp32_note} | | | | | | - | - | - |")
    default = results.costs[0].name
    lines.append("")
    if default in mfu:
        lines.append(verdict_line(ctx, f"training forward+backward MFU >= {MFU_TARGET:.0%} in bf16",
                                  mfu[default] >= MFU_TARGET, f"{mfu[default]:.1%} at the default settings"))
    else:
        why = source if not peak else "the default step ran out of memory"
        lines.append(f"{target_head(ctx)}: training forward+backward MFU >= {MFU_TARGET:.0%} in bf16: not measured "
                     f"({why}).")
    return lines + [""]


def authors_lines(ctx: Context, authors: Iteration | None, ours: Iteration, large: Iteration | None,
                  notes: list[str]) -> list[str]:
    clip, t5 = text_tokens(ctx, ctx.suite.text_lengths[0])
    lines = [
        "### 3. The authors' loop structure at their shapes vs ours",
        "",
        f"Both sides: {ctx.suite.images} images per iteration (ours at the largest batch: as many as the batch), "
        f"{ctx.suite.resolution} px, text {clip} + {t5} tokens (the authors pad to 77 + 128), K=3 teachers with "
        f"hard routing, MAR 0.04, {ctx.suite.steps} steps. The authors' structure (AuthorsLoop, bench/bench_opd.py): "
        f"each teacher a whole bf16 transformer copy, the anchor the policy with adapters off (their default), "
        f"per trained step the student, routed-teacher and anchor CFG forwards inside the training loop, their "
        f"micro-batch {ctx.suite.authors_batch} for sampling and training, no checkpointing (Flow-GRPO's "
        f"scripts/train_sd3.py enables none). Ours: OPDTrainer with teacher and anchor adapters on one base.",
        "",
    ]
    if authors is None:
        return lines + ["The authors' structure did not run: " + "; ".join(notes) + ".",
                        "", f"{target_head(ctx)}: our OPD images/s >= {SPEED_TARGET}x the authors' structure at their "
                        "shapes: not measured (their structure ran out of memory).", ""]
    rows = [("the authors' structure", authors), ("ours, default settings (OPDConfig)", ours)]
    if large is not None:
        rows.append((f"ours, the largest batch that fits of {list(ctx.suite.batch_candidates)}", large))
    best = max((r for _, r in rows[1:]), key=lambda r: r.images_per_second)
    ratio = best.images_per_second / authors.images_per_second
    lines += [
        "| loop | batch | images / iteration | checkpointing | s / iteration | of which sampling s | images / s "
        "| ratio | peak memory GB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(iteration_row(label, r, authors, with_images=True) for label, r in rows),
    ]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += ["", verdict_line(ctx, f"our OPD images/s >= {SPEED_TARGET}x the authors' structure at their shapes",
                               ratio >= SPEED_TARGET, f"{ratio:.2f}x, ours at batch {best.batch}"), ""]
    return lines


class Report:
    """The Markdown so far; written to ``path`` after every section (marked incomplete until :meth:`done`)."""

    def __init__(self, path: Path, title: str) -> None:
        self.path, self.title, self.lines = path, title, []

    def add(self, lines: list[str]) -> None:
        self.lines += lines
        self.write("\n\n_Incomplete: the run has not finished (or was cut short)._")

    def write(self, tail: str = "") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"# {self.title}\n\n" + "\n".join(self.lines).rstrip() + tail + "\n")

    def done(self) -> None:
        self.write()
        print("\n".join(self.lines).rstrip())


# ----------------------------------------------------------------------------------------------------------


def run(suite: Suite, device: torch.device, output: Path, commit: str = "") -> None:
    """Every measurement, in an order that keeps the base in bf16 until the fp32 one (last) and the optional,
    budget-checked figures late; the report is rewritten after each section."""
    ctx = build(suite, device)
    ctx.log("built the pipeline")
    report = Report(output, "GPU suite (issue 21)" + (": --tiny CPU check" if suite.tiny else ""))
    report.add(["Written by `python bench/gpu_suite.py" + (" --tiny" if suite.tiny else "") + "`; rerun it rather "
                "than editing this file.", "", *header(ctx, ctx.elapsed(), commit), ""])
    spent = {"build": ctx.elapsed()}
    clock = time.perf_counter()
    grpo = grpo_iteration(ctx)
    opd = opd_iteration(ctx, "OPD (ours, defaults)", suite.images)
    report.add(iteration_lines(ctx, grpo, opd))
    spent["GRPO + OPD"], clock = time.perf_counter() - clock, time.perf_counter()
    steps = step_costs(ctx)
    report.add(step_lines(ctx, steps))
    spent["steps"], clock = time.perf_counter() - clock, time.perf_counter()
    authors, notes = authors_iteration(ctx)
    spent["authors"], clock = time.perf_counter() - clock, time.perf_counter()
    large, batch_notes = largest_batch(ctx, opd)
    report.add(authors_lines(ctx, authors, opd, large, notes + batch_notes))
    spent["largest batch"], clock = time.perf_counter() - clock, time.perf_counter()
    fp32_step_cost(ctx, steps)
    _replace_section(report, "### 2.", step_lines(ctx, steps))
    spent["fp32"] = time.perf_counter() - clock
    report.add([f"Suite wall time {ctx.elapsed():.0f} s (budget {suite.budget:.0f} s): "
                + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in spent.items()) + "."])
    report.done()


def _replace_section(report: Report, heading: str, lines: list[str]) -> None:
    """Swap the section starting with ``heading`` (up to the next ``###``) for ``lines``."""
    start = next(i for i, line in enumerate(report.lines) if line.startswith(heading))
    end = next((i for i in range(start + 1, len(report.lines)) if report.lines[i].startswith("### ")),
               len(report.lines))
    report.lines[start:end] = lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU check: a tiny model, same code path")
    parser.add_argument("--output", help=f"Markdown file (default {DEFAULT_OUTPUT.relative_to(ROOT)}; with --tiny "
                                         "a file in the temporary directory)")
    parser.add_argument("--layers", type=int, help="transformer blocks of the SD3.5-shaped model (default 24)")
    parser.add_argument("--repeats", type=int, help="timed runs per figure after the warm-up (default 3)")
    parser.add_argument("--images", type=int, help="images per iteration (default 16; a multiple of 4)")
    parser.add_argument("--batch-candidates", help="batches tried for 'ours at the largest batch', e.g. 32,64")
    parser.add_argument("--commit", default="", help="the commit to record where the tree has no git repository "
                                                     "(a copy on another machine)")
    parser.add_argument("--budget", type=float, help="seconds: later, optional figures that would overrun it are "
                                                     "skipped (default 420)")
    args = parser.parse_args(argv)
    suite = TINY if args.tiny else Suite()
    changes = {key: value for key, value in (("layers", args.layers), ("repeats", args.repeats),
                                             ("images", args.images), ("budget", args.budget)) if value is not None}
    if args.batch_candidates:
        changes["batch_candidates"] = tuple(int(b) for b in args.batch_candidates.split(","))
    suite = replace(suite, **changes)
    if suite.images % 4 or suite.images < 4 or suite.repeats < 1:
        parser.error("--images must be a positive multiple of 4 and --repeats >= 1")
    if args.tiny:
        output = Path(args.output) if args.output else Path(tempfile.gettempdir()) / "flowopd-gpu-suite-tiny.md"
        if output.resolve() == DEFAULT_OUTPUT.resolve():
            parser.error(f"--tiny never writes {DEFAULT_OUTPUT.relative_to(ROOT)} (its figures are a toy model's)")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_suite.py needs a CUDA device (none is visible); `python bench/gpu_suite.py --tiny` "
                  "runs the CPU check.", file=sys.stderr)
            return 2
        output = Path(args.output) if args.output else DEFAULT_OUTPUT
        device = torch.device("cuda", torch.cuda.current_device())
    run(suite, device, output, args.commit)
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
