"""bench/kl_by_step.py compares a teacher's and a student's velocities step by step on the student's own
trajectories: a student that is the teacher has no gap at any step, the base has one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEACHER = str(ROOT / "models" / "teachers" / "quality")


def gaps(*args: str) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kl_by_step.py"), "--teacher", TEACHER, "--prompts", "2",
         "--images", "1", *args], capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [float(m.group(1)) for m in re.finditer(r"^\| \d \| [\d.]+ \| [\d.e+-]+ \| ([\d.e+-]+) \|", out.stdout,
                                                     re.M)]


def test_the_teacher_as_student_has_no_gap_and_the_base_has_one():
    assert gaps("--student", TEACHER) == [0.0] * 7  # 8 steps, the last one untrained
    base = gaps()
    assert len(base) == 7 and all(g > 0 for g in base)


def test_an_adapter_of_another_base_is_refused():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kl_by_step.py"), "--model",
                          str(ROOT / "models" / "binding"), "--teacher", TEACHER], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2 and "was trained on the base" in out.stderr
