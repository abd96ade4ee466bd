"""Validation speed (issue 18, "Slow validation"): the wall time of ``python runner.py validate
graphs/full_opd.yaml`` (a fresh process: imports included) and of ``runner.py validate`` on a generated
50,000-node graph: 25,000 FlowOPDPromptText -> FlowOPDSavePrompts pairs (light nodes; every one is to run).

    python bench/bench_validate.py          # prints Markdown (median of 5 and of 3 runs)

Not part of bench/run_all.py.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VALIDATE_TARGET_S = 1.5
BIG_TARGET_S = 15.0
BIG_NODES = 50_000


def big_graph(n: int) -> dict:
    nodes = {}
    for i in range(n // 2):
        nodes[f"p{i}"] = {"type": "FlowOPDPromptText", "params": {"text": f"prompt {i}", "task": "compose"}}
        nodes[f"s{i}"] = {"type": "FlowOPDSavePrompts", "links": {"prompts": f"p{i}.prompts"}}
    return {"schema_version": 1, "name": "big", "nodes": nodes}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def line(what: str, value: float, target: float) -> str:
    verdict = "met" if value < target else "MISSED"
    return f"Target (issue 18): {what} under {target:g} s: **{verdict}** ({value:.2f} s)"


def main() -> None:
    runner = [sys.executable, str(ROOT / "runner.py"), "validate"]
    small = statistics.median(wall([*runner, "graphs/full_opd.yaml"]) for _ in range(5))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.yaml"
        path.write_text(yaml.safe_dump(big_graph(BIG_NODES), sort_keys=False), encoding="utf-8")
        big = statistics.median(wall([*runner, str(path)]) for _ in range(3))
    print("| what | wall time (median) |")
    print("|---|---|")
    print(f"| `runner.py validate graphs/full_opd.yaml` (5 runs) | {small:.3f} s |")
    print(f"| `runner.py validate` of a {BIG_NODES:,}-node graph (3 runs) | {big:.3f} s |")
    print()
    print(line("`runner.py validate graphs/full_opd.yaml`", small, VALIDATE_TARGET_S))
    print()
    print(line(f"validating a {BIG_NODES:,}-node graph", big, BIG_TARGET_S))


if __name__ == "__main__":
    main()
