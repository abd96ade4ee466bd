"""The training nodes' wiring of :func:`flowopd_core.training.fit.fit`: the node's checkpoint folder, progress
bar, metrics events and TensorBoard folder, and its errors in the node's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowopd_nodes.engine import context
from flowopd_nodes.engine.errors import TrainingInterrupted
from flowopd_nodes.engine.ports import In

if TYPE_CHECKING:
    from flowopd_core.training.base import LoraTrainer

NEW_TRAINER_SETTINGS = ("lr_schedule",)
"""Trainer settings added after the settings companions: not among a trainer's ``LEGACY_WIDGETS`` (the flat
widget order of workflows saved before the settings moved)."""

CHECKPOINT_INPUTS = (
    In("checkpoint_every", "INT", 5, "epochs between resumable checkpoints (0 = none)", min=0, max=10**6),
    In("keep_checkpoints", "INT", 2, "checkpoints kept (the newest); a broken one is skipped on resume",
       min=1, max=10**4),
)
"""The checkpoint ports of every training node (passed on to :func:`train_resumable`)."""


def train_resumable(
    trainer: LoraTrainer,
    kind: str,
    label: str,
    checkpoint_every: int,
    record: Callable[[Any], dict[str, Any]],
    metric_keys: tuple[str, ...],
    keep: int = 2,
) -> list[dict[str, Any]]:
    """Run ``trainer`` with :func:`~flowopd_core.training.fit.fit` in the running node's folders: checkpoints in
    its checkpoint folder (the scheduler removes it once the node succeeds), TensorBoard files in
    ``<artifacts>/tensorboard`` (``tensorboard --logdir runs/``), a progress bar "<kind> <label>", and the
    ``metric_keys`` of each epoch's ``record(metrics)`` sent as metrics events. A signal becomes
    :class:`TrainingInterrupted` (the runner exits with 128 + the signal's number and says to rerun the same
    command). Returns the history."""
    from flowopd_core.training.fit import Interrupted, fit

    ctx = context.current()
    try:
        return fit(
            trainer, checkpoint_dir=ctx.checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep, record=record,
            on_epoch=lambda entry: ctx.metrics({k: entry[k] for k in metric_keys if k in entry}),
            tensorboard_dir=ctx.artifact_dir / "tensorboard", tensorboard_prefix=kind,
            progress=lambda total, _: ctx.progress(total, f"{kind} {label}"), label=label, log=ctx.log,
        )
    except Interrupted as exc:
        where = str(exc.checkpoint) if exc.checkpoint is not None else None
        raise TrainingInterrupted(ctx.node_id, exc.signum, exc.epochs, where) from None
    except FloatingPointError as exc:
        raise FloatingPointError(f"node {ctx.node_id} ({kind} {label}): "
                                 f"{str(exc).removeprefix(f'{label}: ')}") from exc.__cause__
