"""runner.py serve-reward: serves a registered reward on loopback; bad names/config exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import runner

ROOT = Path(__file__).resolve().parents[2]


def test_unknown_reward_and_bad_config_exit_2(capsys):
    assert runner.main(["serve-reward", "no-such-reward", "--port", "0"]) == 2
    assert runner.main(["serve-reward", "pickscore", "--port", "0", "--set", "model_path=/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward" in err and "/no/such/folder" in err
    assert runner.main(["serve-reward", "quality", "--port", "0", "--limit", "max_pixels=9"]) == 2
    assert "unknown field(s) ['max_pixels']" in capsys.readouterr().err
    assert runner.main(["serve-reward", "quality", "--port", "0", "--limit", "workers=0"]) == 2
    assert "workers" in capsys.readouterr().err


def test_serves_on_loopback():
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "runner.py"), "serve-reward", "quality", "--port", "0",
         "--limit", "max_image_pixels=4096", "--limit", "workers=2"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        deadline, url = time.time() + 60, None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            url = match.group(0) if match else None
        assert url, "server did not report its URL"
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            assert json.loads(response.read())["name"] == "quality"
        with urllib.request.urlopen(url + "/info", timeout=10) as response:
            limits = json.loads(response.read())["limits"]
        assert limits["max_image_pixels"] == 4096 and limits["workers"] == 2  # --limit reached the server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
