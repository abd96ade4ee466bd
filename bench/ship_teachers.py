"""Ship the teachers a run trained: their adapters, small, with a provenance file (command, commit, budget, scores).

    python bench/ship_teachers.py runs/full_opd --out models/teachers \
        --command "python runner.py graphs/full_opd.yaml" --commit <the commit that ran it>

Copies each teacher node's ``adapter/`` (peft safetensors + config, unchanged) from the run folder to
``<out>/<task>/`` and writes ``<out>/PROVENANCE.md``: the command and commit, the base the adapters were trained on
(with the sha256 of its transformer weights; an adapter only fits that base), each teacher's settings and sample
budget (from ``nodes/<node>/outputs.json``), its training curve's first and last epoch, the sha256 of every shipped
file, and the held-out scores of the run's Evaluator: each teacher against the base on its own task (paired,
:func:`compare_models.paired`) and, where the Evaluator also scored a model labelled ``random-<task>`` (the
teacher's null control, ``graphs/teachers_vs_controls.yaml``), against that control.
``graphs/opd_from_teachers.yaml`` starts stage 2 from the shipped folder.

    python bench/ship_teachers.py runs/teachers_vs_controls --out models/teachers \
        --command "python runner.py graphs/teachers_vs_controls.yaml" --commit <the commit that ran it>

A teacher node that loads an adapter trained elsewhere (``FlowOPDLoadAdapter``, as ``graphs/teachers_binding.yaml``
loads the long compose probe's) is shipped from that folder, its row naming the folder and the provenance file
that holds its budget, with the run's held-out scores like the others.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compare_models import HEADLINE, categories, cell, paired

from flowopd_core.models.base_stamp import stamp_adapter, transformer_digest

TEACHERS = {"compose": "teacher_compose", "text": "teacher_text", "quality": "teacher_quality"}
SETTINGS = ("rewards", "epochs", "prompts_per_epoch", "group_size", "steps", "updates_per_epoch", "lr", "beta",
            "clip_range", "lora_rank", "lora_alpha", "ema_decay", "guidance_scale", "seed")


TRAINER, LOAD_ADAPTER = "FlowOPDGRPOTrainer", "FlowOPDLoadAdapter"  # the node types a teacher can come from
ROOT = Path(__file__).resolve().parents[1]


def relative(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it (the run records absolute paths)."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def provenance_of(adapter: Path) -> str:
    """Where a loaded adapter's budget is written: the nearest ``PROVENANCE.md`` at or above its folder."""
    for folder in (adapter, *adapter.parents[:3]):
        if (folder / "PROVENANCE.md").is_file():
            return f"`{relative(folder / 'PROVENANCE.md')}`"
    return "its origin (no PROVENANCE.md beside it)"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def node_params(run: Path, meta: dict) -> dict:
    """A node's params from its ``outputs.json`` (``meta``), with the values of the settings node linked to its
    ``settings`` input (found by its fingerprint among the run's nodes) under them."""
    link = meta.get("inputs", {}).get("settings")
    if not link:
        return dict(meta["params"])
    fingerprint = link.split(":")[0]
    for path in (run / "nodes").glob("*/outputs.json"):
        other = json.loads(path.read_text())
        if other.get("fingerprint") == fingerprint:
            return {**other["params"], **meta["params"]}
    raise SystemExit(f"{run}: no node with the fingerprint {fingerprint} of {meta['node']}'s settings")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder that trained the teachers, e.g. runs/full_opd")
    parser.add_argument("--out", type=Path, default=Path("models/teachers"))
    parser.add_argument("--command", required=True, help="the command that made the run (recorded)")
    parser.add_argument("--commit", required=True, help="the commit that made the run (recorded)")
    parser.add_argument("--eval-node", default="eval", help="the Evaluator node whose results.json scores them")
    args = parser.parse_args()

    results = json.loads((args.run / "nodes" / args.eval_node / "results.json").read_text())
    category = categories(results)
    base_meta = json.loads((args.run / "nodes" / "base" / "outputs.json").read_text())
    base_path = Path(base_meta["outputs"][0]["path"])
    lines = [
        f"# {args.out.as_posix()}: teacher adapters for stage 2", "",
        "Flow-GRPO LoRA teachers (peft format, float32, unchanged from the run), one per mini-world task. Stage 2",
        "from them: `graphs/opd_from_teachers.yaml`. They fit only the base they were trained on:", "",
        f"- base: `models/{base_path.name}` (transformer weights sha256 `{transformer_digest(str(base_path))}`)",
        f"- made by: `{args.command}` at commit `{args.commit}` ({dt.date.today().isoformat()}), the run's stage 1",
        f"- written by: `python bench/ship_teachers.py {args.run.as_posix()} --out {args.out.as_posix()} ...`",
        "",
        "| teacher | reward | epochs x prompts x group = samples | optimizer steps | lr | clip "
        "| reward, epoch 1 -> last | held-out: teacher - base on its task (paired, 95 %) "
        "| teacher - its random control | files (sha256) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    metas = {node: json.loads((args.run / "nodes" / node / "outputs.json").read_text()) for node in TEACHERS.values()}
    wrong = [f"{node!r} is a {meta['type']}" for node, meta in metas.items()
             if meta["type"] not in (TRAINER, LOAD_ADAPTER)]
    if wrong:  # before anything is copied
        raise SystemExit(f"{args.run}: teacher nodes must be a {TRAINER} or a {LOAD_ADAPTER}: {', '.join(wrong)}")
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = []
    for task, node in TEACHERS.items():
        folder = args.run / "nodes" / node
        meta = metas[node]
        label = meta["outputs"][0]["label"]
        target = args.out / task
        if target.exists():
            shutil.rmtree(target)
        trained = meta["type"] == TRAINER
        source = folder / "adapter" if trained else Path(meta["params"]["adapter"])
        shutil.copytree(source, target)
        stamp_adapter(target, base_path, relative(base_path))  # its base, by weights (a run's stamp names its own path)
        files = ", ".join(f"{p.name} `{sha256(p)[:12]}`" for p in sorted(target.iterdir()))
        stat = paired(results, label, results["models"][0], task, category)
        control = f"random-{task}"
        versus = paired(results, label, control, task, category) if control in results["models"] else None
        table, reward = HEADLINE[task]
        metric = f"{reward} strict" if table == "strict" else reward
        scores = f"{metric}: {cell(stat)} | {f'{metric}: {cell(versus)} (`{control}`)' if versus else '-'} | {files} |"
        if not trained:  # an adapter trained elsewhere (e.g. a long probe): its budget is in its own provenance
            loaded.append(task)
            lines.append(f"| {task} (`{label}`) | loaded from `{relative(source)}` | see "
                         f"{provenance_of(source)} | | | | | {scores}")
            continue
        params = node_params(args.run, meta)
        history = json.loads((folder / "metrics.json").read_text())
        samples = params["epochs"] * params["prompts_per_epoch"] * params["group_size"]
        lines.append(
            f"| {task} (`{label}`) | {params['rewards']} | {params['epochs']} x {params['prompts_per_epoch']} x "
            f"{params['group_size']} = {samples} | {params['epochs'] * params['updates_per_epoch']} | {params['lr']} "
            f"| {params['clip_range']} | {history[0]['reward']:.3f} -> {history[-1]['reward']:.3f} | {scores}")
        settings = ", ".join(f"{k} {params[k]}" for k in SETTINGS if k in params)
        lines.append(f"|  | settings: {settings} | | | | | | | | |")
    budget = ("The trained teachers' budget is the main job's short CPU stage 1, not the paper's long-trained "
              "teachers (docs/experiments.md)")
    if loaded:
        budget += f"; {', '.join(loaded)} came trained from the folder named in its row, with that folder's budget"
    lines += ["", f"Held-out: the run's Evaluator (`{args.eval_node}`, {results['config']['images_per_prompt']} images "
              f"per prompt, ODE {results['config']['steps']} steps, seed {results['config']['seed']}); * = the "
              f"interval excludes 0. {budget}."]
    (args.out / "PROVENANCE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
