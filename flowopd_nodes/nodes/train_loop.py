"""The epoch loop every training node shares: progress, metrics events, resumable checkpoints."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from flowopd_core.checkpoint import CheckpointStore, read_checkpoint
from flowopd_core.lora_trainer import STATE_META, LoraTrainer, state_files, state_from_files
from flowopd_nodes import context
from flowopd_nodes.ports import In
from flowopd_nodes.errors import TrainingInterrupted

HISTORY = "history.json"

CHECKPOINT_INPUTS = (
    In("checkpoint_every", "INT", 5, "epochs between resumable checkpoints (0 = none)", min=0, max=10**6),
    In("keep_checkpoints", "INT", 2, "checkpoints kept (the newest); a broken one is skipped on resume",
       min=1, max=10**4),
)
"""The checkpoint ports of every training node (passed on to :func:`train_resumable`)."""

TRAINER_RANGES: dict[str, dict[str, Any]] = dict(
    prompts_per_epoch={"min": 1, "max": 100_000},
    steps={"min": 1, "max": 1000},
    resolution={"min": 0, "max": 8192},
    train_fraction={"min": 0.01, "max": 1.0},
    step_subset={"min": 0, "max": 1000},
    kind={"choices": ("sde", "cps")},
    noise_level={"min": 0.0, "max": 2.0},
    min_step_std={"min": 0.0, "max": 10.0},
    guidance_scale={"min": 0.0, "max": 50.0},
    logprob_reduce={"choices": ("mean", "sum")},
    clip_range={"min": 0.0, "max": 10.0},
    lr={"min": 0.0, "max": 1.0},
    weight_decay={"min": 0.0, "max": 1.0},
    grad_clip={"min": 0.0, "max": 1000.0},
    updates_per_epoch={"min": 1, "max": 1000},
    batch_size={"min": 1, "max": 4096},
    ema_decay={"min": 0.0, "max": 0.99999},
    ema_every={"min": 1, "max": 10_000},
    lora_rank={"min": 1, "max": 1024},
    lora_alpha={"min": 0.0, "max": 4096.0},
    epochs={"min": 1, "max": 10**7},
    seed={"min": 0, "max": 2**31 - 1},
    reward_workers={"min": 0, "max": 64},
    max_bad_steps={"min": 1, "max": 10**6},
)
"""Port ranges of the settings every trainer config shares (GRPO, OPD)."""


def _scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history entry, nested dicts flattened as ``key/name``."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class _StopOnSignal:
    """While a training node runs in the main thread: the first SIGTERM/SIGINT asks for a stop at the end of the
    running epoch (the loop then checkpoints and raises :class:`TrainingInterrupted`); a second one stops at
    once (TrainingInterrupted from wherever it lands; the last checkpoint on disk stays). Elsewhere (ComfyUI
    runs nodes in a worker thread and has its own Stop) nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_second: Callable[[int], BaseException]) -> None:
        self.signum: int | None = None
        self.on_second = on_second
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise self.on_second(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this epoch with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not set from Python


def train_resumable(
    trainer: LoraTrainer,
    kind: str,
    label: str,
    checkpoint_every: int,
    record: Callable[[Any], dict[str, Any]],
    metric_keys: tuple[str, ...],
    keep: int = 2,
) -> list[dict[str, Any]]:
    """Run ``trainer`` to ``config.epochs`` with a progress bar ("<kind> <label>").

    ``record(metrics)`` turns each epoch's metrics into a JSON-able dict (its ``metric_keys`` are sent as
    metrics events; all its numbers go to TensorBoard event files in ``<artifacts>/tensorboard``, view them with
    ``tensorboard --logdir runs/``). Every ``checkpoint_every`` epochs the trainer state and the history go to
    a verified checkpoint ``epoch_NNNNNN/`` in the node's checkpoint folder (:mod:`flowopd_core.checkpoint`;
    the newest ``keep`` are kept); a killed or failed run of the same node resumes from the newest one that
    verifies, skipping broken ones with a warning (the scheduler removes the folder once the node succeeds).
    SIGTERM / SIGINT: the running epoch finishes, a checkpoint is written, then :class:`TrainingInterrupted`
    (the runner exits with 128 + the signal's number and says to rerun the same command); a second signal stops
    at once.

    Several processes (data parallel, ``trainer.world``): all load the checkpoint process 0 picks; process 0
    alone writes checkpoints, after checking that every process holds the same LoRA weights (again at the end);
    a signal to any process stops all of them after the same epoch. Returns the history."""
    ctx = context.current()
    world = trainer.world
    history: list[dict[str, Any]] = []
    store = CheckpointStore(ctx.checkpoint_dir, keep) if ctx.checkpoint_dir is not None else None
    last_good: list[Path | None] = [None]  # the newest checkpoint on disk
    if store is not None:
        found, skipped = store.latest()
        for path, why in skipped:
            ctx.log.warning("skipping broken checkpoint %s: %s", path, why)
        chosen = world.broadcast_int(found.epoch if found is not None else -1)  # process 0's choice
        if chosen >= 0 and (found is None or found.epoch != chosen):
            found = read_checkpoint(store.path(chosen))
        if chosen >= 0:
            last_good[0] = found.path
            trainer.load_state_dict(state_from_files(found.files))
            history = json.loads(found.files[HISTORY])[: trainer.epoch_index]
            ctx.log.info("resumed %s at epoch %d from %s", label, trainer.epoch_index, found.path)
            saved_by = json.loads(found.files[STATE_META]).get("world_size", 1)
            if saved_by != world.size:
                ctx.log.warning("the checkpoint was written by %d processes, this run has %d: it continues, but "
                                "no longer repeats an uninterrupted run bit for bit", saved_by, world.size)
        elif (ctx.checkpoint_dir / "state").is_dir():
            ctx.log.warning("ignoring %s: an unverified checkpoint of an older format", ctx.checkpoint_dir / "state")
    bar = ctx.progress(trainer.config.epochs, f"{kind} {label}")
    bar.update(len(history))
    board = SummaryWriter(str(ctx.artifact_dir / "tensorboard"), purge_step=0)

    def log(entry: dict[str, Any], step: int) -> None:
        for key, value in _scalars(entry).items():
            board.add_scalar(f"{kind}/{key}", value, step)
        board.flush()

    for step, entry in enumerate(history):  # a resumed run re-logs the epochs it restored
        log(entry, step)

    def on_epoch(metrics: Any) -> None:
        entry = record(metrics)
        history.append(entry)
        ctx.metrics({k: entry[k] for k in metric_keys if k in entry})
        log(entry, len(history) - 1)
        if entry.get("skipped_steps"):
            ctx.log.warning("%s %s epoch %d: %d optimizer step(s) skipped for non-finite values", kind, label,
                            len(history) - 1, entry["skipped_steps"])
        if store is not None and checkpoint_every and len(history) % checkpoint_every == 0:
            save()
        if world.any(stop.signum is not None):  # every process stops after the same epoch
            if store is not None and (last_good[0] is None or last_good[0] != store.path(trainer.epoch_index)):
                save()
            raise interrupted(stop.signum or signal.SIGTERM)
        bar.update(1)  # last: a Stop in ComfyUI raises here, after this epoch's checkpoint is on disk

    def save() -> None:
        check_identical()
        if world.is_main:
            files = {**state_files(trainer.state_dict()), HISTORY: json.dumps(history, default=str).encode()}
            store.save(trainer.epoch_index, files)
        world.barrier()  # the checkpoint is on disk for every process
        last_good[0] = store.path(trainer.epoch_index)

    def check_identical() -> None:
        if not world.identical(list(trainer.params.values())):
            raise RuntimeError(f"the {world.size} processes' LoRA weights differ after epoch {trainer.epoch_index}")

    def interrupted(signum: int) -> TrainingInterrupted:
        ctx.log.warning("node %s: %s", ctx.node_id, signal.Signals(signum).name)
        where = str(last_good[0]) if last_good[0] is not None else None
        return TrainingInterrupted(ctx.node_id, signum, len(history), where)

    stop = _StopOnSignal(interrupted)
    try:
        with stop:
            trainer.train(on_epoch)
    except FloatingPointError as exc:
        where = f"the last good checkpoint, {last_good[0]}, is intact" if last_good[0] else "no checkpoint was written"
        raise FloatingPointError(f"node {ctx.node_id} ({kind} {label}): {exc}; {where}: fix the cause (learning "
                                 "rate, rewards) and rerun the same command to resume") from exc
    finally:
        bar.close()
        board.close()
    if world.size > 1:
        check_identical()
        ctx.log.info("%s %s: the %d processes hold identical LoRA weights", kind, label, world.size)
    return history
