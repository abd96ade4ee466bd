"""bench/noise_share.py splits a group's reward spread between x_T and the SDE steps: with almost no SDE noise a
shared x_T leaves nothing to the steps (share ~ 0), while own x_T still spreads the rewards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_without_step_noise_the_steps_share_nothing():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "noise_share.py"), "--task", "quality", "--prompts", "2",
         "--repeats", "1", "--noise-level", "1e-4", "--min-step-std", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (own|shared)[^|]*\| [\d.]+ \| ([\d.]+) \|",
                                                                  out.stdout, re.M)}
    assert rows["own"] > 1e-4  # different x_T: different images, different scores
    share = float(re.search(r"steps cause: ([\d.]+)", out.stdout).group(1))
    assert share < 0.01, out.stdout
