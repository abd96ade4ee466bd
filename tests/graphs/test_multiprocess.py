"""The same graph under ``torchrun --nproc_per_node 2`` (gloo on the CPU): data-parallel training, process 0
alone writes the run directory, both processes end with bit-identical adapters; a rerun is served from cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--set", "teacher.epochs=3", "--set", "teacher.group_size=2", "--set", "teacher.prompts_per_epoch=4",
    "--set", "teacher.steps=3", "--set", "teacher.checkpoint_every=1", "--set", "teacher.lora_rank=4",
    "--set", "teacher.lr=0.01", "--set", "test.per_task=2", "--set", "eval.steps=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _torchrun(run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "runner.py"), "run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(run_dir),
               "--no-progress", *TINY]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_two_processes_train_one_adapter_and_process_0_writes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    done = _torchrun(run_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "(2 processes)" in done.stdout and done.stdout.count("grpo_teacher:") == 1  # process 0 reports

    status = json.loads((run_dir / "status.json").read_text())
    assert status["executed"] == 6 and status["failed"] == 0  # 5 nodes and teacher_settings (flat settings)
    log = (run_dir / "run.log").read_text()
    assert "(process 0 of 2)" in log and "the 2 processes hold identical LoRA weights" in log
    # Process 1 trained alongside (its own log and files under ranks/rank1) and ran nothing else.
    rank1 = run_dir / "ranks" / "rank1"
    assert "node base (FlowOPDLoadModel): runs in process 0" in (rank1 / "run.log").read_text()
    assert sorted(p.name for p in rank1.iterdir()) == ["run.log", "teacher"]
    assert sorted(p.name for p in (run_dir / "cache").iterdir()) == [
        "base", "eval", "teacher", "teacher_settings", "test", "train"]

    a = load_file(str(run_dir / "nodes" / "teacher" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(rank1 / "teacher" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    history = json.loads((run_dir / "nodes" / "teacher" / "metrics.json").read_text())
    assert [h["groups"] for h in history] == [4, 4, 4]  # metrics cover both processes' groups
    assert history[-1]["optimizer_steps"] > 0 and sum(h["trained_samples"] for h in history) > 0
    def untimed(entries: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in entries]

    assert untimed(json.loads((rank1 / "teacher" / "metrics.json").read_text())) == untimed(history)  # the same
    assert (run_dir / "nodes" / "eval" / "results.md").is_file()

    again = _torchrun(run_dir)  # process 0 finds every node cached; process 1 follows it
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads((run_dir / "status.json").read_text())["cached"] == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nccl needs CUDA GPUs; this machine has none (the gloo "
                    "test above covers the same code on the CPU)")
def test_nccl_processes_one_per_gpu_average_gradients_and_end_identical(tmp_path):
    """The same graph under torchrun with nccl, one process per visible GPU. With one GPU it is a single CUDA
    process (nccl needs a GPU per rank): the device path of the trainers, without gradient averaging."""
    run_dir = tmp_path / "run"
    gpus = torch.cuda.device_count()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               str(ROOT / "runner.py"), "run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(run_dir),
               "--no-progress", *TINY, "--set", "base.device=cuda"]
    env = {**ENV, "FLOWOPD_DIST_BACKEND": "nccl"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    log = (run_dir / "run.log").read_text()
    assert f"(process 0 of {gpus})" in log or gpus == 1
    if gpus > 1:
        assert f"the {gpus} processes hold identical LoRA weights" in log
    assert (run_dir / "nodes" / "eval" / "results.md").is_file()
