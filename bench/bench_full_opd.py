"""The main job end to end: wall time of ``graphs/full_opd.yaml`` on the mini-world and the graph engine's share.

    python bench/bench_full_opd.py [--runs N]        (one run takes about 11 minutes on 2 cores)

Each run executes the whole graph in a fresh temporary run folder (nothing cached), in its own process, with the
environment's thread settings. Engine overhead = process wall - the nodes' own seconds (status.json) - the
interpreter start-up and imports (a ``runner.py validate`` of the same graph, timed alone). Figures are medians.
Targets (issue 9): wall <= 15 min on 2 cores; engine overhead <= 1 %.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRAPH = ROOT / "graphs" / "full_opd.yaml"


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "runner.py"), *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="full runs (each ~11 min on 2 cores)")
    parser.add_argument("--graph", type=Path, default=GRAPH, help="another graph (e.g. a small one to try the script)")
    args = parser.parse_args()
    graph = args.graph.resolve()
    walls, nodes, startups, tables = [], [], [], []
    for _ in range(args.runs):
        startups.append(timed(["validate", str(graph)]))
        with tempfile.TemporaryDirectory(prefix="flowopd-bench-") as tmp:
            walls.append(timed(["run", str(graph), "--run-dir", tmp, "--no-progress"]))
            status = json.loads((Path(tmp) / "status.json").read_text())
            nodes.append(sum(n["seconds"] for n in status["nodes"].values()))
            tables += [hashlib.sha256(t.read_bytes()).hexdigest()[:12] for t in Path(tmp).glob("nodes/*/results.md")]
    wall, node, startup = statistics.median(walls), statistics.median(nodes), statistics.median(startups)
    engine = max(0.0, wall - node - startup)
    print("| figure | value |\n|---|---|")
    print(f"| full_opd wall (median of {args.runs}) | {wall:.0f} s = {wall / 60:.1f} min |")
    print(f"| each run's wall | {', '.join(f'{w:.0f} s' for w in walls)} |")
    if tables:
        same = "identical" if len(set(tables)) == 1 else "DIFFERENT"
        print(f"| the Evaluator's results.md (sha256 prefix) | {same} across the {len(tables)} runs "
              f"({', '.join(sorted(set(tables)))}) |")
    print(f"| nodes' own seconds | {node:.0f} s |")
    print(f"| interpreter start-up + imports (`runner.py validate`) | {startup:.1f} s |")
    print(f"| graph engine (wall - nodes - start-up) | {engine:.1f} s = {100 * engine / wall:.2f} % |")
    print(f"\nTarget (issue 9): full_opd end-to-end <= 15 min on 2 cores: **{'met' if wall <= 900 else 'MISSED'}** "
          f"({wall / 60:.1f} min).")
    print(f"Target (issue 9): graph-engine overhead on full_opd <= 1 %: "
          f"**{'met' if engine <= 0.01 * wall else 'MISSED'}** ({100 * engine / wall:.2f} %).")


if __name__ == "__main__":
    main()
