"""The runner killed mid-training (SIGKILL at any point, or SIGTERM: checkpoint first) continues from its last
checkpoint when the same command is run again, and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import runner

ROOT = Path(__file__).resolve().parents[2]
GRAPH = ROOT / "graphs" / "grpo_teacher.yaml"
TINY = [
    "--set", "teacher.epochs=5", "--set", "teacher.group_size=2", "--set", "teacher.prompts_per_epoch=2",
    "--set", "teacher.steps=3", "--set", "teacher.checkpoint_every=1", "--set", "teacher.lora_rank=4",
    "--set", "teacher.lr=0.01", "--set", "test.per_task=2", "--set", "eval.steps=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _command(run_dir: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "runner.py"), "run", str(GRAPH), "--run-dir", str(run_dir), "--no-progress", *TINY
    ]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "nodes" / "teacher" / "adapter" / "adapter_model.safetensors"))


def _signal_after_first_checkpoint(run_dir: Path, signum: int) -> subprocess.CompletedProcess:
    """Start the runner, send ``signum`` as soon as the first checkpoint is complete; returns the finished process."""
    proc = subprocess.Popen(_command(run_dir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints" / "teacher").glob("*/epoch_000001/manifest.json")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _rerun_and_compare(run_dir: Path, straight: dict[str, torch.Tensor]) -> int:
    """Rerun the same command; check it resumed and matches ``straight`` bit for bit; returns the resumed epoch."""
    done = subprocess.run(_command(run_dir), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (epoch,) = map(int, re.findall(r"resumed grpo-compose at epoch (\d+)", (run_dir / "run.log").read_text()))
    resumed = _adapter(run_dir)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not any((run_dir / "checkpoints" / "teacher").iterdir())  # removed once the node succeeded
    return epoch


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted run (in this process, with the subprocesses' one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("straight")
        assert runner.main(["run", str(GRAPH), "--run-dir", str(run_dir), "--no-progress", *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return _adapter(run_dir)


def test_sigkill_mid_training_then_rerun_is_bit_identical(tmp_path, straight):
    run_dir = tmp_path / "run"
    killed = _signal_after_first_checkpoint(run_dir, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "nodes" / "teacher").exists()  # it died inside the training node
    assert 1 <= _rerun_and_compare(run_dir, straight) < 5


def test_sigterm_checkpoints_the_running_epoch_then_exits_and_resumes(tmp_path, straight):
    run_dir = tmp_path / "run"
    stopped = _signal_after_first_checkpoint(run_dir, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM: stopping after this epoch" in stopped.stderr
    assert "rerun the same command to resume" in stopped.stderr
    (message,) = re.findall(r"node 'teacher' stopped after (\d+) epochs; its checkpoint is (\S+);", stopped.stderr)
    epochs, checkpoint = int(message[0]), Path(message[1])
    assert 2 <= epochs < 5 and checkpoint.name == f"epoch_{epochs:06d}"  # the epoch it was in, checkpointed
    assert "Traceback" not in (run_dir / "run.log").read_text()
    assert _rerun_and_compare(run_dir, straight) == epochs
