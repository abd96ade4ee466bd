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
- A stop inside an epoch (``should_stop()`` turning True or the progress bar's ``update`` raising, as ComfyUI's
  Stop does, both checked after each denoising step of a rollout, each backward pass and each optimizer step;
  a second signal) discards the unfinished epoch:
  the last completed epoch is checkpointed if it is not on disk yet (its state was copied to the CPU when it
  ended), nothing of the unfinished one is saved, and the trainer object is left mid-epoch. Calling fit again
  with a fresh trainer and the same ``checkpoint_dir`` resumes from that checkpoint and repeats the
  uninterrupted run bit for bit.
- The progress bar counts sampling batches and optimizer steps (``trainer.units_per_epoch()`` per epoch), so it
  moves within seconds even when an epoch takes minutes.
- A run whose optimizer steps keep failing (non-finite values, ``max_bad_steps``) raises FloatingPointError
  naming the last good checkpoint.
- Several processes (data parallel, ``trainer.world``): all load the checkpoint process 0 picks; process 0
  alone writes checkpoints, after checking that every process holds the same LoRA weights (again at the end);
  a signal to any process stops all of them after the same epoch; ``should_stop`` is polled (together) after
  each optimizer step only, and a failure or a second signal in one process writes no checkpoint.
"""

from __future__ import annotations

import contextlib
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
    """A progress bar: ``update(n)`` adds n units (``update(0)``: a point where the host may stop the work by
    raising, as ComfyUI's ProgressBar does on Stop); ``close()``."""

    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Interrupted(Exception):
    """Training stopped on a signal (``signum``; None: ``should_stop``) after ``epochs`` completed epochs;
    ``checkpoint``: the newest checkpoint on disk (None if there is none). Calling :func:`fit` again with the
    same ``checkpoint_dir`` resumes."""

    def __init__(self, signum: int | None, epochs: int, checkpoint: Path | None) -> None:
        self.signum, self.epochs, self.checkpoint = signum, epochs, checkpoint
        super().__init__(str(self))

    def __str__(self) -> str:  # the checkpoint may be written after the exception was made
        why = signal.Signals(self.signum).name if self.signum is not None else "stop requested"
        return f"{why} after {self.epochs} epochs (checkpoint: {self.checkpoint})"


class _StopRequested(Exception):
    """Raised between units when ``should_stop()`` turned True (on any process); fit turns it into Interrupted."""


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
    running epoch; a second one raises ``on_second(signum)`` at once (fit then checkpoints the last completed
    epoch if it is not on disk; the unfinished one is discarded). Elsewhere (ComfyUI runs nodes in a worker
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
              "(send it again to stop at once, keeping the last completed epoch)", file=sys.stderr, flush=True)

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
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, Any]]:
    """Run ``trainer`` to ``config.epochs`` (see the module doc); returns the history, one dict per epoch.

    checkpoint_dir: where checkpoints go and are resumed from (None: no checkpoints, no resume);
    checkpoint_every: epochs between checkpoints (0 = none; a signal or a stop still writes one); keep:
    checkpoints kept. record: epoch metrics -> a JSON-able dict (default: ``metrics.to_json()``); on_epoch(entry):
    called after each epoch (e.g. to send metrics events). tensorboard_dir: TensorBoard event files of every number
    of each entry (as ``<tensorboard_prefix>/<key>``; needs the ``tensorboard`` package). progress(total, desc): a
    progress bar factory (default tqdm; None = no bar), counting ``trainer.units_per_epoch()`` units (sampling
    batches and optimizer steps) per epoch, and ``update(0)`` at the checks in between; ``update`` may raise to
    stop training. should_stop(): polled at the same points (with several processes after each optimizer step
    only); True stops inside the epoch (module doc). Raises :class:`Interrupted` on a signal or a stop,
    FloatingPointError after ``max_bad_steps`` consecutive bad optimizer steps.
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
    units = max(trainer.units_per_epoch(), 1)
    bar = progress(trainer.config.epochs * units, label) if progress is not None else None
    shown = [0]  # units shown on the bar

    def show(target: int) -> None:
        if bar is not None and target > shown[0]:
            step, shown[0] = target - shown[0], target
            bar.update(step)  # may raise (ComfyUI's Stop)

    show(len(history) * units)
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

    # The last completed epoch when it is not on disk: (epochs, CPU copy of the state, history), written if
    # training stops inside the next epoch.
    pending: list[tuple[int, Any, list[dict[str, Any]]] | None] = [None]

    def on_unit(unit: str) -> None:
        if unit == "check":  # no progress; a host may raise from update(0) (ComfyUI's Stop does)
            if bar is not None:
                bar.update(0)
        else:
            show(min(shown[0] + 1, (len(history) + 1) * units))  # never past the running epoch's end
        if should_stop is not None and (unit == "step" or world.size == 1):  # every process polls together
            if world.any(bool(should_stop())):
                raise _StopRequested

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
        if store is not None and last_good[0] != store.path(trainer.epoch_index):
            state = trainer.state_dict()
            state.tensors = {k: v.to("cpu", copy=True) for k, v in state.tensors.items()}
            pending[0] = (trainer.epoch_index, state, list(history))  # one assignment: a signal sees old or new
        show(len(history) * units)  # last: a Stop in ComfyUI raises here, after this epoch is kept

    def save() -> None:
        check_identical()
        if world.is_main:
            files = {**state_files(trainer.state_dict()), HISTORY: json.dumps(history, default=str).encode()}
            store.save(trainer.epoch_index, files)
        world.barrier()  # the checkpoint is on disk for every process
        last_good[0] = store.path(trainer.epoch_index)
        pending[0] = None

    def save_pending() -> None:
        """Checkpoint the last completed epoch (a stop inside the next one), unless it is on disk already."""
        if pending[0] is None:
            return
        epochs, state, done = pending[0]
        if world.is_main:
            store.save(epochs, {**state_files(state), HISTORY: json.dumps(done, default=str).encode()})
        world.barrier()
        last_good[0], pending[0] = store.path(epochs), None
        log.info("%s: stopped during epoch %d (from 0), which is discarded; the %d completed epoch(s) are "
                 "checkpointed in %s", label, epochs, epochs, last_good[0])

    def check_identical() -> None:
        if not world.identical(list(trainer.params.values())):
            raise RuntimeError(f"the {world.size} processes' LoRA weights differ after epoch {trainer.epoch_index}")

    def interrupted(signum: int | None) -> Interrupted:
        log.warning("%s: %s", label, signal.Signals(signum).name if signum is not None else "stop requested")
        return Interrupted(signum, len(history), last_good[0])

    stop = _StopOnSignal(interrupted)
    trainer.on_unit = on_unit
    try:
        with stop:
            trainer.train(after_epoch)
    except FloatingPointError as exc:
        where = f"the last good checkpoint, {last_good[0]}, is intact" if last_good[0] else "no checkpoint was written"
        raise FloatingPointError(f"{label}: {exc}; {where}: fix the cause (learning rate, rewards) and rerun the "
                                 "same command to resume") from exc
    except _StopRequested:  # every process raised it at the same optimizer step
        save_pending()
        raise interrupted(None) from None
    except (Interrupted, KeyboardInterrupt, Exception) as exc:  # a second signal, ComfyUI's Stop, a failure
        if world.size == 1:  # with several processes the others may not be here: no collective write
            with contextlib.suppress(Exception):  # never hide why training stopped
                save_pending()
            if isinstance(exc, Interrupted):
                exc.epochs, exc.checkpoint = len(history), last_good[0]
        raise
    finally:
        trainer.on_unit = None
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    if world.size > 1:
        check_identical()
        log.info("%s: the %d processes hold identical LoRA weights", label, world.size)
    return history
