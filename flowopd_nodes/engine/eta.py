"""The runner's estimate of the time a graph run has left (shown on its progress bar, written to status.json).

What it estimates, and from what:

- the nodes still to execute: predicted before the run from the cache (a node runs unless its cache entry for
  the keys its cached inputs give exists; everything downstream of a node that runs, runs too);
- the running node: from its own progress bar, (units left) x (seconds per unit measured so far in this call),
  the units being what the node counts (the Evaluator's images, a trainer's sampling batches and optimizer
  steps); before its first unit, from its previous execution's time;
- every node not started yet: the time its last execution in this run folder took (``timings`` in
  status.json, kept across runs). A node that has never executed here has no estimate: it is counted as
  untimed, and the estimate is then a lower bound ("at least").

It knows nothing of changed settings (twice the epochs take about twice the time, the estimate still says the
old time until the node starts and measures its own rate) and assumes a unit costs the same all along a node
(a trainer's optimizer steps cost more than its sampling batches: its estimate settles after an epoch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Estimate:
    """``seconds``: the estimated time left of the nodes that have an estimate; ``untimed``: nodes to execute
    without one (then ``seconds`` is a lower bound)."""

    seconds: float
    untimed: tuple[str, ...] = ()

    def text(self) -> str:
        """``ETA 3m20s``; ``ETA >= 3m20s (2 nodes untimed)`` when some node has no estimate (``ETA ?`` when none
        has one)."""
        if not self.untimed:
            return f"ETA {format_seconds(self.seconds)}"
        n = len(self.untimed)
        known = f">= {format_seconds(self.seconds)}" if self.seconds >= 0.5 else "?"
        return f"ETA {known} ({n} node{'s' if n > 1 else ''} untimed)"

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "seconds_left": round(self.seconds, 1),
            "finish_at": round(now + self.seconds, 1) if not self.untimed else None,
            "lower_bound": bool(self.untimed),
            "untimed": list(self.untimed),
        }


def format_seconds(seconds: float) -> str:
    """``45s``, ``3m20s``, ``2h05m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def node_left(total: int, done: int, rate: float | None, elapsed: float, previous: float | None) -> float | None:
    """Seconds the running node has left: from its measured ``rate`` (seconds per unit) when there is one, else
    from its ``previous`` execution's time less ``elapsed``; None when neither is known."""
    if rate is not None and total > 0:
        return max(total - done, 0) * rate
    if previous is not None:
        return max(previous - elapsed, 0.0)
    return None


def estimate(to_run: Sequence[str], timings: Mapping[str, float], running: str | None = None,
             running_left: float | None = None) -> Estimate:
    """The estimate for the nodes ``to_run`` (not started, in order), with ``running_left`` seconds left of the
    ``running`` node (None: unknown)."""
    seconds, untimed = 0.0, []
    if running is not None:
        if running_left is None:
            untimed.append(running)
        else:
            seconds += running_left
    for node in to_run:
        if node in timings and math.isfinite(timings[node]):
            seconds += timings[node]
        else:
            untimed.append(node)
    return Estimate(seconds, tuple(untimed))


@dataclass
class EtaTracker:
    """Follows a run: which nodes are left, the running node's progress, the time each execution took."""

    to_run: dict[str, None]  # the nodes still to start, in order (a dict: removal in O(1))
    timings: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    running: str | None = None
    _started: float = 0.0
    _total: int = 0
    _done: int = 0
    _base: tuple[float, int] | None = None  # (time, units) of the running bar's first update

    def start(self, node: str) -> None:
        self.running, self._started = node, self.clock()
        self.to_run.pop(node, None)
        self.new_bar(0)

    def new_bar(self, total: int) -> None:
        self._total, self._done, self._base = int(total), 0, None

    def update(self, n: int) -> None:
        """``n`` units of the running node's latest bar done (its first update sets the base: a resumed trainer
        jumps to the epochs it restored at once, and only what follows is timed)."""
        if n <= 0:
            return
        self._done += n
        if self._base is None:
            self._base = (self.clock(), self._done)

    def finish(self, node: str, executed: bool) -> None:
        if executed:
            self.timings[node] = self.clock() - self._started
        self.to_run.pop(node, None)
        self.running = None

    def rate(self) -> float | None:
        if self._base is None or self._done <= self._base[1]:
            return None
        return (self.clock() - self._base[0]) / (self._done - self._base[1])

    def estimate(self) -> Estimate:
        left = None
        if self.running is not None:
            left = node_left(self._total, self._done, self.rate(), self.clock() - self._started,
                             self.timings.get(self.running))
        return estimate(list(self.to_run), self.timings, self.running, left)
