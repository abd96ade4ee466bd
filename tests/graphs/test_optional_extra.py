"""Without the 'miniworld' extra (rapidocr, onnxruntime, Levenshtein) the core imports and graphs validate; an OCR
reward says which extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowopd_core.rewards import ocr

ROOT = Path(__file__).resolve().parents[2]
HIDE = "import sys; sys.modules.update(dict.fromkeys(['rapidocr', 'onnxruntime', 'Levenshtein']))\n"


def test_core_imports_and_graphs_validate_without_the_extra():
    script = HIDE + (
        "import flowopd_core.rewards, flowopd_core.grpo.trainer, flowopd_core.distill.trainer\n"
        "from flowopd_nodes.cli import main\n"
        "sys.exit(main(['validate', 'graphs/full_opd.yaml']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "valid" in done.stdout


def test_an_ocr_reward_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "Levenshtein", None)  # `import Levenshtein` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[miniworld\]'"):
        ocr.OCRReward()
    with pytest.raises(ImportError, match="miniworld"):
        ocr.ocr_score("CAT", "CAT!")
