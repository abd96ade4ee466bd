"""bench/compose_probe.py (issue 20): the split mode's refusals come before any model loads, and the rollout gap
pairs only curves of one seed and slice (both adapters then draw the same prompts and noise each epoch)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowopd_core.models.base_stamp import BASE_STAMP, read_stamp, stamp_adapter, transformer_digest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "compose_probe.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (("--only", "teacher"), "--only needs --save"),
    (("--load", "{full}", "--save", "{out}"), "--load evaluates saved adapters"),
    (("--load", "{missing}",), "no saved adapter for ['teacher', 'control']"),
    (("--init", "{half}", "--save", "{out}"), "no saved adapter for ['control']"),
    (("--load", "{full}", "--model", "{other}"), "its teacher was trained on"),
    (("--beta", "nan", "--only", "teacher", "--save", "{out}"), "--beta must be a number >= 0"),
    (("--beta", "-0.1", "--only", "teacher", "--save", "{out}"), "--beta must be a number >= 0"),
])
def test_bad_combinations_are_refused_before_loading(tmp_path, args, message):
    half, full = tmp_path / "half", tmp_path / "full"
    for folder, adapters in ((half, ("teacher",)), (full, ("teacher", "control"))):
        for adapter in adapters:
            (folder / adapter).mkdir(parents=True)
            (folder / adapter / "adapter_model.safetensors").write_bytes(b"")
            (folder / f"{adapter}_rollouts.json").write_text(json.dumps({"model": str(tmp_path / "base")}))
    args = [a.format(missing=tmp_path / "none", half=half, full=full, out=tmp_path / "out", other=tmp_path / "other")
            for a in args]
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_rollout_gap_pairs_only_curves_of_one_slice(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import compose_probe

    teacher = {"seed": 0, "beta": 0.01, "balance": False, "init": None, "compose_per_epoch": [0.5, 0.6, 0.7, 0.8]}
    control = {"seed": 0, "beta": 0.01, "balance": False, "init": None, "compose_per_epoch": [0.5, 0.5, 0.6, 0.6]}
    compose_probe.rollout_gap({"teacher": teacher, "control": control})
    out = capsys.readouterr().out
    assert "first half (2 epochs): +0.0500 +- 0.0980" in out  # gaps 0.0 and 0.1: mean 0.05, 1.96 * 0.0707 / 1.414
    assert "all epochs (4 epochs): +0.1000" in out
    for key, other in (("seed", 1), ("beta", 0.1), ("balance", True), ("init", "slice-1")):
        compose_probe.rollout_gap({"teacher": teacher, "control": {**control, key: other}})
        assert "no paired rollout curves" in capsys.readouterr().out
    compose_probe.rollout_gap({"teacher": teacher, "control": {**control, "compose_per_epoch": [0.5] * 3}})
    assert "no paired rollout curves" in capsys.readouterr().out


def test_both_adapters_train_a_slice(tmp_path):
    """One tiny split slice per adapter on the shipped base: the control (the random reward, compose logged at
    weight 0) must pass the trainer's checks as the teacher does, and each writes its adapter and curve."""
    for adapter in ("teacher", "control"):
        done = run("--epochs", "1", "--prompts-per-epoch", "1", "--only", adapter, "--save", str(tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / adapter / "adapter_model.safetensors").is_file()
        curve = json.loads((tmp_path / f"{adapter}_rollouts.json").read_text())
        assert len(curve["compose_per_epoch"]) == 1
        weights = ROOT / "models" / "miniworld" / "transformer" / "diffusion_pytorch_model.safetensors"
        stamp = read_stamp(tmp_path / adapter)
        assert stamp["transformer_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert "model_sha256" not in curve  # the base is recorded once: in the adapter's stamp


def test_saved_adapters_match_their_base_by_weights(tmp_path, monkeypatch):
    """Saved adapters load on any folder with their base's transformer weights (a kept copy, a moved checkout)
    and are refused on other weights, by their base stamp; a folder saved before stamps existed is checked by the
    sha256 its curve recorded, else by the folder's path; a broken stamp is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import compose_probe

    base, copy, other = tmp_path / "base", tmp_path / "copy", tmp_path / "other"
    for folder, weights in ((base, b"weights"), (copy, b"weights"), (other, b"other weights")):
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    assert transformer_digest(str(base)) == hashlib.sha256(b"weights").hexdigest()
    assert transformer_digest(str(tmp_path / "none")) is None

    def saved(name: str, stamp: bool = False, **curve) -> Path:
        for adapter in ("teacher", "control"):
            (tmp_path / name / adapter).mkdir(parents=True)
            (tmp_path / name / adapter / "adapter_model.safetensors").write_bytes(b"")
            (tmp_path / name / f"{adapter}_rollouts.json").write_text(json.dumps(curve))
            if stamp:
                stamp_adapter(tmp_path / name / adapter, base)
        return tmp_path / name

    stamped = saved("stamped", stamp=True, model=str(base))
    assert compose_probe.saved_problem(stamped, str(base)) is None
    assert compose_probe.saved_problem(stamped, str(copy)) is None  # same weights, another folder
    assert "link the base it was trained on" in compose_probe.saved_problem(stamped, str(other))
    (stamped / "control" / BASE_STAMP).write_text("{}")
    assert "is not a flowopd base stamp" in compose_probe.saved_problem(stamped, str(base))
    hashed = saved("hashed", model=str(base), model_sha256=transformer_digest(str(base)))
    assert compose_probe.saved_problem(hashed, str(base)) is None
    assert compose_probe.saved_problem(hashed, str(copy)) is None
    assert "transformer weights have sha256" in compose_probe.saved_problem(hashed, str(other))
    by_path = saved("by_path", model=str(base))
    assert compose_probe.saved_problem(by_path, str(base)) is None
    assert "its teacher was trained on" in compose_probe.saved_problem(by_path, str(copy))
