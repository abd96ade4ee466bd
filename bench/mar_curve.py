"""The MAR curve of a lambda sweep run: what the anchor weight does to each task, to drift and to training.

    python bench/mar_curve.py runs/opd_from_teachers [--out docs/img/mar_sweep.png]

Reads the run folder of a graph with several FlowOPDDistiller nodes that differ in ``anchor_weight`` (e.g.
``graphs/opd_from_teachers.yaml``) and the Evaluator that scored them: each distiller's params
(``nodes/<node>/outputs.json``) and training history (``metrics.json``), and the Evaluator's per-sample scores
(``results.json``). Against the lambda = 0 student, per lambda: the paired difference (same prompts, same noise,
:func:`compare_models.paired`) of each task's headline metric and of the quality metric on the other tasks'
prompts (drift off the image manifold shows there first), with 95 % intervals; and the last epoch's KL to the
teachers and to the anchor. Prints a Markdown table and writes the two-panel PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_models import HEADLINE, categories, cell, paired  # noqa: E402

from flowopd_core.eval.report import Stat, mean_ci  # noqa: E402


def drift(data: dict, a: str, b: str, category: dict[str, str]) -> Stat:
    """Paired difference A - B of the quality metric on the compose and text prompts (the tasks without their own
    quality goal), stratified by category."""
    rows_a = [s for s in data["samples"][a] if s["task"] in ("compose", "text")]
    rows_b = {s["index"]: s for s in data["samples"][b]}
    diff = np.array([r["scores"].get("quality", math.nan) - rows_b[r["index"]]["scores"].get("quality", math.nan)
                     for r in rows_a], dtype=np.float64)
    k = data["config"]["images_per_prompt"]
    return mean_ci(diff, [r["index"] // k for r in rows_a], data["config"]["confidence"],
                   [category[r["prompt_id"]] for r in rows_a])


def sweep(run: Path) -> tuple[list[dict], dict]:
    """The distillers of ``run`` (lambda, label, last-epoch KLs) sorted by lambda, and the Evaluator's results."""
    students = []
    for node in sorted((run / "nodes").iterdir()):
        meta_path = node / "outputs.json"
        if not meta_path.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta["type"] == "FlowOPDDistiller":
            history = json.loads((node / "metrics.json").read_text())
            students.append({"node": node.name, "lambda": float(meta["params"]["anchor_weight"]),
                             "label": meta["params"]["label"], "kl": history[-1]["kl"],
                             "anchor_kl": history[-1].get("anchor_kl", math.nan), "kl_first": history[0]["kl"]})
        elif meta["type"] == "FlowOPDEvaluator":
            results = json.loads((node / "results.json").read_text())
    students.sort(key=lambda s: s["lambda"])
    if not students or students[0]["lambda"] != 0.0:
        raise SystemExit(f"{run}: no distiller with anchor_weight 0 to compare with")
    return students, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the sweep's run folder, e.g. runs/opd_from_teachers")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run>/mar_sweep.png)")
    args = parser.parse_args()
    students, data = sweep(args.run)
    category = categories(data)
    ref = students[0]["label"]
    rows = []
    for s in students:
        stats = {t: paired(data, s["label"], ref, t, category) for t in HEADLINE}
        stats["drift"] = drift(data, s["label"], ref, category)
        rows.append((s, stats))
    print("| lambda | KL to the teachers, last epoch | KL to the anchor, last epoch | vs lambda 0: compose strict "
          "| text OCR | quality | quality on compose + text prompts |\n|---|---|---|---|---|---|---|")
    for s, stats in rows:
        diffs = " | ".join("-" if s["lambda"] == 0 else cell(stats[k]) for k in (*HEADLINE, "drift"))
        anchor = f"{s['anchor_kl']:.1f}" if math.isfinite(s["anchor_kl"]) else "-"
        print(f"| {s['lambda']:g} | {s['kl']:.1f} | {anchor} | {diffs} |")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    xs = np.arange(len(rows))
    names = {"compose": "compose strict", "text": "text OCR", "quality": "quality", "drift": "quality on other tasks"}
    for j, (key, name) in enumerate(names.items()):
        means = [stats[key].mean for _, stats in rows]
        halves = [stats[key].half_width for _, stats in rows]
        left.errorbar(xs + (j - 1.5) * 0.06, means, yerr=halves, marker="o", capsize=3, label=name)
    left.axhline(0.0, color="grey", lw=0.8)
    left.set_title("held-out, paired difference to lambda = 0 (95 % CI)", fontsize=9)
    right.plot(xs, [s["kl"] for s, _ in rows], marker="o", label="KL to the teachers")
    right.plot(xs, [s["anchor_kl"] for s, _ in rows], marker="o", label="KL to the anchor (base)")
    right.set_title("training, last epoch (mean per-step KL)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks(xs, [f"{s['lambda']:g}" for s, _ in rows])
        ax.set_xlabel("MAR lambda (anchor_weight)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    out = args.out or args.run / "mar_sweep.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
