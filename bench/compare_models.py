"""Paired comparisons between any two models of an Evaluator run, from its ``results.json``.

    python bench/compare_models.py runs/full_opd/nodes/eval/results.json \
        "flow-opd - grpo-mix" "flow-opd - flow-opd-no-mar" "flow-opd - grpo-quality:quality"

The Evaluator's results.md pairs every model with the first one (the base), and the rows its ``comparisons``
param names (the same statistics, computed in the run). This script pairs any two of a finished run: per
sample d_i = value_A,i - value_B,i (same prompt, same noise), then the mean over prompts with the Student-t
interval, stratified by category like the Evaluator's headline (:func:`flowopd_core.eval.report.mean_ci`), for
each task's headline metric (compose strict, text ocr, quality). "A - B:task" limits a row to one task. The "average of
the 3" column is the mean of the three task differences; its half-width is sqrt(h_1^2 + h_2^2 + h_3^2) / 3
(the tasks' prompts are disjoint, so the three are independent). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowopd_core.eval.report import Stat, mean_ci  # noqa: E402

HEADLINE = {"compose": ("strict", "compose"), "text": ("scores", "ocr"), "quality": ("scores", "quality")}
"""task -> (table, metric) of the task's headline."""


def categories(data: dict) -> dict[str, str]:
    """prompt id -> its category (compose: single / count / pair / position; text: word2 / word3), which the
    Evaluator stratifies by: from the samples (results.json files from before the field: the mini-world's
    test prompts)."""
    first = next(iter(data["samples"].values()))
    if all("category" in s for s in first):
        return {s["prompt_id"]: s["category"] for s in first}
    from flowopd_core.miniworld.sets import prompt_set

    return {p.id: p.category for p in prompt_set("all", "test")}


def paired(data: dict, a: str, b: str, task: str, category: dict[str, str]) -> Stat:
    """The paired difference A - B of ``task``'s headline metric over the run's samples of that task."""
    table, metric = HEADLINE[task]
    rows_a = [s for s in data["samples"][a] if s["task"] == task]
    rows_b = {s["index"]: s for s in data["samples"][b] if s["task"] == task}
    diff = np.array([r[table].get(metric, math.nan) - rows_b[r["index"]][table].get(metric, math.nan)
                     for r in rows_a], dtype=np.float64)
    k = data["config"]["images_per_prompt"]
    strata = [category[r["prompt_id"]] for r in rows_a]
    return mean_ci(diff, [r["index"] // k for r in rows_a], data["config"]["confidence"], strata)


def cell(stat: Stat) -> str:
    star = " *" if stat.low > 0 or stat.high < 0 else ""
    return f"{stat.mean:+.2f} ± {stat.half_width:.2f}{star}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="an Evaluator's results.json")
    parser.add_argument("pairs", nargs="+", help='"A - B" or "A - B:task" (model labels as in results.md)')
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    category = categories(data)
    print("| comparison | compose strict | text OCR | quality | average of the 3 |\n|---|---|---|---|---|")
    for pair in args.pairs:
        spec, _, only = pair.partition(":")
        a, b = (name.strip() for name in spec.split(" - "))
        stats = {task: paired(data, a, b, task, category) for task in HEADLINE if not only or task == only}
        cells = [cell(stats[t]) if t in stats else "" for t in HEADLINE]
        average = ""
        if len(stats) == 3:
            mean = float(np.mean([s.mean for s in stats.values()]))
            half = math.sqrt(sum(s.half_width**2 for s in stats.values())) / 3
            average = cell(Stat(mean, half, 0, 0))
        print(f"| {a} - {b} | " + " | ".join(cells) + f" | {average} |")


if __name__ == "__main__":
    main()
