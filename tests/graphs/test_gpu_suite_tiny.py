"""bench/gpu_suite.py (issue 21) on the CPU: ``--tiny`` runs every measurement of the GPU suite with the
mini-world's unit-test model, as CI does, so that the script cannot rot between GPU runs; without a GPU and
without ``--tiny`` it stops with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run_all import VERDICT

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_suite.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SECTIONS = (
    "### 1. Flow-GRPO and Flow-OPD iterations",
    "### 2. Training forward + backward: precision, checkpointing, text length, MFU",
    "### 3. The authors' loop structure at their shapes vs ours",
)
ROWS = (
    "| Flow-GRPO, one LoRA policy |",
    "| Flow-OPD, K=3 teacher adapters + anchor adapter on one base |",
    "| bf16, checkpointing off (auto), T5 16 |",
    "| bf16, checkpointing on, T5 16 |",
    "| bf16, checkpointing off (auto), T5 32 |",
    "| fp32 weights and compute, checkpointing off, T5 16 |",
    "| the authors' structure |",
    "| ours, default settings (OPDConfig) |",
    "| ours, the largest batch that fits of [4, 8] |",
)


@pytest.mark.slow
def test_tiny_suite_runs_every_measurement_on_the_cpu(tmp_path):
    """About 15 s on a 2-core CPU (imports included)."""
    output = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output", str(output)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = output.read_text()
    assert text.startswith("# GPU suite (issue 21): --tiny CPU check\n")
    assert "Incomplete" not in text and "Suite wall time" in text
    assert [s for s in SECTIONS if s in text] == list(SECTIONS)
    assert [r for r in ROWS if r in text] == list(ROWS)
    assert "Device: CPU" in text and "Commit: " in text and "Date: " in text
    checks = [line for line in text.splitlines() if line.startswith("Check (--tiny")]
    assert len(checks) == 3 and sum("**met**" in c or "**MISSED**" in c for c in checks) == 2
    assert not any(VERDICT.match(line) for line in text.splitlines())  # run_all lists no toy figure as a target
    assert SECTIONS[0] in done.stdout  # printed as well


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_the_suite_exits_2_and_names_tiny():
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()[-1]
    assert "needs a CUDA device" in message and "--tiny" in message
