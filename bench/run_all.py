"""Run every benchmark script and rewrite ``bench/RESULTS.md`` (machine, date, commit, each script's figures).

    python bench/run_all.py [--only engine,sampling,opd] [--full-opd-runs 3] [--output bench/RESULTS.md]
    make bench

Each script runs in its own process with its default settings (each figure in it is a median over several
runs, every comparison measured side by side in one run) and prints Markdown; this file collects the
outputs, lists every target verdict at the top and keeps a failed script's error in its section (exit
status 1 then). Thread count: whatever the environment gives torch (``OMP_NUM_THREADS``), recorded in the
header. Figures from a machine under background load are noisy: the header records the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "engine": ("Graph engine", "bench/bench_engine.py"),
    "sampling": ("Sampling", "bench/bench_sampling.py"),
    "opd": ("Flow-OPD iteration: teacher-pool memory, overhead, the authors' loop", "bench/bench_opd.py"),
    "full_opd": ("The main job end to end: full_opd wall time and engine overhead", "bench/bench_full_opd.py"),
    "threads": (
        "CPU threads on a shared machine: a GRPO epoch idle vs next to a busy process", "bench/bench_threads.py"
    ),
}
OPT_IN = ("full_opd", "threads")
"""Scripts that run only when named in ``--only`` (full_opd takes about 11 minutes a run)."""
NOT_MEASURED = (
    "full_opd end to end (opt-in, about 11 min a run: `python bench/run_all.py --only engine,sampling,opd,full_opd "
    "--full-opd-runs 3`); last measured on 2026-11-25 (commit 42b094c): 687 s median of 3 (target <= 15 min: met), "
    "graph engine 1.0 s = 0.15 % (target <= 1 %: met)",
    "the GPU suite (`python bench/gpu_suite.py`: GRPO and OPD on an SD3.5-Medium-shaped model at 512 px, MFU, "
    "the authors' structure at their shapes; writes bench/RESULTS-gpu.md): needs a lent GPU",
)
VERDICT = re.compile(
    r"^Target \((?P<issue>[^)]*)\): (?P<what>.*): \*\*(?P<verdict>met|MISSED)\*\*(?: \((?P<value>[^)]*)\))?"
)


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.rstrip()


def machine() -> list[str]:
    import torch  # imported here: the header reports what the child processes will see

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        memory = f"{mem_kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, StopIteration):
        memory = "RAM unknown"
    versions = [f"torch {torch.__version__}"]
    for name in ("diffusers", "peft", "transformers"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    loads = os.getloadavg() if hasattr(os, "getloadavg") else None
    load = " / ".join(f"{x:.1f}" for x in loads) if loads else "unknown"
    busy = loads is not None and loads[0] > 0.5 * (os.cpu_count() or 1)
    return [
        f"Machine: {cpu}, {os.cpu_count()} cores, {memory}, {gpu}; torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, {', '.join(versions)}.",
        f"Load average (1 / 5 / 15 min) when the run started: {load}."
        + (" Other work was running: every comparison below is measured side by side in one run, but expect a "
           "few per cent of noise in each ratio (the CPU-time columns are the steadier ones)." if busy else ""),
    ]


def run_script(path: str, args: tuple[str, ...] = ()) -> tuple[str, float, bool]:
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(ROOT / path), *args], cwd=ROOT, capture_output=True, text=True, env=env,
                         check=False)
    seconds = time.perf_counter() - start
    if out.returncode:
        tail = "\n".join(out.stderr.strip().splitlines()[-20:])
        return f"**Failed** (exit status {out.returncode}):\n\n```\n{tail}\n```", seconds, False
    return out.stdout.strip(), seconds, True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(n for n in SCRIPTS if n not in OPT_IN),
                        help=f"comma-separated subset of {list(SCRIPTS)} (default: all but {list(OPT_IN)})")
    parser.add_argument("--full-opd-runs", type=int, default=1,
                        help="full_opd runs whose median is reported (about 11 min each)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    if args.full_opd_runs < 1:
        parser.error("--full-opd-runs must be >= 1")
    script_args = {"full_opd": ("--runs", str(args.full_opd_runs))}
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; have {list(SCRIPTS)}")
    header = machine()
    started = datetime.datetime.now().astimezone()
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    sections, verdicts, ok = [], [], True
    for name in chosen:
        title, path = SCRIPTS[name]
        print(f"running {path} ...", file=sys.stderr, flush=True)
        text, seconds, success = run_script(path, script_args.get(name, ()))
        ok &= success
        print(f"  {seconds:.0f} s", file=sys.stderr, flush=True)
        sections += [f"## {title}: `python {path}`", "", text, "", f"(script wall time {seconds:.0f} s)", ""]
        for line in text.splitlines():
            match = VERDICT.match(line.strip())
            if match:
                verdicts.append(
                    f"| {match['what']} | {match['issue']} | {match['verdict']} ({match['value'] or '-'}) |"
                )
    lines = [
        "# Benchmark results",
        "",
        "Written by `python bench/run_all.py` (`make bench`); rerun it rather than editing this file.",
        "",
        *header,
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Commit: {commit}"
        + (f" plus uncommitted changes to {', '.join(dirty[:6])}{' ...' if len(dirty) > 6 else ''}" if dirty else "")
        + ".",
        "",
        "## Targets",
        "",
        "| target | from | result |",
        "|---|---|---|",
        *verdicts,
        "",
        "Not measured in this run: "
        + "; ".join(m for m in NOT_MEASURED if not ("full_opd" in chosen and m.startswith("full_opd"))) + ".",
        "",
        *sections,
    ]
    Path(args.output).write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
