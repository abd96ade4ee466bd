"""Shared machinery of the trainers that optimise ONE LoRA adapter of a :class:`~flowopd_core.policy.Policy` by
sampling epochs (Flow-GRPO teachers, the Flow-OPD student): adapter creation, AdamW over the adapter's LoRA
parameters only, EMA of the LoRA weights, the trainer's own random generator, CFG velocities with the text
cache, the epoch loop, and exact, atomic checkpoints (safetensors + JSON only).

A subclass implements :meth:`LoraTrainer.epoch` and names its checkpoint format ``STATE_FORMAT``. Everything
random must come from ``self.generator`` (its state is checkpointed): then a resumed run repeats the
uninterrupted one bit for bit on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from flowopd_core.checkpoint import read_checkpoint, write_checkpoint
from flowopd_core.distributed import World
from flowopd_core.ema import EMA
from flowopd_core.pipeline import TextEmbeddingCache, TextEmbeddings, velocity
from flowopd_core.policy import LoraSpec, Policy
from flowopd_core.prompts import PromptSpec
from flowopd_core.samplers import flow_sigmas, noisy_steps


class TrainerConfig(Protocol):
    """The fields :class:`LoraTrainer` reads from a trainer's frozen config dataclass."""

    steps: int
    trainable_steps: int
    kind: str
    noise_level: float
    min_step_std: float
    guidance_scale: float
    lr: float
    weight_decay: float
    ema_decay: float
    ema_every: int
    lora_rank: int
    lora_alpha: float
    epochs: int
    seed: int
    max_bad_steps: int

    def to_json(self) -> dict[str, Any]: ...


def range_errors(
    config: Any, *, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
    positive: tuple[str, ...] = (),
) -> list[str]:
    """Messages for the fields of ``config`` outside their range (NaN fails every check)."""
    errors = [f"{n} must be >= 1, got {getattr(config, n)}" for n in at_least_one if not getattr(config, n) >= 1]
    errors += [f"{n} must be >= 0, got {getattr(config, n)}" for n in non_negative if not getattr(config, n) >= 0]
    errors += [f"{n} must be > 0, got {getattr(config, n)}" for n in positive if not getattr(config, n) > 0]
    return errors


@dataclass
class TrainerState:
    """A checkpoint: ``tensors`` (LoRA, EMA, optimizer moments, generator state as uint8) for safetensors and
    ``meta`` (format, epoch, step counts, config, optimizer hyper-parameters) for JSON."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


STATE_TENSORS = "trainer_state.safetensors"
STATE_META = "trainer_state.json"


class LoraTrainer:
    """Trains the LoRA adapter ``adapter_name`` of ``policy`` (on ``pipe.transformer``) epoch by epoch.

    The adapter is created (rank/alpha of the config, zero-init B: starts as the base, A drawn from the
    config's seed) unless it exists, in which case it is trained as it is. Only its LoRA parameters are
    optimised (AdamW); the base and every other adapter stay frozen.
    """

    STATE_FORMAT: ClassVar[str] = ""
    FREE_CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("epochs",)
    """Config fields a checkpoint may differ in (they do not change the results)."""

    def __init__(self, pipe: StableDiffusion3Pipeline, policy: Policy, adapter_name: str, config: TrainerConfig) -> None:
        self.pipe, self.policy, self.adapter, self.config = pipe, policy, adapter_name, config
        self.sigmas = flow_sigmas(config.steps, scheduler=pipe.scheduler).to(policy.device)
        noisy = noisy_steps(self.sigmas, config.noise_level, config.kind, config.min_step_std)
        # the steps samples may be trained on: below trainable_steps (train_fraction), noise std >= min_step_std
        self.trained_steps = tuple(j for j in noisy if j < config.trainable_steps)
        if not self.trained_steps:
            raise ValueError(f"no step to train: none of the steps below {config.trainable_steps} (train_fraction) "
                             f"has a transition noise std >= min_step_std {config.min_step_std} (kind "
                             f"{config.kind!r}, noise_level {config.noise_level}, {config.steps} steps)")
        if adapter_name not in policy.adapters:
            with torch.random.fork_rng(devices=[]):  # LoRA A is drawn from the seed, not the global RNG
                torch.manual_seed(config.seed)
                policy.add_adapter(adapter_name, LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha))
        policy.set_active(adapter_name)
        self.params = policy.adapter_parameters(adapter_name)
        trainable = policy.trainable_parameters(adapter_name)
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMA(self.params, config.ema_decay, config.ema_every) if config.ema_decay > 0 else None
        self.cache = TextEmbeddingCache(pipe)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._local_generator = self.generator  # this epoch's per-rank draws (see _epoch_generator)
        self.world = World.current()
        if getattr(config, "prompts_per_epoch", self.world.size) < self.world.size:
            raise ValueError(f"prompts_per_epoch {config.prompts_per_epoch} must be >= the {self.world.size} "
                             "processes (each samples a share of the epoch's prompts)")
        self.epoch_index = 0
        self.optimizer_steps = 0
        self.bad_streak = 0  # consecutive skipped optimizer steps (checkpointed)
        self.skipped_steps = 0  # skipped steps of the current epoch (the subclass resets it per epoch)

    # ------------------------------------------------------------------------------------------- forwards

    def _conditioning(self, specs: list[PromptSpec]) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        cond = self.cache.encode([p.text for p in specs])
        return cond, (self.cache.negative(len(specs)) if self.config.guidance_scale != 1.0 else None)

    def _velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: TextEmbeddings,
                  uncond: TextEmbeddings | None, adapter_names: list[str] | None = None) -> torch.Tensor:
        return velocity(self.policy, x, t, cond, uncond, self.config.guidance_scale, adapter_names=adapter_names)

    def _optimizer_step(self) -> float | None:
        """Clip the gradient norm (``config.grad_clip``, 0 = none), step AdamW and the EMA; returns the pre-clip
        norm. A non-finite norm skips the step instead (:meth:`_skip_step`) and returns None."""
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), getattr(self.config, "grad_clip", 0) or float("inf"))
        if not torch.isfinite(norm):
            self._skip_step(f"gradient norm {float(norm)}")
            return None
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.params, self.optimizer_steps)
        self.optimizer_steps += 1
        self.bad_streak = 0
        return float(norm)

    def _skip_step(self, why: str) -> None:
        """Do not take this optimizer step (a non-finite loss, gradient norm or an epoch without one finite
        reward): the gradients are dropped, parameters, optimizer and EMA stay as they are; counted in
        ``skipped_steps``. After ``config.max_bad_steps`` consecutive skipped steps raise FloatingPointError."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_streak += 1
        limit = getattr(self.config, "max_bad_steps", 1)
        if self.bad_streak >= limit:
            raise FloatingPointError(
                f"{self.bad_streak} consecutive optimizer steps skipped for non-finite values at epoch "
                f"{self.epoch_index} (last: {why}; max_bad_steps = {limit})"
            )

    # ------------------------------------------------------------------------------------------- data parallel

    def _epoch_generator(self) -> torch.Generator:
        """The generator of this epoch's per-rank draws (initial and SDE noise, trained steps, shuffles): the
        shared one in a single process; with several processes a fresh one per rank, seeded from one draw of
        the shared generator (which so stays in step on every rank: a resumed run redraws the same)."""
        if self.world.size == 1:
            self._local_generator = self.generator
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self._local_generator = torch.Generator(self.generator.device).manual_seed(seed + self.world.rank)
        return self._local_generator

    def _gather_groups(self, values: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
        """``values`` ``(local samples, ...)`` of this rank's share of ``groups`` groups -> the whole epoch's
        ``(groups * group_size, ...)`` in group order, on every rank (identity in a single process)."""
        return self.world.all_gather_cat(values, self.world.shard_sizes(groups, group_size))

    def _update_parts(self, order: torch.Tensor) -> list[torch.Tensor]:
        """The epoch's optimizer-step parts of the shuffled (local) samples ``order``: the non-empty ones of
        ``updates_per_epoch`` in a single process; all of them with several processes (a part may be empty on
        one rank: every rank still takes part in each step)."""
        parts = order.tensor_split(self.config.updates_per_epoch)
        return list(parts) if self.world.size > 1 else [p for p in parts if len(p)]

    def _finish_update(self, samples: int, bad: str) -> float | None:
        """After one part's backward passes (``samples`` of this rank's samples; ``bad``: why this rank's loss
        is unusable, "" if it is fine): average the gradients over the ranks (weighted by samples), then step
        or skip. Returns the pre-clip gradient norm, None if no step was taken."""
        if self.world.size > 1:
            grads = [p.grad if p.grad is not None and not bad else torch.zeros_like(p) for p in self.params.values()]
            flat = torch.cat([g.detach().reshape(-1).float() for g in grads]) * samples
            extra = torch.tensor([float(samples), float(bool(bad))], device=flat.device)
            total = self.world.all_reduce(torch.cat([flat, extra]))
            count, bad_ranks = float(total[-2]), float(total[-1])
            if bad_ranks:
                return self._skip_step(bad or "a non-finite loss on another process")
            if count == 0:  # no process had samples in this part (a single process skips such parts)
                self.optimizer.zero_grad(set_to_none=True)
                return None
            mean = total[:-2] / count
            offset = 0
            for p in self.params.values():
                p.grad = mean[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()
        elif bad:
            return self._skip_step(bad)
        return self._optimizer_step()

    def _reduce_log(self, log: dict[str, Any], means: Sequence[str], maxes: Sequence[str] = (),
                    sums: Sequence[str] = ()) -> None:
        """With several processes, turn ``log``'s per-rank lists ``means`` into one-element lists holding the
        mean over all ranks (empty if no rank has a value), ``maxes`` / ``sums`` (numbers) into their max / sum
        over ranks: the epoch metrics are then the whole epoch's and the same on every rank."""
        if self.world.size == 1:
            return
        flat = [float(v) for key in means for v in (sum(log[key]), len(log[key]))] + [float(log[k]) for k in sums]
        total = self.world.all_reduce(torch.tensor(flat, dtype=torch.float64)).tolist()
        for i, key in enumerate(means):
            value, count = total[2 * i], total[2 * i + 1]
            log[key] = [value / count] if count else []
        for i, key in enumerate(sums):
            log[key] = type(log[key])(total[2 * len(means) + i])
        if maxes:
            top = self.world.all_reduce(torch.tensor([float(log[k]) for k in maxes], dtype=torch.float64), "max")
            for key, value in zip(maxes, top.tolist()):
                log[key] = value

    # ------------------------------------------------------------------------------------------- loop

    def epoch(self) -> Any:
        """One sampling epoch plus its optimizer steps; advances ``epoch_index``; returns its metrics."""
        raise NotImplementedError

    def train(self, callback: Callable[[Any], bool | None] | None = None) -> list[Any]:
        """Run epochs until ``config.epochs`` (counting resumed ones); ``callback(metrics)`` after each (e.g. to
        log or checkpoint) may return True to stop early."""
        history = []
        while self.epoch_index < self.config.epochs:
            history.append(self.epoch())
            if callback is not None and callback(history[-1]):
                break
        return history

    # ------------------------------------------------------------------------------------------- EMA, adapter

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA LoRA weights by peft parameter name (the live weights when EMA is off); copies."""
        if self.ema is None:
            return {name: p.detach().clone() for name, p in self.params.items()}
        return self.ema.state_dict()

    @contextmanager
    def use_ema(self) -> Iterator[None]:
        """Inside the block the adapter holds its EMA weights (for evaluation); restored afterwards."""
        with self.ema.swapped_in(self.params) if self.ema is not None else nullcontext():
            yield

    def save_adapter(self, directory: str | Path, ema: bool = True) -> Path:
        """Write the adapter (EMA weights by default) in peft's format (see :meth:`Policy.save_adapter`)."""
        with self.use_ema() if ema else nullcontext():
            return self.policy.save_adapter(self.adapter, directory)

    # ------------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> TrainerState:
        """Everything a resumed run needs (between epochs): LoRA, optimizer, EMA, generator, counters, config."""
        tensors = {f"lora/{name}": p.detach().clone() for name, p in self.params.items()}
        if self.ema is not None:
            tensors.update({f"ema/{name}": t for name, t in self.ema.state_dict().items()})
        optim = self.optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        names = {index[id(p)]: name for name, p in self.params.items()}
        scalars: dict[str, dict[str, Any]] = {}
        for i, entry in optim["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{names[i]}/{key}"] = value.detach().clone()
                else:
                    scalars.setdefault(names[i], {})[key] = value
        tensors["rng/generator"] = self.generator.get_state()
        meta = {
            "format": self.STATE_FORMAT,
            "adapter": self.adapter,
            "epoch": self.epoch_index,
            "optimizer_steps": self.optimizer_steps,
            "bad_streak": self.bad_streak,
            "world_size": self.world.size,
            "config": self.config.to_json(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim["param_groups"]],
            "optimizer_scalars": scalars,
        }
        return TrainerState(tensors=tensors, meta=json.loads(json.dumps(meta)))

    def load_state_dict(self, state: TrainerState) -> None:
        """Restore a :meth:`state_dict`. The config must match except ``FREE_CONFIG_KEYS`` (they do not change
        the results); the adapter's parameter names must be the same."""
        meta, tensors = state.meta, state.tensors
        if meta.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not a {type(self).__name__} state: format {meta.get('format')!r} (want {self.STATE_FORMAT!r})")
        saved, current = dict(meta["config"]), self.config.to_json()
        free = self.FREE_CONFIG_KEYS
        diff = sorted(k for k in set(saved) | set(current) if k not in free and saved.get(k) != current.get(k))
        if diff:
            raise ValueError(f"trainer state was saved with a different config: {diff}")
        lora = {k.removeprefix("lora/"): v for k, v in tensors.items() if k.startswith("lora/")}
        if set(lora) != set(self.params):
            raise KeyError(f"saved LoRA parameters differ from adapter {self.adapter!r}'s")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(lora[name])
        if self.ema is not None:
            self.ema.load_state_dict({k.removeprefix("ema/"): v for k, v in tensors.items() if k.startswith("ema/")})
        order = {id(p): i for i, p in enumerate(self.optimizer.param_groups[0]["params"])}
        optim_state: dict[int, dict[str, Any]] = {}
        for name, p in self.params.items():
            entry = {key.rsplit("/", 1)[1]: v for key, v in tensors.items() if key.startswith(f"optimizer/{name}/")}
            entry.update(meta["optimizer_scalars"].get(name, {}))
            if entry:
                optim_state[order[id(p)]] = entry
        groups = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in meta["param_groups"]]
        for group, live in zip(groups, self.optimizer.state_dict()["param_groups"]):
            group["params"] = live["params"]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        self.generator.set_state(tensors["rng/generator"])
        self.epoch_index = int(meta["epoch"])
        self.optimizer_steps = int(meta["optimizer_steps"])
        self.bad_streak = int(meta.get("bad_streak", 0))



def state_files(state: TrainerState) -> dict[str, bytes]:
    """``state`` as checkpoint files: ``trainer_state.safetensors`` (tensors) and ``trainer_state.json`` (meta)."""
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    return {
        STATE_TENSORS: safetensors_save(tensors, metadata={"format": "pt"}),
        STATE_META: json.dumps(state.meta, indent=1).encode(),
    }


def state_from_files(files: Mapping[str, bytes]) -> TrainerState:
    """The inverse of :func:`state_files` (extra files are ignored)."""
    missing = [name for name in (STATE_TENSORS, STATE_META) if name not in files]
    if missing:
        raise KeyError(f"not a trainer state: {missing} missing")
    return TrainerState(tensors=safetensors_load(files[STATE_TENSORS]), meta=json.loads(files[STATE_META]))


def save_trainer_state(state: TrainerState, directory: str | Path) -> Path:
    """Write ``state`` into the checkpoint folder ``directory`` (atomic, with a verified manifest: see
    :mod:`flowopd_core.checkpoint`); an existing ``directory`` is replaced."""
    return write_checkpoint(directory, state_files(state), epoch=int(state.meta.get("epoch", 0)))


def load_trainer_state(directory: str | Path) -> TrainerState:
    """Read and verify a state written by :func:`save_trainer_state` (raises
    :class:`~flowopd_core.checkpoint.CheckpointError` for a broken or partial one)."""
    return state_from_files(read_checkpoint(directory).files)
