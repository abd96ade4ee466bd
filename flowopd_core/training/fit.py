"""fit(): run a LoRA trainer to its last epoch with resumable, verified checkpoints, signals and logging.

The same loop serves the graph nodes (which pass their run folder, progress bar and event sink) and a Python
user::

    from flowopd_core.training.fit import fit
    history = fit(trainer, checkpoint_dir="runs/my_teacher/ckpt", checkpoint_every=5)

- Every ``checkpoint_every`` epochs the trainer state and the history go to a verified checkpoint
  ``epoch_NNNNNN/`` in ``checkpoint_dir`` (:mod:`flowopd_core.training.checkpoint`; the newest ``keep`` are kept).
  A killed or failed run with the same ``checkpoint_dir`` resumes from the newest one that verifies, skipping
  broken ones with a warning; on the CPU it then repeats the uninterrupted run bit for bit.
- SIGTERM / SIGINT (in the main thread): the running epoch finishes, a checkpoint is written, then
  :class:`Interrupted`; a second signal stops at once.
- A run whose optimizer steps keep failing (non-finite values, ``max_bad_steps``) raises FloatingPointError
  naming the last good checkpoint.
- Several processes (data parallel, ``trainer.world``): all load the checkpoint process 0 picks; process 0
  alone writes checkpoints, after checking that every process holds the same LoRA weights (again at the end);
  a signal to any process stops all of them after the same epoch.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flowopd_core.training.base import STATE_META, LoraTrainer, state_files, state_from_files
from flowopd_core.training.checkpoint import CheckpointStore, read_checkpoint

HISTORY = "history.json"
"""The epoch history's file inside a checkpoint."""


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Interrupted(Exception):
    """Training stopped on a signal (``signum``) after ``epochs`` epochs; ``checkpoint``: the newest checkpoint
    on disk (None if there is none). Calling :func:`fit` again with the same ``checkpoint_dir`` resumes."""

    def __init__(self, signum: int, epochs: int, checkpoint: Path | None) -> None:
        self.signum, self.epochs, self.checkpoint = signum, epochs, checkpoint
        super().__init__(f"{signal.Signals(signum).name} after {epochs} epochs (checkpoint: {checkpoint})")


def _tqdm_progress(total: int, desc: str) -> Progress:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history entry, nested dicts flattened as ``key/name``."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


class _StopOnSignal:
    """While training runs in the main thread: the first SIGTERM/SIGINT asks for a stop at the end of the
    running epoch; a second one raises ``on_second(signum)`` at once. Elsewhere (ComfyUI runs nodes in a worker
    thread and has its own Stop) nothing is installed."""

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


def fit(
    trainer: LoraTrainer,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 5,
    keep: int = 2,
    record: Callable[[Any], dict[str, Any]] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    tensorboard_dir: str | Path | None = None,
    tensorboard_prefix: str = "train",
    progress: Callable[[int, str], Progress] | None = _tqdm_progress,
    label: str = "training",
    log: logging.Logger | None = None,
) -> list[dict[str, Any]]:
    """Run ``trainer`` to ``config.epochs`` (see the module doc); returns the history, one dict per epoch.

    checkpoint_dir: where checkpoints go and are resumed from (None: no checkpoints, no resume);
    checkpoint_every: epochs between checkpoints (0 = none; a signal still writes one); keep: checkpoints kept.
    record: epoch metrics -> a JSON-able dict (default: ``metrics.to_json()``); on_epoch(entry): called after each
    epoch (e.g. to send metrics events). tensorboard_dir: TensorBoard event files of every number of each entry
    (as ``<tensorboard_prefix>/<key>``; needs the ``tensorboard`` package). progress(total, desc): a progress bar
    factory (default tqdm; None = no bar). Raises :class:`Interrupted` on a signal, FloatingPointError after
    ``max_bad_steps`` consecutive bad optimizer steps.
    """
    log = log or logging.getLogger("flowopd")
    record = record or (lambda metrics: metrics.to_json())
    world = trainer.world
    history: list[dict[str, Any]] = []
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    store = CheckpointStore(checkpoint_dir, keep) if checkpoint_dir is not None else None
    last_good: list[Path | None] = [None]  # the newest checkpoint on disk
    if store is not None:
        found, skipped = store.latest()
        for path, why in skipped:
            log.warning("skipping broken checkpoint %s: %s", path, why)
        chosen = world.broadcast_int(found.epoch if found is not None else -1)  # process 0's choice
        if chosen >= 0 and (found is None or found.epoch != chosen):
            found = read_checkpoint(store.path(chosen))
        if chosen >= 0:
            last_good[0] = found.path
            trainer.load_state_dict(state_from_files(found.files))
            history = json.loads(found.files[HISTORY])[: trainer.epoch_index]
            log.info("resumed %s at epoch %d from %s", label, trainer.epoch_index, found.path)
            saved_by = json.loads(found.files[STATE_META]).get("world_size", 1)
            if saved_by != world.size:
                log.warning("the checkpoint was written by %d processes, this run has %d: it continues, but "
                            "no longer repeats an uninterrupted run bit for bit", saved_by, world.size)
        elif (checkpoint_dir / "state").is_dir():
            log.warning("ignoring %s: an unverified checkpoint of an older format", checkpoint_dir / "state")
    bar = progress(trainer.config.epochs, label) if progress is not None else None
    if bar is not None:
        bar.update(len(history))
    board = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(tensorboard_dir), purge_step=0)

    def to_board(entry: dict[str, Any], step: int) -> None:
        if board is not None:
            for key, value in scalars(entry).items():
                board.add_scalar(f"{tensorboard_prefix}/{key}", value, step)
            board.flush()

    for step, entry in enumerate(history):  # a resumed run re-logs the epochs it restored
        to_board(entry, step)

    def after_epoch(metrics: Any) -> None:
        entry = record(metrics)
        history.append(entry)
        if on_epoch is not None:
            on_epoch(entry)
        to_board(entry, len(history) - 1)
        if entry.get("skipped_steps"):
            log.warning("%s epoch %d: %d optimizer step(s) skipped for non-finite values", label,
                        len(history) - 1, entry["skipped_steps"])
        if store is not None and checkpoint_every and len(history) % checkpoint_every == 0:
            save()
        if world.any(stop.signum is not None):  # every process stops after the same epoch
            if store is not None and (last_good[0] is None or last_good[0] != store.path(trainer.epoch_index)):
                save()
            raise interrupted(stop.signum or signal.SIGTERM)
        if bar is not None:
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

    def interrupted(signum: int) -> Interrupted:
        log.warning("%s: %s", label, signal.Signals(signum).name)
        return Interrupted(signum, len(history), last_good[0])

    stop = _StopOnSignal(interrupted)
    try:
        with stop:
            trainer.train(after_epoch)
    except FloatingPointError as exc:
        where = f"the last good checkpoint, {last_good[0]}, is intact" if last_good[0] else "no checkpoint was written"
        raise FloatingPointError(f"{label}: {exc}; {where}: fix the cause (learning rate, rewards) and rerun the "
                                 "same command to resume") from exc
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    if world.size > 1:
        check_identical()
        log.info("%s: the %d processes hold identical LoRA weights", label, world.size)
    return history
