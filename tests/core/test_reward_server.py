"""Reward server and client on loopback (issue 4: a reward served over HTTP returns the in-process scores)."""

import base64
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from flowopd_core.miniworld.sets import prompt_set, render_set
from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards import make_reward
from flowopd_core.rewards.base import Reward, images_to_uint8
from flowopd_core.rewards.client import RemoteReward, RemoteRewardError
from flowopd_core.rewards.server import ServerLimits, build_reward, encode_image, start_server

TASK_OF = {"compose": "compose", "ocr": "text", "quality": "quality"}
FAST = {"timeout": 10.0, "retries": 0}


def varied_batch(task, n=12, seed=0):
    """Ground-truth renders with float noise of growing strength, every third prompt swapped: varied scores."""
    prompts = list(prompt_set(task, "test", per_task=n, seed=seed))
    images = render_set(prompt_set(task, "test", per_task=n, seed=seed), seed=seed)
    strength = torch.linspace(0.0, 0.5, len(prompts)).view(-1, 1, 1, 1)
    images = (images + strength * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)))
    images = images.clamp(0.0, 1.0)
    for i in range(0, len(prompts) - 1, 3):
        prompts[i] = prompts[i + 1]
    return images, prompts


def assert_same_result(remote, local):
    assert remote.name == local.name
    torch.testing.assert_close(remote.scores, local.scores, rtol=0, atol=0, equal_nan=True)
    assert (remote.strict is None) == (local.strict is None)
    if local.strict is not None:
        torch.testing.assert_close(remote.strict, local.strict, rtol=0, atol=0, equal_nan=True)
    assert remote.details == local.details


def post(url, payload, raw=None):
    """POST JSON (or ``raw`` bytes) -> (status, decoded JSON answer)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url + "/score", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def png(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode or "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Proxy:
    """A loopback HTTP proxy in front of a reward server: counts POSTs and fails the first ``fail`` of them."""

    def __init__(self, upstream, fail=0, status=503):
        self.posts, self.fail, self.status = 0, fail, status
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.relay(urllib.request.Request(upstream + self.path))

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.posts += 1
                if proxy.posts <= proxy.fail:
                    self.answer(proxy.status, json.dumps({"version": 1, "error": "injected failure"}).encode())
                    return
                self.relay(urllib.request.Request(upstream + self.path, data=body))

            def relay(self, request):
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        self.answer(response.status, response.read())
                except urllib.error.HTTPError as exc:
                    self.answer(exc.code, exc.read())

            def answer(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def servers():
    handles = {name: start_server(name) for name in TASK_OF}
    yield handles
    for handle in handles.values():
        handle.close()


# ------------------------------------------------------------------------------------------------ equality
@pytest.mark.parametrize("name", sorted(TASK_OF))
def test_served_scores_equal_in_process_scores(servers, name):
    images, prompts = varied_batch(TASK_OF[name])
    local = make_reward(name)(images, prompts)
    assert len(set(local.scores.tolist())) > 2  # a varied batch, so equality means something
    remote = RemoteReward(servers[name].url, name=name, **FAST)(images, prompts)
    assert_same_result(remote, local)
    # what the PNGs carry: the uint8 quantisation, which every reward applies itself before scoring
    quantised = torch.from_numpy(images_to_uint8(images)).permute(0, 3, 1, 2).float() / 255.0
    assert_same_result(make_reward(name)(quantised, prompts), local)


def test_batching_splits_into_requests_and_keeps_the_result(servers):
    images, prompts = varied_batch("compose", n=10)
    proxy = Proxy(servers["compose"].url)
    try:
        split = RemoteReward(proxy.url, batch_size=3, **FAST)(images, prompts)
        assert proxy.posts == 4  # 3 + 3 + 3 + 1
        whole = RemoteReward(servers["compose"].url, batch_size=64, **FAST)(images, prompts)
    finally:
        proxy.close()
    assert_same_result(split, whole)
    assert_same_result(split, make_reward("compose")(images, prompts))


def test_concurrent_callers_get_the_same_scores(servers):
    images, prompts = varied_batch("quality", n=8)
    remote = RemoteReward(servers["quality"].url, batch_size=3, **FAST)
    first = remote(images, prompts)
    with ThreadPoolExecutor(max_workers=3) as pool:
        for result in pool.map(lambda _: remote(images, prompts), range(3)):
            assert_same_result(result, first)


def test_nan_round_trips_as_nan(servers):
    text = prompt_set("text", "test", per_task=4)
    images = render_set(text)
    prompts = list(text)
    prompts[1] = prompt_set("compose", "test", per_task=1)[0]  # names no text to read: the server says NaN
    images[2, 1, 3, 3] = float("nan")  # a non-finite image: NaN without being sent
    local = make_reward("ocr")(images, prompts)
    remote = RemoteReward(servers["ocr"].url, **FAST)(images, prompts)
    assert_same_result(remote, local)
    assert math.isnan(remote.scores[1]) and math.isnan(remote.strict[1])
    assert math.isnan(remote.scores[2]) and "non-finite" in remote.details[2]["error"]
    assert remote.scores[0] == 1.0 and remote.scores[3] == 1.0


# ------------------------------------------------------------------------------------------------ failures
def test_503_is_retried_then_succeeds(servers):
    images, prompts = varied_batch("quality", n=4)
    proxy = Proxy(servers["quality"].url, fail=1, status=503)
    try:
        result = RemoteReward(proxy.url, timeout=10, retries=2, backoff=0.01)(images, prompts)
    finally:
        proxy.close()
    assert proxy.posts == 2
    assert_same_result(result, make_reward("quality")(images, prompts))


def test_4xx_is_not_retried_and_5xx_gives_up_naming_the_url(servers):
    images, prompts = varied_batch("quality", n=2)
    proxy = Proxy(servers["quality"].url, fail=100, status=400)
    try:
        with pytest.raises(RemoteRewardError, match=f"{proxy.url}/score: HTTP 400: injected failure"):
            RemoteReward(proxy.url, timeout=10, retries=3, backoff=0.01)(images, prompts)
        assert proxy.posts == 1
        proxy.posts, proxy.status = 0, 503
        with pytest.raises(RemoteRewardError, match=f"{proxy.url}/score failed after 3 attempt.*HTTP 503"):
            RemoteReward(proxy.url, timeout=10, retries=2, backoff=0.01)(images, prompts)
        assert proxy.posts == 3
    finally:
        proxy.close()


def test_dead_url_raises_a_clear_error_quickly():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    images, prompts = varied_batch("quality", n=2)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match=f"reward server {url}/info failed after 2 attempt.*Connection"):
        RemoteReward(url, timeout=2, retries=1, backoff=0.05)(images, prompts)
    assert time.monotonic() - start < 5


def test_silent_server_times_out_within_the_timeout():
    with socket.socket() as sock:  # listens (connections complete) but never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RemoteRewardError, match="failed after 1 attempt.*timed out"):
            RemoteReward(url, timeout=0.5, retries=0).info()
        assert time.monotonic() - start < 3


def test_reward_that_raises_gives_a_500_with_its_message():
    @dataclass(frozen=True)
    class BrokenConfig:
        pass

    class Broken(Reward):
        name = "broken"
        config_type = BrokenConfig

        def score_batch(self, images, prompts):
            raise RuntimeError("model fell over")

    images, prompts = varied_batch("quality", n=2)
    with start_server(Broken()) as handle:
        status, answer = post(handle.url, {"version": 1, "images": [encode_image(i) for i in
                                                                     images_to_uint8(images)],
                                           "prompts": [p.to_json() for p in prompts]})
        assert status == 500 and answer["error"] == "reward 'broken' failed: RuntimeError: model fell over"
        with pytest.raises(RemoteRewardError, match="HTTP 500: reward 'broken' failed: RuntimeError: model fell"):
            RemoteReward(handle.url, **FAST)(images, prompts)


def test_bad_requests_get_4xx_with_a_message(servers):
    url = servers["quality"].url
    image = images_to_uint8(render_set(prompt_set("quality", "test", per_task=1)))[0]
    prompt = PromptSpec(text="a red circle", task="quality").to_json()

    def request(**changes):
        payload = {"version": 1, "images": [encode_image(image)], "prompts": [prompt]}
        return post(url, {**payload, **changes})

    cases = [
        (post(url, None, raw=b"{not json"), "not valid JSON"),
        (post(url, None, raw=b"[1, 2]"), "must be a JSON object"),
        (request(version=2), "protocol version 2 not supported"),
        (request(images="abc"), "must both be lists"),
        (request(images=[encode_image(image)] * 2), "2 images but 1 prompts"),
        (request(images=[], prompts=[]), "no images"),
        (request(images=["%%%"]), "images[0] is not valid base64"),
        (request(images=[base64.b64encode(b"hello").decode()]), "images[0] is not a readable PNG"),
        (request(images=[png(image, "RGBA")]), "8-bit RGB PNG, got mode 'RGBA'"),
        (request(images=[encode_image(image), encode_image(image[:8])], prompts=[prompt] * 2), "one size"),
        (request(prompts=[{"task": "quality"}]), 'prompts[0] must be an object with a string "text"'),
    ]
    for (status, answer), message in cases:
        assert status == 400 and message in answer["error"], (message, answer)
    for path, method in (("/nope", "GET"), ("/health", "POST")):
        connection = http.client.HTTPConnection("127.0.0.1", servers["quality"].server.server_address[1], timeout=5)
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        response = connection.getresponse()
        assert response.status == 404 and "unknown path" in json.loads(response.read())["error"]
        connection.close()


def test_size_limits_give_413_and_a_local_error():
    image = images_to_uint8(render_set(prompt_set("quality", "test", per_task=1)))[0]
    with start_server("quality", limits=ServerLimits(max_request_bytes=2048, max_image_pixels=16 * 16)) as handle:
        connection = http.client.HTTPConnection("127.0.0.1", handle.server.server_address[1], timeout=5)
        connection.putrequest("POST", "/score")
        connection.putheader("Content-Length", str(10**9))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413 and "exceeds the limit of 2048 bytes" in json.loads(response.read())["error"]
        connection.close()
        status, answer = post(handle.url, {"version": 1, "images": [encode_image(image)],
                                           "prompts": [PromptSpec(text="x").to_json()]})
        assert status == 400 and "32x32 pixels, over the limit 256" in answer["error"]
        with pytest.raises(RemoteRewardError, match="images of 32x32 pixels are over the server's limit of 256"):
            RemoteReward(handle.url, **FAST)(torch.rand(2, 3, 32, 32), [PromptSpec(text="x")] * 2)
        images = torch.rand(8, 3, 16, 16)  # noise PNGs: ~1 KB each
        with pytest.raises(RemoteRewardError, match="over the server's limit of 2048; lower batch_size"):
            RemoteReward(handle.url, **FAST)(images, [PromptSpec(text="x")] * 8)


def test_requests_fit_the_servers_pixel_budget_and_image_count():
    images, prompts = varied_batch("quality", n=10)  # 32 x 32
    for limits, posts in ((ServerLimits(max_image_pixels=32 * 32, max_request_pixels=3 * 32 * 32), 4),
                          (ServerLimits(max_images=4), 3)):
        with start_server("quality", limits=limits) as handle:
            proxy = Proxy(handle.url)
            try:
                result = RemoteReward(proxy.url, batch_size=64, **FAST)(images, prompts)
            finally:
                proxy.close()
        assert proxy.posts == posts
        assert_same_result(result, make_reward("quality")(images, prompts))


# ------------------------------------------------------------------------------------------------ plumbing
def test_health_info_and_name_check(servers):
    url = servers["ocr"].url
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        assert json.loads(response.read()) == {"version": 1, "status": "ok", "name": "ocr"}
    remote = RemoteReward(url + "/", **FAST)
    assert remote.name == "remote"
    info = remote.info()
    assert remote.name == "ocr" and remote.has_strict and info["reward_class"] == "OCRReward"
    assert info["config"]["height"] == 48 and info["limits"]["max_request_bytes"] == ServerLimits().max_request_bytes
    with pytest.raises(RemoteRewardError, match="serves reward 'ocr', not 'compose'"):
        RemoteReward(url, name="compose", **FAST).info()


def test_configs_are_checked_and_rewards_built_by_name():
    assert build_reward("quality", {"near": 10.0, "far": 50.0}).config.near == 10.0
    with pytest.raises(ValueError, match="unknown reward 'nope'.*pickscore"):
        build_reward("nope")
    with pytest.raises(ValueError, match="url"):
        RemoteReward("127.0.0.1:8765")
    with pytest.raises(ValueError, match="batch_size"):
        RemoteReward("http://127.0.0.1:8765", batch_size=0)
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServerLimits(max_request_bytes=10)
    with pytest.raises(ValueError, match="config applies to a reward given by name"):
        start_server(make_reward("quality"), config={"near": 1.0})
