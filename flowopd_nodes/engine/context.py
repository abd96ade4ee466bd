"""What a running node may ask of its host (runner or ComfyUI): where to write, how to report progress.

ComfyUI calls ``node.run(**inputs)`` with nothing else, so the host sets a :class:`NodeContext` in a
context variable around each call; nodes read it with :func:`current`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Progress(Protocol):
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class _NullProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _null_progress(total: int, desc: str) -> Progress:
    return _NullProgress()


@dataclass
class NodeContext:
    """Per-call host services.

    ``artifact_dir``: an empty folder owned by this call; files written here are the node's artifacts and
    are kept with its cache entry (written atomically: a failed call leaves nothing behind).
    ``progress(total, desc)``: a progress reporter (tqdm in the runner, ProgressBar in ComfyUI).
    ``metrics(dict)``: live scalar metrics (logged by the runner, websocket events in ComfyUI).
    ``checkpoint_dir``: a folder that survives a failed or killed call (same node, same inputs), for long nodes
    to resume from; the host deletes it once the call has succeeded. None where the host keeps none.
    """

    node_id: str
    artifact_dir: Path
    run_dir: Path
    progress: Callable[[int, str], Progress] = _null_progress
    metrics: Callable[[dict[str, Any]], None] = lambda values: None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("flowopd"))
    checkpoint_dir: Path | None = None


_CURRENT: contextvars.ContextVar[NodeContext | None] = contextvars.ContextVar("flowopd_node_context", default=None)


def current() -> NodeContext:
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("no FlowOPD node context is set: nodes run through the runner or the ComfyUI adapter")
    return ctx


@contextlib.contextmanager
def use(ctx: NodeContext) -> Iterator[NodeContext]:
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
