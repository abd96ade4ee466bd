"""A reward served over HTTP (issue 4): heavy real-model rewards run on their own machine, trainers call them.

Protocol, version ``PROTOCOL_VERSION`` = 1, JSON over HTTP, nothing but JSON and PNG:

- ``POST /score`` with ``{"version": 1, "images": [base64 PNG, ...], "prompts": [PromptSpec.to_json(), ...]}``
  -> ``{"version": 1, "name": str, "scores": [float | null], "strict": [float | null] | null,
  "details": [dict, ...]}``. ``null`` in ``scores`` / ``strict`` is NaN ("cannot score"); ``strict`` is
  ``null`` when the reward has no strict form. Images are 8-bit RGB PNGs, all of one size.
- ``GET /health`` -> ``{"version", "status": "ok", "name"}``; ``GET /info`` -> reward name, class, config,
  ``has_strict`` and the server's limits.
- Errors: ``{"version": 1, "error": message}`` with 400 (malformed JSON, bad base64 / PNG, count mismatch,
  wrong version), 404 (unknown path), 411 / 413 (missing / too large ``Content-Length``) or 500 (the reward
  raised; the message names the exception).

Precision: a PNG holds 8 bits per channel, so served images are the uint8 quantisation of the caller's floats,
``round(clamp(x, 0, 1) * 255) / 255``. Every reward quantises its input the same way before scoring
(``base.images_to_uint8``; exact for all 256 levels), so a served score is identical to the in-process score of
the same images -- equal bit for bit, which the loopback tests check.

The server is stdlib ``http.server.ThreadingHTTPServer``: one thread per connection, and one batch scored at a
time (a lock around the reward: a GPU model then never holds two batches in memory). It binds 127.0.0.1 by
default; the protocol has no authentication, so binding another interface logs a warning.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowopd_core.images import from_uint8
from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards import make_reward
from flowopd_core.rewards.base import Reward, RewardResult

PROTOCOL_VERSION = 1
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = field(
        default=320 * 2**20,
        metadata={"help": "largest accepted request body (413 above); a 1024 px PNG is at most ~4 MiB in base64 "
                          "(incompressible noise), so 64 of them fit"},
    )
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "largest accepted image, H x W (read from the PNG header first)"}
    )

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the 4xx HTTP code sent back with ``str(self)``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ protocol
def encode_image(image: np.ndarray) -> str:
    """``(H, W, 3)`` uint8 RGB -> base64 text of a PNG (lossless for uint8)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_image needs an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: Any, max_pixels: int, index: int = 0) -> np.ndarray:
    """Base64 PNG text -> ``(H, W, 3)`` uint8 RGB. Raises ``RequestError`` (400) naming image ``index``."""
    if not isinstance(text, str):
        raise RequestError(400, f"images[{index}] must be a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"images[{index}] is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(400, f"images[{index}] has {width}x{height} pixels, over the limit {max_pixels}")
            if image.mode != "RGB":
                raise RequestError(400, f"images[{index}] must be an 8-bit RGB PNG, got mode {image.mode!r}")
            return np.asarray(image, dtype=np.uint8)
    except RequestError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RequestError(400, f"images[{index}] is not a readable PNG ({type(exc).__name__}: {exc})") from None


def parse_score_request(body: bytes, limits: ServerLimits) -> tuple[torch.Tensor, list[PromptSpec]]:
    """A ``POST /score`` body -> images ``(B, 3, H, W)`` float in [0, 1] (k / 255) and B prompts.

    Raises ``RequestError`` (400) with a message for anything malformed.
    """
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object")
    if payload.get("version") != PROTOCOL_VERSION:
        raise RequestError(400, f"protocol version {payload.get('version')!r} not supported (server speaks "
                                f"{PROTOCOL_VERSION})")
    images, prompts = payload.get("images"), payload.get("prompts")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise RequestError(400, '"images" and "prompts" must both be lists')
    if len(images) != len(prompts):
        raise RequestError(400, f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise RequestError(400, "no images to score")
    arrays = [decode_image(text, limits.max_image_pixels, i) for i, text in enumerate(images)]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise RequestError(400, f"all images of a request must have one size, got {sizes}")
    specs = []
    for i, data in enumerate(prompts):
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise RequestError(400, f'prompts[{i}] must be an object with a string "text"')
        if not isinstance(data.get("spec", {}), dict) or not isinstance(data.get("task", ""), str):
            raise RequestError(400, f'prompts[{i}]: "spec" must be an object and "task" a string')
        specs.append(PromptSpec.from_json(data))
    tensor = from_uint8(arrays)
    return tensor, specs


def _optional_floats(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def result_to_json(result: RewardResult) -> dict[str, Any]:
    """``RewardResult`` -> the ``POST /score`` response (NaN -> ``null``)."""
    return {
        "version": PROTOCOL_VERSION,
        "name": result.name,
        "scores": _optional_floats(result.scores),
        "strict": None if result.strict is None else _optional_floats(result.strict),
        "details": result.details,
    }


# ------------------------------------------------------------------------------------------------ server
def build_reward(name: str, config: Mapping[str, Any] | None = None) -> Reward:
    """A reward from ``REWARDS`` (mini-world) or ``REAL_REWARDS`` (local-weight adapters) by name."""
    return make_reward(name, **dict(config or {}))


class RewardHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` holding one reward, its limits and the lock that serialises scoring."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward: Reward, limits: ServerLimits) -> None:
        super().__init__(address, _Handler)
        self.reward = reward
        self.limits = limits
        self.score_lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        reward = self.reward
        return {
            "version": PROTOCOL_VERSION,
            "name": reward.name,
            "reward_class": type(reward).__name__,
            "config": asdict(reward.config),
            "has_strict": reward.has_strict,
            "limits": asdict(self.limits),
        }


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    server_version = f"flowopd-reward/{PROTOCOL_VERSION}"
    timeout = 300.0  # seconds a silent or stalled client may hold its connection thread

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._send(200, {"version": PROTOCOL_VERSION, "status": "ok", "name": self.server.reward.name})
        elif self.path == "/info":
            self._send(200, self.server.info())
        else:
            self._error(404, f"unknown path {self.path!r}; GET /health, GET /info or POST /score")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._error(404, f"unknown path {self.path!r}; POST /score")
            return
        try:
            images, prompts = parse_score_request(self._read_body(), self.server.limits)
        except RequestError as exc:
            self._error(exc.status, str(exc))
            return
        try:
            with self.server.score_lock:
                result = self.server.reward(images, prompts)
            body = _dumps(result_to_json(result))
        except Exception as exc:  # the reward's failure goes back to the caller as a 500 with its message
            log.exception("reward %s failed on a batch of %d", self.server.reward.name, len(prompts))
            self._error(500, f"reward {self.server.reward.name!r} failed: {type(exc).__name__}: {exc}")
            return
        self._send_bytes(200, body)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length is required")
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length {length!r}")
        limit = self.server.limits.max_request_bytes
        if int(length) > limit:
            self.close_connection = True  # the unread body must not be taken for the next request
            raise RequestError(413, f"request of {length} bytes exceeds the limit of {limit} bytes; send fewer "
                                    "images per request")
        return self.rfile.read(int(length))

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"version": PROTOCOL_VERSION, "error": message})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        self._send_bytes(status, _dumps(payload))

    def _send_bytes(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            log.info("client %s left before the %d response", self.client_address[0], status)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def _dumps(payload: dict[str, Any]) -> bytes:
    """Strict JSON (a NaN left in ``details`` is an error, not the non-standard ``NaN`` token)."""
    return json.dumps(payload, allow_nan=False).encode("utf-8")


def _make_server(reward: Reward, host: str, port: int, limits: ServerLimits | None) -> RewardHTTPServer:
    if host not in LOOPBACK_HOSTS:
        log.warning("reward server binds %s: the protocol has no authentication, anyone who reaches it can use it",
                    host)
    return RewardHTTPServer((host, port), reward, limits or ServerLimits())


def _url(server: RewardHTTPServer) -> str:
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"http://{host}:{port}"


def serve(
    name: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    config: Mapping[str, Any] | None = None,
    limits: ServerLimits | None = None,
) -> None:
    """Serve the registered reward ``name`` (built with ``config``, its config fields) until interrupted.

    Blocks; Ctrl-C (``KeyboardInterrupt``) stops it cleanly. The URL is printed to stderr (``port=0`` picks a
    free port).
    """
    server = _make_server(build_reward(name, config), host, port, limits)
    print(f"serving reward {name!r} at {_url(server)} (protocol v{PROTOCOL_VERSION}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"reward server {_url(server)} stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()


@dataclass
class ServerHandle:
    """A reward server running in a background thread: ``url`` to call, ``close()`` to stop it."""

    url: str
    reward: Reward
    server: RewardHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10.0)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(
    reward: Reward | str,
    host: str = DEFAULT_HOST,
    port: int = 0,
    config: Mapping[str, Any] | None = None,
    limits: ServerLimits | None = None,
) -> ServerHandle:
    """Serve ``reward`` (an object, or a registered name built with ``config``) in a daemon thread.

    ``port=0`` (default) picks a free port; the handle's ``url`` has the real one.
    """
    if isinstance(reward, str):
        reward = build_reward(reward, config)
    elif config:
        raise ValueError("config applies to a reward given by name, not to a reward object")
    server = _make_server(reward, host, port, limits)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"reward-server-{reward.name}", daemon=True)
    thread.start()
    return ServerHandle(url=_url(server), reward=reward, server=server, thread=thread)
