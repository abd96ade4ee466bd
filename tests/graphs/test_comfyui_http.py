"""Against a real ComfyUI over HTTP: runs only when COMFYUI_DIR points at a ComfyUI tree (CI has none).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] pytest tests/graphs/test_comfyui_http.py

The server is started with a throw-away base directory whose custom_nodes/ links this repository, on a free
port, CPU only. Checked: /object_info lists every node as declared; a graph exported by runner.py and posted
to /prompt succeeds and writes the same images as runner.py; a broken graph is refused with node_errors;
a training node reports progress and metrics over the websocket, stops on POST /interrupt keeping its
checkpoint, and resumes from it when the graph is queued again.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runner
from flowopd_nodes.comfy.format import to_api_prompt
from flowopd_nodes.comfy.plugin import NODE_CLASS_MAPPINGS
from flowopd_nodes.engine.graph import apply_overrides, load_graph_file
from flowopd_nodes.engine.validate import validate

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI tree to run the live ComfyUI test"),
    pytest.mark.slow,
]
ROOT = Path(__file__).resolve().parents[2]
PREVIEW = ["compose.per_task=2", "text.per_task=2", "quality.per_task=2"]
GRPO = [
    "teacher.epochs=4", "teacher.group_size=2", "teacher.prompts_per_epoch=2", "teacher.steps=3",
    "teacher.checkpoint_every=1", "teacher.lora_rank=4", "teacher.lr=0.01", "test.per_task=2", "eval.steps=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def request(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read().decode()
                return resp.status, json.loads(text) if text.strip() else {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read().decode() or "{}")

    def queue(self, prompt: dict, client_id: str = "") -> str:
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, history = self.request(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish; see {self.log}")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "flowopd").symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    log = base / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=handle, stderr=subprocess.STDOUT, env=env)
    server = Comfy(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
            try:
                if server.request("/object_info/FlowOPDSeed")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"ComfyUI did not come up; see {log}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Events(threading.Thread):
    """A minimal websocket client for ComfyUI's /ws (text frames only): collects the JSON messages."""

    def __init__(self, url: str, client_id: str):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=300)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.messages: list[dict] = []
        self.start()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def run(self) -> None:
        try:
            while True:
                b1, b2 = self._read(2)
                length = b2 & 0x7F
                if length == 126:
                    length = struct.unpack(">H", self._read(2))[0]
                elif length == 127:
                    length = struct.unpack(">Q", self._read(8))[0]
                payload = self._read(length)
                if b1 & 0x0F == 1:  # text frame (binary frames are preview images)
                    self.messages.append(json.loads(payload))
        except (ConnectionError, OSError):
            pass

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]


def _prompt(graph: str, overrides: list[str]) -> dict:
    g = load_graph_file(ROOT / "graphs" / graph)
    apply_overrides(g, overrides)
    return to_api_prompt(validate(g))


def test_object_info_lists_every_node_as_declared(comfy):
    status, info = comfy.request("/object_info")
    assert status == 200
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        entry = info[node_id]
        assert entry["display_name"] == cls.DISPLAY_NAME and entry["category"] == cls.CATEGORY
        assert entry["description"] == cls.DESCRIPTION and entry["output_node"] == cls.OUTPUT_NODE
        assert entry["output"] == list(cls.RETURN_TYPES) and entry["output_name"] == list(cls.RETURN_NAMES)
        assert json.loads(json.dumps(cls.INPUT_TYPES())) == entry["input"]


def test_exported_graph_runs_in_comfyui_and_matches_the_runner(comfy, tmp_path):
    args = [a for o in PREVIEW for a in ("--set", o)]
    assert runner.main([
        "run", str(ROOT / "graphs" / "miniworld_preview.yaml"), "--run-dir", str(tmp_path), "--no-progress", *args
    ]) == 0
    entry = comfy.wait(comfy.queue(_prompt("miniworld_preview.yaml", PREVIEW)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    for task in ("compose", "text", "quality"):
        (image,) = entry["outputs"][f"{task}_grid"]["images"]
        assert image["type"] == "output" and image["filename"] == f"{task}.png"
        in_comfy = np.asarray(Image.open(comfy.base / "output" / image["subfolder"] / image["filename"]))
        in_runner = np.asarray(Image.open(tmp_path / "nodes" / f"{task}_grid" / f"{task}.png"))
        assert in_comfy.shape == in_runner.shape and np.array_equal(in_comfy, in_runner), task


def test_broken_graph_is_refused_with_node_errors(comfy):
    prompt = _prompt("evaluate_base.yaml", ["prompts.per_task=1"])
    prompt["base"]["inputs"]["path"] = "/no/such/model"
    prompt["eval"]["inputs"]["steps"] = 0
    prompt["eval"]["inputs"]["prompts"] = ["base", 0]  # a model where prompts belong
    status, body = comfy.request("/prompt", {"prompt": prompt})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]
    eval_errors = errors["eval"]["errors"]
    # ours: VALIDATE_INPUTS takes input_types, so ComfyUI leaves the link types to it
    assert any(e["type"] == "return_type_mismatch" or "[return_type_mismatch]" in e["details"] for e in eval_errors)
    # ComfyUI's own range check, or ours where the node has custom checks (VALIDATE_INPUTS) and ComfyUI skips its own
    assert any(e["type"] == "value_smaller_than_min" or "value_smaller_than_min" in e["details"] for e in eval_errors)
    assert errors["eval"]["class_type"] == "FlowOPDEvaluator"
    base = errors["base"]["errors"]
    assert {e["type"] for e in base} == {"custom_validation_failed"}
    assert any("file_not_found" in e["details"] for e in base)


def test_training_node_progress_metrics_stop_and_resume(comfy):
    client = uuid.uuid4().hex
    events = Events(comfy.url, client)
    prompt = _prompt("grpo_teacher.yaml", GRPO)
    checkpoints = comfy.base / "output" / "flowopd" / "checkpoints" / "teacher-FlowOPDGRPOTrainer"
    first = comfy.queue(prompt, client)
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/epoch_*/history.json")):
        assert time.time() < deadline, f"no checkpoint appeared; see {comfy.log}"
        time.sleep(0.2)
    assert comfy.request("/interrupt", {})[0] == 200
    stopped = comfy.wait(first)
    assert stopped["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in stopped["status"]["messages"])
    (kept,) = checkpoints.iterdir()
    newest = sorted(kept.glob("epoch_*"))[-1]
    done_before = [h["epoch"] for h in json.loads((newest / "history.json").read_text())]
    assert 1 <= len(done_before) < 4 and (newest / "trainer_state.safetensors").is_file()

    entry = comfy.wait(comfy.queue(prompt, client))  # the same graph again: resumes from the checkpoint
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert not kept.exists()  # removed once the node succeeded
    (folder,) = [p for p in (comfy.base / "output" / "flowopd" / "teacher-FlowOPDGRPOTrainer").iterdir()]
    history = json.loads((folder / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert entry["outputs"]["teacher"]["images"][0]["filename"] == "curves.png"
    metrics = [m for m in events.of("flowopd.metrics") if m["node"] == "teacher"]
    epochs = [m["metrics"]["epoch"] for m in metrics]
    assert set(epochs) == {0, 1, 2, 3} and epochs[len(done_before):][-1] == 3  # resumed run reports only new epochs
    progress = [m for m in events.of("progress") if m.get("node") == "teacher"]
    # the bar counts each epoch's sampling batches and optimizer steps: the same number in each of the 4 epochs
    assert progress and progress[-1]["value"] == progress[-1]["max"] and progress[-1]["max"] % 4 == 0
    assert len({m["max"] for m in progress}) == 1 and progress[-1]["max"] > 4
