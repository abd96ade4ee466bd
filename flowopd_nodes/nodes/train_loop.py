"""The epoch loop every training node shares: progress, metrics events, resumable checkpoints."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from flowopd_core.lora_trainer import LoraTrainer, load_trainer_state, save_trainer_state
from flowopd_nodes import context


def _scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history entry, nested dicts flattened as ``key/name``."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def train_resumable(
    trainer: LoraTrainer,
    kind: str,
    label: str,
    checkpoint_every: int,
    record: Callable[[Any], dict[str, Any]],
    metric_keys: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Run ``trainer`` to ``config.epochs`` with a progress bar ("<kind> <label>").

    ``record(metrics)`` turns each epoch's metrics into a JSON-able dict (its ``metric_keys`` are sent as
    metrics events; all its numbers go to TensorBoard event files in ``<artifacts>/tensorboard``, view them with
    ``tensorboard --logdir runs/``). Every ``checkpoint_every`` epochs the trainer state and the history go to
    the node's checkpoint folder; a killed or failed run of the same node resumes from there (the scheduler
    removes it once the node succeeds). Returns the history."""
    ctx = context.current()
    history: list[dict[str, Any]] = []
    ckpt = ctx.checkpoint_dir
    if ckpt is not None and (ckpt / "state").is_dir():
        trainer.load_state_dict(load_trainer_state(ckpt / "state"))
        history = json.loads((ckpt / "history.json").read_text())[: trainer.epoch_index]
        ctx.log.info("resumed %s at epoch %d from %s", label, trainer.epoch_index, ckpt)
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
        if ckpt is not None and checkpoint_every and len(history) % checkpoint_every == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "history.json").write_text(json.dumps(history, default=str))
            save_trainer_state(trainer.state_dict(), ckpt / "state")
        bar.update(1)  # last: a Stop in ComfyUI raises here, after this epoch's checkpoint is on disk

    try:
        trainer.train(on_epoch)
    finally:
        bar.close()
        board.close()
    return history
