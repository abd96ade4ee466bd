"""The reward server under bad traffic (issue 18): pixel bombs, deep JSON, bad headers, stalled clients and
unknown methods each get the protocol's JSON error, and the server still scores a valid request afterwards."""

import base64
import json
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch

from flowopd_core.miniworld.sets import prompt_set, render_set
from flowopd_core.rewards import make_reward
from flowopd_core.rewards.client import RemoteReward
from flowopd_core.rewards.server import ServerLimits, start_server

ROOT = Path(__file__).resolve().parents[2]
PROMPT_SPEC = prompt_set("quality", "test", per_task=1)[0]
PROMPT = PROMPT_SPEC.to_json()


def solid_png(width, height):
    """A black 8-bit RGB PNG, built row by row: 4096 x 4096 compresses to ~49 KB (a pixel bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes(1 + 3 * width)  # filter byte 0, then RGB zeros
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def score_body(pngs):
    images = [base64.b64encode(data).decode() for data in pngs]
    return json.dumps({"version": 1, "images": images, "prompts": [PROMPT] * len(pngs)}).encode()


def post(url, body, timeout=30):
    """POST raw bytes to /score -> (status, decoded JSON answer, seconds)."""
    start = time.monotonic()
    request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.monotonic() - start


def raw_exchange(port, data, timeout=5.0):
    """Send raw bytes on a fresh connection, read until the server closes -> (status, JSON answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(sock)


def read_answer(sock):
    """Read one HTTP answer until EOF -> (status, decoded JSON body)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"Content-Type: application/json" in head, head
    return status, json.loads(body)


def assert_still_scores(url):
    """A valid request after the bad one: served, and equal to the in-process scores."""
    text = prompt_set("quality", "test", per_task=3, seed=1)
    images, prompts = render_set(text, seed=1), list(text)
    remote = RemoteReward(url, name="quality", timeout=10, retries=0)(images, prompts)
    local = make_reward("quality")(images, prompts)
    torch.testing.assert_close(remote.scores, local.scores, rtol=0, atol=0, equal_nan=True)
    assert remote.details == local.details


def port_of(handle):
    return handle.server.server_address[1]


# ------------------------------------------------------------------------------------------------ pixel budget
@pytest.fixture(scope="module")
def subprocess_server():
    """The reward served by its own process (default limits), to read that process's peak memory."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read a process's peak RSS")
    code = "from flowopd_core.rewards.server import serve; serve('quality', port=0)"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+", proc.stderr.readline())
        assert match, "server did not report its URL"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # a full pipe would block its logging
        assert_still_scores(match.group(0))  # warm: the reward and the imports are in memory
        yield proc, match.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def request_peak_mb(proc, url, body):
    """POST ``body``; -> (status, answer, seconds, the server's peak RSS during it above its RSS before, MB)."""
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS

    def memory():
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    before, _ = memory()
    status, answer, seconds = post(url, body)
    return status, answer, seconds, memory()[1] - before


def test_pixel_bomb_is_refused_from_its_header(subprocess_server):
    proc, url = subprocess_server
    bomb = solid_png(4096, 4096)
    assert len(bomb) < 50_000  # 49 KB declaring 16.8 M pixels
    for count in (1, 2):
        status, answer, seconds, peak = request_peak_mb(proc, url, score_body([bomb] * count))
        print(f"{count} x 4096x4096 bomb: {status} in {seconds:.3f} s, server peak +{peak:.0f} MB")
        assert status == 400 and answer["error"].startswith("images[0] has 4096x4096 pixels, over the limit 262144")
        assert seconds < 2 and peak < 500
    assert_still_scores(url)


def test_request_at_the_pixel_budget_is_scored_within_500_mb(subprocess_server):
    proc, url = subprocess_server
    limits = ServerLimits()
    side = 512
    count = limits.max_request_pixels // (side * side)
    assert side * side == limits.max_image_pixels and count * side * side == limits.max_request_pixels
    pngs = [solid_png(side, side)] * count
    status, answer, seconds, peak = request_peak_mb(proc, url, score_body(pngs))
    print(f"{count} x {side}x{side} at the budget: {status} in {seconds:.2f} s, server peak +{peak:.0f} MB")
    assert status == 200 and peak < 500
    local = make_reward("quality")(torch.zeros(1, 3, side, side), [PROMPT_SPEC])
    assert answer["scores"] == [local.scores.tolist()[0]] * count
    status, answer, _, peak = request_peak_mb(proc, url, score_body(pngs + pngs[:1]))  # one image over
    assert status == 400 and "over the request's budget of 4194304" in answer["error"] and peak < 50
    assert_still_scores(url)


# ------------------------------------------------------------------------------------------------ JSON and headers
@pytest.fixture(scope="module")
def server():
    with start_server("quality") as handle:
        yield handle


def test_deep_or_huge_json_gets_a_json_400(server):
    def nested(levels):  # a request whose prompt's spec nests lists: body, prompts, prompt, spec + levels
        value = []
        for _ in range(levels - 5):
            value = [value]
        return json.dumps({"version": 1, "images": [], "prompts": [{"text": "x", "spec": {"a": value}}]}).encode()

    cases = [
        (b"[" * 20_000 + b"]" * 20_000, "nests JSON deeper than the limit of 16 levels"),
        (nested(17), "nests JSON deeper than the limit of 16 levels"),
        (nested(16), "0 images but 1 prompts"),  # at the limit: parsed, refused by the next check
        (b"[" + b"{}," * 70_000 + b"{}]", "70002 JSON objects / arrays, over the limit 65536"),
        (b'{"version": 1, "images": [' + b"9" * 5000 + b"]}", "not valid JSON"),  # past Python's int digits
        (b'{"version": 1, "images": "\xff"}', "not valid JSON"),
    ]
    for body, message in cases:
        status, answer, seconds = post(server.url, body)
        assert status == 400 and message in answer["error"] and seconds < 2, (message, answer)
    assert_still_scores(server.url)


def test_bad_content_length_and_framing_get_json_errors(server):
    port = port_of(server)
    head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    cases = [
        (b"Content-Length: \xb2\r\n", 400, "bad Content-Length '\xb2': expected ASCII digits"),  # superscript two
        (b"Content-Length: \xd9\xa3\r\n", 400, "expected ASCII digits"),  # Arabic-Indic three, UTF-8
        (b"Content-Length: 12abc\r\n", 400, "expected ASCII digits"),
        (b"Content-Length: -5\r\n", 400, "expected ASCII digits"),
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400, "2 Content-Length headers"),
        (b"", 411, "Content-Length is required"),
        (b"Content-Length: " + b"9" * 5000 + b"\r\n", 413, "exceeds the limit"),
        (b"Transfer-Encoding: chunked\r\n", 400, "Transfer-Encoding is not supported"),
        (b"Content-Length: 100\r\n\r\n{}", 400, "body ended after 2 of its 100 bytes"),  # then the client half-closes
    ]
    for extra, code, message in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + extra + (b"" if extra.endswith(b"{}") else b"\r\n"))
            if extra.endswith(b"{}"):
                sock.shutdown(socket.SHUT_WR)
            status, answer = read_answer(sock)
        assert status == code and message in answer["error"], (extra, answer)
    assert_still_scores(server.url)


def test_unknown_methods_and_malformed_requests_get_json_errors(server):
    port = port_of(server)
    for method in ("PUT", "DELETE", "PATCH", "BREW"):
        status, answer = raw_exchange(port, f"{method} /score HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 501 and f"method {method!r} not supported" in answer["error"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # HEAD: status and headers, no body
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.0 501 ") and answer.endswith(b"\r\n\r\n")
    cases = [
        (b"\r\n", 400, "empty request line"),
        (b"GARBAGE\x00\x01 / nonsense\r\n\r\n", 400, "Bad request version"),
        (b"GET /health HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "request line longer than 65536"),
        (b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431, "Too many headers"),
        (b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    ]
    for data, code, message in cases:
        status, answer = raw_exchange(port, data)
        assert status == code and message in answer["error"], (data[:40], answer)
    assert_still_scores(server.url)


# ------------------------------------------------------------------------------------------------ stalled clients
def stall(port, count):
    """``count`` connections that each send half a request and then nothing."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        sockets.append(sock)
    return sockets


def test_a_stalled_client_is_timed_out_while_others_are_served():
    limits = ServerLimits(client_timeout=2.0, request_timeout=4.0)
    with start_server("quality", limits=limits) as handle:
        start = time.monotonic()
        (stalled,) = stall(port_of(handle), 1)
        assert_still_scores(handle.url)  # promptly, while the stalled connection is open
        assert time.monotonic() - start < 1.5
        status, answer = read_answer(stalled)  # then the server gives up on it, with a JSON 408
        waited = time.monotonic() - start
        stalled.close()
        assert status == 408 and "not received within the timeouts" in answer["error"]
        assert 1.9 < waited < 5, waited
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port_of(handle)), timeout=10) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\n")
            for _ in range(20):  # a header line every 0.5 s: never silent for client_timeout
                if select.select([trickle], [], [], 0.5)[0]:
                    break
                trickle.sendall(b"X: y\r\n")
            status, answer = read_answer(trickle)  # but the whole request is due within request_timeout
        assert status == 408 and 3.9 < time.monotonic() - start < 6
        assert_still_scores(handle.url)


def test_fifty_stalled_clients_use_a_bounded_pool():
    limits = ServerLimits(workers=8, client_timeout=0.5, request_timeout=2.0)
    with start_server("quality", limits=limits) as handle:
        before = threading.active_count()
        sockets = stall(port_of(handle), 50)
        time.sleep(0.3)
        assert threading.active_count() - before <= limits.workers
        start = time.monotonic()
        assert_still_scores(handle.url)  # waits behind the stalled ones: ~50 / 8 x 0.5 s
        assert time.monotonic() - start < 8
        for sock in sockets:
            status, answer = read_answer(sock)
            sock.close()
            assert status == 408, answer
        assert threading.active_count() - before <= limits.workers


def test_connections_over_the_limit_get_a_json_503():
    limits = ServerLimits(workers=1, max_connections=2, client_timeout=1.0)
    with start_server("quality", limits=limits) as handle:
        stalled = stall(port_of(handle), 2)  # one served, one queued
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port_of(handle)), timeout=5) as sock:
            status, answer = read_answer(sock)
        assert status == 503 and "server busy: 2 connections open" in answer["error"]
        for sock in stalled:
            assert read_answer(sock)[0] == 408
            sock.close()
        assert_still_scores(handle.url)


def test_limits_are_checked_and_published(server):
    with pytest.raises(ValueError, match="max_request_pixels must be >= max_image_pixels"):
        ServerLimits(max_image_pixels=1024 * 1024, max_request_pixels=512 * 512)
    with pytest.raises(ValueError, match="max_connections must be >= workers"):
        ServerLimits(workers=8, max_connections=4)
    with pytest.raises(ValueError, match="client_timeout"):
        ServerLimits(client_timeout=0)
    with urllib.request.urlopen(server.url + "/info", timeout=5) as response:
        assert json.loads(response.read())["limits"]["max_request_pixels"] == 16 * 512 * 512
