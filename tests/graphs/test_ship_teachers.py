"""bench/ship_teachers.py (issue 20): a run's teachers are shipped byte for byte with their provenance, whether a
teacher node trained its adapter (FlowOPDGRPOTrainer) or loaded one trained elsewhere (FlowOPDLoadAdapter, as
graphs/teachers_binding.yaml loads the long compose probe's)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "ship_teachers.py"
TASK_OF = {"teacher_compose": "compose", "teacher_text": "text", "teacher_quality": "quality"}
HEADLINE = {"compose": ("strict", "compose"), "text": ("scores", "ocr"), "quality": ("scores", "quality")}


def write_json(path: Path, data: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def adapter(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True)
    write_json(folder / "adapter_config.json", {"peft_type": "LORA", "r": 16})
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(seed, seed + 64)))


def samples(task_gain: dict[str, float]) -> list[dict]:
    """Two prompts per task, two images each; the headline metric 0.5 + the model's gain on that task."""
    rows = []
    for t, task in enumerate(HEADLINE):
        table, metric = HEADLINE[task]
        for p in range(2):
            for k in range(2):
                index = (2 * t + p) * 2 + k
                value = 0.5 + task_gain.get(task, 0.0) + 0.01 * (p + k)
                rows.append({"task": task, "index": index, "prompt_id": f"{task}-{p}", "category": task,
                             "strict": {metric: value} if table == "strict" else {},
                             "scores": {metric: value} if table == "scores" else {}})
    return rows


def fake_run(tmp_path: Path) -> tuple[Path, Path]:
    """A finished teachers run: text and quality trained in it, compose loaded from a probe folder."""
    run, base, probe = tmp_path / "run", tmp_path / "models" / "binding", tmp_path / "probe" / "groups_6144"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    write_json(run / "nodes" / "base" / "outputs.json", {"outputs": [{"path": str(base)}]})
    adapter(probe / "teacher", 0)
    (probe.parent / "PROVENANCE.md").write_text("# the probe\n")
    write_json(run / "nodes" / "teacher_compose" / "outputs.json", {
        "node": "teacher_compose", "type": "FlowOPDLoadAdapter", "params": {"adapter": str(probe / "teacher")},
        "inputs": {}, "outputs": [{"label": "grpo-compose"}]})
    for seed, node in enumerate(("teacher_text", "teacher_quality"), start=1):
        task = TASK_OF[node]
        adapter(run / "nodes" / node / "adapter", seed)
        write_json(run / "nodes" / node / "outputs.json", {
            "node": node, "type": "FlowOPDGRPOTrainer", "inputs": {}, "outputs": [{"label": f"grpo-{task}"}],
            "params": {"rewards": "ocr" if task == "text" else "quality", "epochs": 16, "prompts_per_epoch": 8,
                       "group_size": 8, "updates_per_epoch": 8, "lr": 0.001, "clip_range": 0.01, "seed": 0}})
        write_json(run / "nodes" / node / "metrics.json", [{"epoch": 1, "reward": 0.6}, {"epoch": 16, "reward": 0.8}])
    models = {"base": {}, "grpo-compose": {"compose": 0.2}, "random-compose": {"compose": -0.1},
              "grpo-text": {"text": 0.1}, "grpo-quality": {"quality": 0.1}}
    write_json(run / "nodes" / "eval" / "results.json", {
        "models": list(models), "config": {"images_per_prompt": 2, "steps": 16, "seed": 0, "confidence": 0.95},
        "samples": {name: samples(gain) for name, gain in models.items()}})
    return run, probe


def ship(run: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(out), "--command", "python x.py",
                           "--commit", "abc1234"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_trained_and_loaded_teachers_ship_with_their_provenance(tmp_path):
    run, probe = fake_run(tmp_path)
    out = tmp_path / "shipped"
    done = ship(run, out)
    assert done.returncode == 0, done.stderr
    sources = {"compose": probe / "teacher", "text": run / "nodes" / "teacher_text" / "adapter",
               "quality": run / "nodes" / "teacher_quality" / "adapter"}
    for task, source in sources.items():  # byte for byte
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / task / name).read_bytes() == (source / name).read_bytes(), (task, name)
    provenance = (out / "PROVENANCE.md").read_text()
    rows = {line.split(" ")[1]: line for line in provenance.splitlines() if line.startswith("| ") and "(`grpo-" in line}
    assert set(rows) == {"compose", "text", "quality"}
    assert f"loaded from `{probe / 'teacher'}`" in rows["compose"]
    assert f"`{probe.parent / 'PROVENANCE.md'}`" in rows["compose"]  # where its budget is written
    assert "compose strict: +0.20 ± 0.00 *" in rows["compose"]  # vs the base
    assert "compose strict: +0.30 ± 0.00 * (`random-compose`)" in rows["compose"]  # vs its control
    assert "| ocr | 16 x 8 x 8 = 1024 | 128 | 0.001 | 0.01 | 0.600 -> 0.800 | ocr: +0.10 ± 0.00 * | - |" in rows["text"]
    assert "compose came trained from the folder named in its row" in provenance
    assert f"transformer weights sha256 `{hashlib.sha256(b'weights').hexdigest()}`" in provenance  # the base


def test_a_teacher_node_of_another_type_is_refused_before_anything_is_written(tmp_path):
    run, _ = fake_run(tmp_path)
    meta_path = run / "nodes" / "teacher_quality" / "outputs.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "type": "FlowOPDDistiller"}))
    out = tmp_path / "shipped"
    done = ship(run, out)
    assert done.returncode != 0
    assert "'teacher_quality' is a FlowOPDDistiller" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
