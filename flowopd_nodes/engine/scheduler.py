"""The scheduler: runs a validated graph in a run directory, serving unchanged nodes from the cache.

Run directory (``runs/<graph name>/`` by default)::

    graph.yaml        the graph as run (overrides applied)
    status.json       per node: state (executed / cached / failed / skipped), cache key, seconds; the running
                      node, the estimated time left (``eta``, see :mod:`flowopd_nodes.engine.eta`) and each
                      node's last execution time (``timings``, kept across runs)
    run.log           the log
    cache/<node>/<key>/outputs.json + artifacts    one entry per distinct input state of a node
    checkpoints/<node>/<key>/   resumable state of a long node while it runs (kept if it fails, then removed)
    nodes/<node>      link to the entry used by the latest run (where to find a node's files)

Cache key of a node = hash(node type, node code version, resolved params, fingerprints of files its path
params point at, and the *fingerprints* of the upstream outputs it consumes). An output fingerprint is its
producer's key plus a nonce drawn when the producer actually executed, so a re-executed node (changed
params, ``--force``) re-executes everything downstream, while a cache hit keeps downstream keys stable.
An entry is complete only once ``outputs.json`` is in place (written last, atomically); a node that fails
leaves nothing behind.

Several processes (``torchrun --nproc_per_node N runner.py ...``; see :mod:`flowopd_core.training.distributed`): every
process walks the graph in the same order; process 0 decides what is cached, holds the lock and alone writes
the run directory (cache, checkpoints, status, run.log, links). A node with ``DISTRIBUTED = True`` (the
trainers) runs in every process at once (data parallel; process r > 0 writes its own files only under
``ranks/rank<r>/``); any other node runs in process 0 while the others wait. Then every process reads the
outputs that process 0 wrote (the run directory must be on a filesystem all processes share).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from flowopd_core import __version__ as core_version
from flowopd_nodes.engine import context
from flowopd_nodes.engine.errors import NodeExecutionError, TrainingInterrupted
from flowopd_nodes.engine.eta import EtaTracker
from flowopd_nodes.engine.graph import inside
from flowopd_nodes.engine.ports import all_ports, merge_settings
from flowopd_nodes.engine.types import WIRE_TYPES, decode_outputs, encode_outputs
from flowopd_nodes.engine.validate import ResolvedNode, ValidGraph, node_problems

OUTPUTS_FILE = "outputs.json"
HASH_CONTENT_LIMIT = 256 * 2**20  # files/folders up to this size are fingerprinted by content, larger by size+mtime

log = logging.getLogger("flowopd")


@dataclass
class NodeStatus:
    id: str
    type: str
    state: str = "pending"  # pending | executed | cached | failed | skipped
    key: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass
class RunResult:
    run_dir: Path
    statuses: dict[str, NodeStatus]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> output name -> value

    def ids(self, state: str) -> list[str]:
        return [s.id for s in self.statuses.values() if s.state == state]

    @property
    def executed(self) -> list[str]:
        return self.ids("executed")

    @property
    def cached(self) -> list[str]:
        return self.ids("cached")

    def output(self, node: str, name: str) -> Any:
        return self.outputs[node][name]


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def path_fingerprint(path: str | Path) -> str:
    """Content hash of a file or folder (size + mtime above ``HASH_CONTENT_LIMIT``); "missing" if absent."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        stat = f.stat()
        digest.update(f"{rel}\0{stat.st_size}\0".encode())
        if total <= HASH_CONTENT_LIMIT:
            with f.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def node_key(node: ResolvedNode, upstream: dict[str, str], memo: dict[str, str] | None = None) -> str:
    """Cache key of ``node`` given the fingerprints of the upstream outputs it consumes (input -> fingerprint).
    ``memo``: path -> fingerprint already computed in this run (files are hashed once per run)."""
    memo = {} if memo is None else memo
    files = {}
    for p in node.cls.INPUTS:
        if p.path and node.params.get(p.name):
            path = str(node.params[p.name])
            if path not in memo:
                memo[path] = path_fingerprint(path)
            files[p.name] = memo[path]
    return _sha(
        {
            "type": node.cls.NODE_ID,
            "code": node.cls.code_version(),
            "core": core_version,
            "params": node.params,
            "files": files,
            "inputs": upstream,
        }
    )[:24]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class _TqdmProgress:
    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if n:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _TrackedProgress:
    """A node's progress bar that also tells the run's ETA tracker (``on_update`` refreshes what shows it)."""

    def __init__(self, inner: context.Progress, tracker: EtaTracker, on_update: Callable[[], None]):
        self.inner, self.tracker, self.on_update = inner, tracker, on_update

    def update(self, n: int = 1) -> None:
        self.tracker.update(n)
        self.on_update()
        self.inner.update(n)

    def close(self) -> None:
        self.inner.close()


def predict_to_run(valid: ValidGraph, run_dir: Path, force: frozenset[str] | set[str],
                   memo: dict[str, str] | None = None) -> list[str]:
    """The nodes a run will execute, in order, as the cache tells before anything runs: a node whose inputs all
    come from cached nodes and whose entry for the resulting key is complete is served from the cache; any other
    node executes, and so does everything downstream of it (it gets a new fingerprint)."""
    fingerprints: dict[str, str] = {}
    to_run = []
    for node_id in valid.order:
        node = valid.nodes[node_id]
        if node_id not in force and all(link.node in fingerprints for link in node.links.values()):
            upstream = {name: f"{fingerprints[link.node]}:{link.output}" for name, link in sorted(node.links.items())}
            done = inside(run_dir, "cache", node_id, node_key(node, upstream, memo)) / OUTPUTS_FILE
            try:
                fingerprints[node_id] = json.loads(done.read_text(encoding="utf-8"))["fingerprint"]
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
        to_run.append(node_id)
    return to_run


def _previous_timings(status_file: Path) -> dict[str, float]:
    """Seconds of each node's last execution recorded by an earlier run in this folder (empty if none)."""
    try:
        data = json.loads(status_file.read_text(encoding="utf-8"))
        timings = {k: float(v) for k, v in (data.get("timings") or {}).items()}
        for node_id, entry in (data.get("nodes") or {}).items():
            if entry.get("state") == "executed":
                timings[node_id] = float(entry["seconds"])
        return timings
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


RUN_FOLDER_MARKS = ("graph.yaml", "status.json", ".lock", "ranks")
"""What a run writes first into its folder (``ranks/``: processes r > 0 of a multi-process run, which may start
before the main one): a folder holding one of them is a run folder."""


class RunFolderUnusable(RuntimeError):
    """The run folder cannot hold this run (:func:`run_folder_problem`): nothing ran and nothing was written."""


class RunFolderBusy(RunFolderUnusable):
    """Another runner holds the run folder's lock."""


def run_folder_problem(run_dir: Path) -> str:
    """Why ``run_dir`` cannot hold a run, or "" when it can: it is a file; it holds other files and no earlier
    run (a run would scatter its cache among them: a mistyped ``--run-dir ~``); it cannot be made; it is not
    writable. A missing folder is made here."""
    if run_dir.exists() and not run_dir.is_dir():
        return "it exists and is not a folder"
    if run_dir.is_dir() and any(run_dir.iterdir()) and not any((run_dir / m).exists() for m in RUN_FOLDER_MARKS):
        return "it holds other files and no earlier run (give a new or empty folder, or one a run wrote)"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make it ({exc.strerror or exc})"
    if not os.access(run_dir, os.W_OK | os.X_OK):
        return "it is not writable"
    return ""


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One runner per run folder: an exclusive, non-blocking lock on ``<run_dir>/.lock`` (``fcntl.flock`` on
    POSIX, ``msvcrt.locking`` of its first byte on Windows), released when the run ends or the process dies."""
    with (run_dir / ".lock").open("a+") as handle:
        if sys.platform == "win32":
            import msvcrt

            lock, unlock = (lambda: msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1),
                            lambda: msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1))
            busy: tuple[type[BaseException], ...] = (OSError,)
        else:
            import fcntl

            lock, unlock = (lambda: fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB),
                            lambda: fcntl.flock(handle, fcntl.LOCK_UN))
            busy = (BlockingIOError,)
        try:
            lock()
        except busy:
            raise RunFolderBusy(f"run folder {run_dir}: another runner is using it (wait for it to finish, or give "
                                "this run another --run-dir)") from None
        try:
            yield
        finally:
            unlock()


@contextlib.contextmanager
def _file_log(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        handler.close()


def run_graph(
    valid: ValidGraph,
    run_dir: str | Path,
    *,
    force: frozenset[str] | set[str] = frozenset(),
    progress: Callable[[int, str], context.Progress] | None = _TqdmProgress,
    show_progress: bool = True,
) -> RunResult:
    """Run ``valid`` in ``run_dir``; see the module docstring for caching and several processes. Raises
    :class:`NodeExecutionError`, or :class:`RunFolderUnusable` before anything runs."""
    run_dir = Path(run_dir)
    problem = run_folder_problem(run_dir)  # makes a missing folder
    if problem:
        raise RunFolderUnusable(f"run folder {run_dir}: {problem}")
    from flowopd_core.training.distributed import World  # torch: imported when a graph runs

    world = World.current()
    main = world.is_main
    rank_dir = run_dir / "ranks" / f"rank{world.rank}"  # process r > 0's own files
    if not main:
        shutil.rmtree(rank_dir, ignore_errors=True)
        rank_dir.mkdir(parents=True)
        progress, show_progress = context._null_progress, False
    unknown = set(force) - set(valid.nodes)
    if unknown:
        raise ValueError(f"--force names no node of the graph: {sorted(unknown)}")
    statuses = {n: NodeStatus(n, valid.nodes[n].cls.NODE_ID) for n in valid.order}
    result = RunResult(run_dir, statuses)
    fingerprints: dict[str, str] = {}
    if not show_progress:  # no bars at all (the ETA in status.json still follows the nodes' progress)
        progress = None
    progress = progress or context._null_progress
    status_meta = {"graph": valid.name, "source": valid.graph.source, "started": time.time()}
    memo: dict[str, str] = {}  # path -> fingerprint: each file hashed once per run
    tracker = EtaTracker(  # the time left (flowopd_nodes/engine/eta.py says what it estimates)
        dict.fromkeys(predict_to_run(valid, run_dir, set(force), memo) if main else ()),
        _previous_timings(run_dir / "status.json") if main else {},
    )
    bar = None  # the graph's bar (nodes), made below

    last_write = [0.0]

    def write_status(force: bool = False) -> None:
        # Throttled: rewriting the whole file after every one of many quick cached nodes is quadratic.
        now = time.monotonic()
        if not main or not force and now - last_write[0] < 1.0:
            return
        last_write[0] = now
        counts = {s: len(result.ids(s)) for s in ("executed", "cached", "failed", "skipped", "pending")}
        eta = tracker.estimate()
        if bar is not None:
            bar.set_postfix_str(f"{tracker.running or ''} {eta.text()}".strip())
        _write_json(
            run_dir / "status.json",
            {**status_meta, **counts, "running": tracker.running, "eta": eta.to_json(time.time()),
             "timings": {k: round(v, 3) for k, v in tracker.timings.items()},
             "nodes": {k: asdict(v) for k, v in statuses.items()}},
        )

    def node_progress(total: int, desc: str) -> context.Progress:
        tracker.new_bar(total)
        return _TrackedProgress(progress(total, desc), tracker, write_status)

    lock = _run_lock(run_dir) if main else contextlib.nullcontext()
    with lock, _file_log(run_dir / "run.log" if main else rank_dir / "run.log"):
        if main:
            (run_dir / "graph.yaml").write_text(
                yaml.safe_dump(valid.graph.to_data(), sort_keys=False), encoding="utf-8"
            )
        log.info("run %s: %d nodes to consider in %s%s", valid.name, len(valid.order), run_dir,
                 f" (process {world.rank} of {world.size})" if world.size > 1 else "")
        bar = tqdm(valid.order, desc=valid.name, unit="node", disable=not show_progress, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} nodes [{elapsed}{postfix}]")  # our ETA, not tqdm's
        try:
            for node_id in bar:
                node = valid.nodes[node_id]
                status = statuses[node_id]
                upstream = {
                    name: f"{fingerprints[link.node]}:{link.output}" for name, link in sorted(node.links.items())
                }
                status.key = node_key(node, upstream, memo)
                entry = inside(run_dir, "cache", node_id, status.key)
                if main and node_id in force and entry.exists():
                    shutil.rmtree(entry)
                started = time.perf_counter()
                # process 0 decides (another process could see an entry that process 0 is writing)
                if world.broadcast_int(int((entry / OUTPUTS_FILE).is_file()) if main else 0):
                    data = json.loads((entry / OUTPUTS_FILE).read_text(encoding="utf-8"))
                    values = decode_outputs(node.cls.RETURN_TYPES, data["outputs"], entry)
                    fingerprints[node_id] = data["fingerprint"]
                    status.state = "cached"
                    tracker.finish(node_id, executed=False)
                    log.info("node %s (%s): cached %s", node_id, node.cls.NODE_ID, status.key)
                elif not main:
                    if node.cls.DISTRIBUTED:  # in step with process 0; files of its own go to rank_dir
                        _execute(node, result, inside(rank_dir, node_id), run_dir, progress, owner=False)
                    else:
                        log.info("node %s (%s): runs in process 0", node_id, node.cls.NODE_ID)
                    if not world.broadcast_int(0):  # waits for process 0's outputs.json
                        raise NodeExecutionError(node_id, node.cls.NODE_ID, RuntimeError("failed in process 0"))
                    data = json.loads((entry / OUTPUTS_FILE).read_text(encoding="utf-8"))
                    values = decode_outputs(node.cls.RETURN_TYPES, data["outputs"], entry)
                    fingerprints[node_id] = data["fingerprint"]
                    status.state = "executed"
                else:
                    tracker.start(node_id)
                    write_status(force=True)
                    try:
                        values = _execute(node, result, entry, run_dir, node_progress)
                    except BaseException:
                        if world.size > 1 and not node.cls.DISTRIBUTED:
                            world.broadcast_int(0)  # the others wait for this node: tell them it failed
                        raise
                    # a pure node (a settings node): its key says all; else a nonce drawn per execution
                    fingerprints[node_id] = status.key if node.cls.PURE else f"{status.key}-{secrets.token_hex(8)}"
                    _write_json(
                        entry / OUTPUTS_FILE,
                        {
                            "node": node_id,
                            "type": node.cls.NODE_ID,
                            "fingerprint": fingerprints[node_id],
                            "params": node.params,
                            "inputs": upstream,
                            "outputs": encode_outputs(node.cls.RETURN_TYPES, node.cls.RETURN_NAMES, values, entry),
                        },
                    )
                    # Downstream nodes get the values as read back from the entry, exactly what a cached run
                    # serves them (the read is cheap: outputs are handles and small safetensors files).
                    values = decode_outputs(
                        node.cls.RETURN_TYPES,
                        json.loads((entry / OUTPUTS_FILE).read_text(encoding="utf-8"))["outputs"],
                        entry,
                    )
                    status.state = "executed"
                    tracker.finish(node_id, executed=True)
                    world.broadcast_int(1)  # the outputs are on disk: the other processes read them
                status.seconds = time.perf_counter() - started
                result.outputs[node_id] = dict(zip(node.cls.RETURN_NAMES, values))
                if main:
                    _link_latest(run_dir, node_id, entry)
                write_status()
        except BaseException as exc:
            if tracker.running is not None:
                tracker.finish(tracker.running, executed=False)
            for status in statuses.values():
                if status.state == "pending":
                    status.state = "skipped"
            status_meta["error"] = str(exc)
            raise
        finally:
            status_meta["finished"] = time.time()
            write_status(force=True)
            bar.close()
    log.info("run %s done: %d executed, %d cached", valid.name, len(result.executed), len(result.cached))
    return result


def _execute(node: ResolvedNode, result: RunResult, entry: Path, run_dir: Path, progress, owner: bool = True) -> tuple:
    """Run one node with ``entry`` as its artifact folder. ``owner``: this process owns the node's checkpoint
    folder (False for process r > 0 of a multi-process run: it reads checkpoints and never removes them)."""
    status = result.statuses[node.id]
    if entry.exists():  # an incomplete entry from an interrupted run
        shutil.rmtree(entry)
    entry.mkdir(parents=True)
    inputs = {
        name: value for name, value in node.params.items() if not (value is None and node.cls.input(name).optional)
    }
    for name, link in node.links.items():
        inputs[name] = result.output(link.node, link.output)
    checkpoints = inside(run_dir, "checkpoints", node.id, status.key)
    ctx = context.NodeContext(
        node_id=node.id,
        artifact_dir=entry,
        run_dir=run_dir,
        progress=progress,
        metrics=lambda values: log.info("node %s metrics %s", node.id, json.dumps(values, default=str)),
        log=log,
        checkpoint_dir=checkpoints,
    )
    log.info("node %s (%s): executing %s", node.id, node.cls.NODE_ID, status.key)
    import torch

    try:
        # The node's own checks again, now with the values of widgets fed by links (unknown at validation).
        inputs = merge_settings(node.cls, inputs)  # a settings value spread over the node's own inputs
        params = {p.name: inputs.get(p.name) for p in all_ports(node.cls) if p.is_widget}
        problems = node_problems(node.cls, params, frozenset(node.links))
        if problems:
            raise ValueError("; ".join(f"{field or 'node'}: {message}" for field, message in problems))
        with context.use(ctx), torch.inference_mode(False), torch.enable_grad():
            values = getattr(node.cls(), node.cls.FUNCTION)(**inputs)
        if isinstance(values, dict) and "result" in values:  # ComfyUI's {"ui": ..., "result": (...)}
            values = values["result"]
        values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if len(values) != len(node.cls.OUTPUTS):
            raise TypeError(f"returned {len(values)} values for {len(node.cls.OUTPUTS)} outputs")
        for port, value in zip(node.cls.OUTPUTS, values):
            if not WIRE_TYPES[port.type].check(value):
                raise TypeError(f"output {port.name!r} is not a valid {port.type}: {type(value).__name__}")
    except BaseException as exc:
        shutil.rmtree(entry, ignore_errors=True)
        status.state = "failed"
        status.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TrainingInterrupted):
            log.warning("node %s (%s) interrupted: %s", node.id, node.cls.NODE_ID, exc)
        else:
            log.error("node %s (%s) failed: %s", node.id, node.cls.NODE_ID, status.error, exc_info=exc)
        if isinstance(exc, Exception):
            raise NodeExecutionError(node.id, node.cls.NODE_ID, exc) from exc
        raise
    if owner:
        shutil.rmtree(checkpoints, ignore_errors=True)  # done: the results live in the cache entry
    return values


def _link_latest(run_dir: Path, node_id: str, entry: Path) -> None:
    nodes_dir = run_dir / "nodes"
    nodes_dir.mkdir(exist_ok=True)
    link = inside(nodes_dir, node_id)
    tmp = inside(nodes_dir, f".{node_id}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(entry, nodes_dir))
    os.replace(tmp, link)
