"""CPU threads on a shared machine: one GRPO epoch of the main job, idle vs next to one busy process.

    python bench/bench_threads.py [--competitors 1] [--spin-timeout 240]

On a 2-core machine a torch process with 2 OpenMP threads that spin-wait between parallel regions (libgomp's
default, OMP_WAIT_POLICY=ACTIVE) fights any other busy process for both cores and can slow down ~20x. The
runner sets OMP_WAIT_POLICY=PASSIVE before torch is imported (unless the user set it): waiting threads sleep.

Each scenario runs in a fresh process that imports ``flowopd_nodes.cli`` first, as ``python runner.py`` does
(so it gets the runner's defaults), builds the shipped base and the main job's compose teacher
(``graphs/full_opd.yaml``, node ``teacher_compose``: 8 prompts x 8 samples, 8 steps, CFG, 8 optimizer steps),
runs one warm-up epoch and times the next. "Loaded": ``--competitors`` processes spinning a pure-Python loop
run alongside. Thread count: torch's default (the cores), as in the runner. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import flowopd_nodes.cli  # noqa: F401  (the runner's environment defaults, before torch)
import yaml, torch
from flowopd_core.grpo.trainer import GRPOConfig, GRPOTrainer
from flowopd_core.miniworld.sets import prompt_set
from flowopd_core.models.pipeline import load_pipeline
from flowopd_core.models.policy import Policy
from flowopd_core.rewards.spec import build_reward
from flowopd_nodes.engine.ports import build_config
graph = yaml.safe_load(open({root!r} + "/graphs/full_opd.yaml"))
params = graph["nodes"]["teacher_compose"]["params"]
config = build_config(GRPOConfig, {{**params, "epochs": 2}})
pipe = load_pipeline({root!r} + "/models/miniworld")
trainer = GRPOTrainer(pipe, Policy(pipe.transformer), "teacher", {{"compose": build_reward("compose")}}, config,
                      prompt_set("compose", "train"))
trainer.epoch()  # warm-up: text-embedding cache, first-call costs
start = time.perf_counter()
trainer.epoch()
print(json.dumps({{"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}}))
"""


SCENARIOS = (
    ("runner default: OMP_WAIT_POLICY=PASSIVE, threads = cores", {}),
    ("libgomp's default wait policy (spin a while, then sleep)", {"OMP_WAIT_POLICY": ""}),
    ("OMP_WAIT_POLICY=ACTIVE (spin)", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ("one thread (OMP_NUM_THREADS=1)", {"OMP_NUM_THREADS": "1"}),
)
"""(label, environment) of each scenario; "" leaves libgomp's default in place (the runner only sets an unset
variable)."""


def epoch_seconds(extra_env: dict[str, str], competitors: int, timeout: float) -> tuple[float | None, int]:
    """(seconds of the timed epoch or None past ``timeout``, torch threads) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", **extra_env)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["seconds"], out["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--competitors", type=int, default=1, help="busy processes in the loaded runs")
    parser.add_argument("--spin-timeout", type=float, default=240.0,
                        help="seconds after which a loaded run is stopped and reported as slower")
    args = parser.parse_args()
    rows = []
    for label, extra_env in SCENARIOS:
        idle, threads = epoch_seconds(extra_env, 0, 900.0)
        loaded, _ = epoch_seconds(extra_env, args.competitors, args.spin_timeout)
        rows.append((label, threads, idle, loaded))
    print(f"One GRPO epoch of the main job's compose teacher, {os.cpu_count()} cores, {args.competitors} busy "
          f"competing process(es), {time.strftime('%Y-%m-%d')}.\n")
    print("| threads setting | torch threads | idle (s) | loaded (s) | loaded / idle | idle / runner's idle |\n"
          "|---|---|---|---|---|---|")
    for label, threads, idle, loaded in rows:
        shown = f"{loaded:.1f}" if loaded is not None else f"> {args.spin_timeout - 15:.0f} (stopped)"
        ratio = f"{loaded / idle:.2f}x" if loaded is not None else f"> {(args.spin_timeout - 15) / idle:.1f}x"
        print(f"| {label} | {threads} | {idle:.1f} | {shown} | {ratio} | {idle / rows[0][2]:.2f}x |")
    default = rows[0]
    verdict = "met" if default[3] is not None and default[3] / default[2] < 2.5 else "MISSED"
    value = f"{default[3] / default[2]:.2f}x" if default[3] is not None else "did not finish"
    print(f"\nTarget (issue 22): loaded / idle epoch time under 2.5x with the runner's defaults: **{verdict}** "
          f"({value})")


if __name__ == "__main__":
    main()
