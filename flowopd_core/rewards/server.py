"""A reward served over HTTP (issue 4): heavy real-model rewards run on their own machine, trainers call them.

Protocol, version ``PROTOCOL_VERSION`` = 1, JSON over HTTP, nothing but JSON and PNG:

- ``POST /score`` with ``{"version": 1, "images": [base64 PNG, ...], "prompts": [PromptSpec.to_json(), ...]}``
  -> ``{"version": 1, "name": str, "scores": [float | null], "strict": [float | null] | null,
  "details": [dict, ...]}``. ``null`` in ``scores`` / ``strict`` is NaN ("cannot score"); ``strict`` is
  ``null`` when the reward has no strict form. Images are 8-bit RGB PNGs, all of one size.
- ``GET /health`` -> ``{"version", "status": "ok", "name"}``; ``GET /info`` -> reward name, class, config,
  ``has_strict`` and the server's limits.
- Errors, every one of them: ``{"version": 1, "error": message}`` with 400 (malformed JSON or headers, bad
  base64 / PNG, an image or request over the pixel budget, count mismatch, wrong version), 404 (unknown path),
  408 (the request did not arrive within the timeouts), 411 / 413 (missing / too large ``Content-Length``),
  501 (a method other than GET and POST), 503 (too many open connections) or 500 (the reward raised; the
  message names the exception). One request per connection: the server closes it after answering.

Precision: a PNG holds 8 bits per channel, so served images are the uint8 quantisation of the caller's floats,
``round(clamp(x, 0, 1) * 255) / 255``. Every reward quantises its input the same way before scoring
(``base.images_to_uint8``; exact for all 256 levels), so a served score is identical to the in-process score of
the same images -- equal bit for bit, which the loopback tests check.

Bad traffic (``ServerLimits``, all in ``GET /info``): a request is checked before anything is decoded -- its
``Content-Length`` (ASCII digits only), the JSON's size in containers and its nesting depth, the number of
images, and every image's width x height read from its PNG header (IHDR) against a per-image limit and against
a budget over all images of the request. The defaults fit what the rewards score (mini-world 32-512 px, the
sd35m graphs 512 px) and keep one request at the limit under ~0.5 GB of server memory; a small PNG declaring
4096 x 4096 pixels is refused from its header. Connections are served by a fixed pool of ``workers`` threads;
each read waits at most ``client_timeout`` seconds for the client's next bytes and the whole request must
arrive within ``request_timeout``, so a stalled client holds a worker for seconds, not forever, and at most
``max_connections`` connections are queued or served (the rest get a 503 at once). Many stalled clients
still delay the others by about ``stalled / workers x client_timeout``: serve untrusted networks behind a
buffering proxy.

Images are decoded and scored one request at a time (a lock around decoding and the reward: a GPU model never
holds two batches in memory). The server binds 127.0.0.1 by default; the protocol has no authentication, so
binding another interface logs a warning.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # IHDR colour type -> PIL's name for it
LINGER_S = 1.0  # after an error answered before the request was read: seconds to drain it (module doc)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    max_image_pixels: int = field(
        default=512 * 512,
        metadata={"help": "largest accepted image, W x H, read from its PNG header before decoding; mini-world "
                          "rewards score 32-512 px images, the sd35m graphs 512 px"},
    )
    max_request_pixels: int = field(
        default=16 * 512 * 512,
        metadata={"help": "pixel budget of one request, summed over its images and checked before decoding; "
                          "a request at the budget peaks at ~0.3 GB in the server (RemoteReward splits larger "
                          "batches to fit)"},
    )
    max_images: int = field(default=256, metadata={"help": "most images in one request"})
    max_request_bytes: int = field(
        default=24 * 2**20,
        metadata={"help": "largest accepted request body (413 above); incompressible PNGs of the whole pixel "
                          "budget take ~17 MiB of base64"},
    )
    max_json_depth: int = field(
        default=16, metadata={"help": "deepest nesting of JSON objects / arrays in a body (a request needs 6)"}
    )
    max_json_containers: int = field(
        default=65536,
        metadata={"help": "most JSON objects + arrays in a body, counted as '{' and '[' bytes before parsing "
                          "(a prompt needs ~4)"},
    )
    workers: int = field(default=8, metadata={"help": "threads serving connections (a fixed pool)"})
    max_connections: int = field(
        default=256, metadata={"help": "connections queued or being served; more are answered 503 at once"}
    )
    client_timeout: float = field(
        default=5.0, metadata={"help": "seconds one read (or write) waits for a silent client before giving up"}
    )
    request_timeout: float = field(
        default=60.0, metadata={"help": "seconds for a whole request (headers and body) to arrive once served"}
    )

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(f"max_request_pixels must be >= max_image_pixels ({self.max_image_pixels}), got "
                             f"{self.max_request_pixels}")
        if min(self.max_images, self.max_json_depth, self.max_json_containers, self.workers) < 1:
            raise ValueError("max_images, max_json_depth, max_json_containers and workers must be >= 1")
        if self.max_connections < self.workers:
            raise ValueError(f"max_connections must be >= workers ({self.workers}), got {self.max_connections}")
        if not (self.client_timeout > 0 and self.request_timeout > 0):
            raise ValueError(f"client_timeout and request_timeout must be > 0, got {self.client_timeout} and "
                             f"{self.request_timeout}")


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


def png_size(data: bytes, index: int = 0) -> tuple[int, int]:
    """``(width, height)`` of an 8-bit RGB PNG read from its header (the IHDR chunk), without decoding.

    Raises ``RequestError`` (400) naming image ``index`` when ``data`` is no PNG or not 8-bit RGB.
    """
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise RequestError(400, f"images[{index}] is not a readable PNG (no PNG signature and IHDR header)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour != 2:
        mode = PNG_MODES.get(colour, f"colour type {colour}")
        got = f"mode {mode!r}" if depth == 8 else f"{depth}-bit mode {mode!r}"
        raise RequestError(400, f"images[{index}] must be an 8-bit RGB PNG, got {got}")
    if width < 1 or height < 1:
        raise RequestError(400, f"images[{index}] declares {width}x{height} pixels")
    return width, height


def decode_image(data: bytes, size: tuple[int, int], index: int = 0) -> np.ndarray:
    """PNG bytes whose header ``png_size`` checked -> ``(H, W, 3)`` uint8 RGB. Raises ``RequestError`` (400)."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != size or image.mode != "RGB":
                raise RequestError(400, f"images[{index}] decodes as {image.mode} {image.size}, not its header's "
                                        f"RGB {size}")
            return np.asarray(image, dtype=np.uint8)
    except RequestError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise RequestError(400, f"images[{index}] is not a readable PNG ({type(exc).__name__}: {exc})") from None


@dataclass
class ScoreRequest:
    """A checked ``POST /score`` body: PNG bytes (headers read, not decoded) of one ``size`` = (W, H), and B
    prompts."""

    pngs: list[bytes]
    size: tuple[int, int]
    prompts: list[PromptSpec]

    def images(self) -> torch.Tensor:
        """Decode -> ``(B, 3, H, W)`` float in [0, 1] (k / 255). Raises ``RequestError`` (400)."""
        return from_uint8([decode_image(data, self.size, i) for i, data in enumerate(self.pngs)])


def parse_json(body: bytes, limits: ServerLimits) -> Any:
    """A request body -> its JSON value, refused (``RequestError`` 400) when larger or deeper than ``limits``."""
    containers = body.count(b"{") + body.count(b"[")
    if containers > limits.max_json_containers:
        raise RequestError(400, f"request body has {containers} JSON objects / arrays, over the limit "
                                f"{limits.max_json_containers}")
    too_deep = f"request body nests JSON deeper than the limit of {limits.max_json_depth} levels"
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestError(400, too_deep) from None
    except ValueError as exc:  # bad JSON or UTF-8, an integer over Python's digit limit
        raise RequestError(400, f"request body is not valid JSON ({exc})") from None
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limits.max_json_depth:
                raise RequestError(400, too_deep)
            stack.extend((child, depth + 1) for child in (value.values() if isinstance(value, dict) else value))
    return payload


def parse_score_request(body: bytes, limits: ServerLimits) -> ScoreRequest:
    """A ``POST /score`` body -> ``ScoreRequest``, every check done that needs no image decoded: the JSON, the
    prompts and each PNG header against the per-image limit and the request's pixel budget.

    Raises ``RequestError`` (400) with a message for anything malformed or over a limit.
    """
    payload = parse_json(body, limits)
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
    if len(images) > limits.max_images:
        raise RequestError(400, f"{len(images)} images in one request, over the limit {limits.max_images}")
    pngs, sizes, total = [], set(), 0
    for i, text in enumerate(images):
        if not isinstance(text, str):
            raise RequestError(400, f"images[{i}] must be a base64 string, got {type(text).__name__}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"images[{i}] is not valid base64") from None
        width, height = png_size(data, i)
        if width * height > limits.max_image_pixels:
            raise RequestError(400, f"images[{i}] has {width}x{height} pixels, over the limit "
                                    f"{limits.max_image_pixels}")
        total += width * height
        if total > limits.max_request_pixels:
            raise RequestError(400, f"images[0..{i}] have {total} pixels, over the request's budget of "
                                    f"{limits.max_request_pixels}; send fewer images per request")
        pngs.append(data)
        sizes.add((height, width, 3))
    if len(sizes) > 1:
        raise RequestError(400, f"all images of a request must have one size, got {sorted(sizes)}")
    specs = []
    for i, data in enumerate(prompts):
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise RequestError(400, f'prompts[{i}] must be an object with a string "text"')
        if not isinstance(data.get("spec", {}), dict) or not all(
            isinstance(data.get(key, ""), str) for key in ("task", "id")
        ):
            raise RequestError(400, f'prompts[{i}]: "spec" must be an object, "task" and "id" strings')
        specs.append(PromptSpec.from_json(data))
    height, width, _ = sizes.pop()
    return ScoreRequest(pngs=pngs, size=(width, height), prompts=specs)


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


def parse_content_length(values: list[str] | None, limit: int) -> int:
    """The ``Content-Length`` header's values -> the body's size. Raises ``RequestError``: 411 when missing,
    400 unless exactly one value of ASCII digits, 413 over ``limit``."""
    if not values:
        raise RequestError(411, "Content-Length is required")
    if len(values) > 1:
        raise RequestError(400, f"{len(values)} Content-Length headers; send one")
    text = values[0].strip()
    if not re.fullmatch(r"[0-9]+", text):
        raise RequestError(400, f"bad Content-Length {text[:40]!r}: expected ASCII digits")
    if len(text) > 18 or int(text) > limit:
        raise RequestError(413, f"request of {text[:40]} bytes exceeds the limit of {limit} bytes; send fewer "
                                "images per request")
    return int(text)


# ------------------------------------------------------------------------------------------------ server
def build_reward(name: str, config: Mapping[str, Any] | None = None) -> Reward:
    """A reward from ``REWARDS`` (mini-world) or ``REAL_REWARDS`` (local-weight adapters) by name."""
    return make_reward(name, **dict(config or {}))


class RewardHTTPServer(HTTPServer):
    """An ``HTTPServer`` holding one reward, its limits, the lock that serialises scoring and a fixed pool of
    ``limits.workers`` threads that serve the connections (module doc)."""

    request_queue_size = 128  # the listen backlog: connections the kernel holds until accepted

    def __init__(self, address: tuple[str, int], reward: Reward, limits: ServerLimits) -> None:
        super().__init__(address, _Handler)
        self.reward = reward
        self.limits = limits
        self.score_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix=f"reward-{reward.name}")
        self._open_lock = threading.Lock()
        self._open = 0  # connections queued or being served
        self._queued: set[socket.socket] = set()  # connections no worker has taken yet

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the connection for the pool, or answer 503 at once when ``max_connections`` are open."""
        with self._open_lock:
            busy = self._open >= self.limits.max_connections
            if not busy:
                self._open += 1
                self._queued.add(request)
        if busy:
            _refuse_busy(request, self.limits.max_connections)
            self.shutdown_request(request)
            return
        self._pool.submit(self._serve_connection, request, client_address)

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        with self._open_lock:
            if request not in self._queued:  # closed by server_close meanwhile
                return
            self._queued.discard(request)
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._open_lock:
                self._open -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("reward server: connection from %s failed", client_address[0])

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._open_lock:  # queued connections that no worker will serve now
            for request in self._queued:
                self.shutdown_request(request)
            self._queued.clear()

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


def _refuse_busy(request: socket.socket, limit: int) -> None:
    """Answer a connection the server has no room for with a JSON 503, without blocking the accept loop."""
    body = _dumps({"version": PROTOCOL_VERSION, "error": f"server busy: {limit} connections open; retry later"})
    head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    try:
        request.setblocking(False)
        request.send(head.encode("ascii") + body)
    except OSError:
        pass


class _DeadlineReader(io.RawIOBase):
    """Reads from a client socket: each waits at most ``idle`` seconds, and none goes past ``deadline``
    (``time.monotonic``); a read that would raises ``TimeoutError``. ``received`` counts the bytes read."""

    def __init__(self, sock: socket.socket, idle: float, deadline: float) -> None:
        super().__init__()
        self.sock, self.idle, self.deadline = sock, idle, deadline
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = min(self.idle, self.deadline - time.monotonic())
        if wait <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(wait)
        count = self.sock.recv_into(buffer)
        self.received += count
        return count


class _Handler(BaseHTTPRequestHandler):
    """One request per connection, every outcome answered with the protocol's JSON (module doc)."""

    server: RewardHTTPServer
    server_version = f"flowopd-reward/{PROTOCOL_VERSION}"

    def setup(self) -> None:
        limits = self.server.limits
        self.timeout = limits.client_timeout
        super().setup()
        self.rfile.close()  # replaced by reads with the timeouts
        self.reader = _DeadlineReader(self.connection, limits.client_timeout,
                                      time.monotonic() + limits.request_timeout)
        self.rfile = io.BufferedReader(self.reader)
        self.answered = False  # a status line went out
        self.consumed = False  # the whole request was read (nothing left to drain before closing)

    def handle(self) -> None:
        self.close_connection = True
        self.requestline, self.request_version, self.command = "", "", ""  # until parsed
        try:
            self._handle_request()
        except RequestError as exc:
            self._error(exc.status, str(exc))
        except TimeoutError:
            self.consumed = True  # all the client sent was read: nothing to drain
            if self.reader.received and not self.answered:
                self._error(408, f"request not received within the timeouts ({self.server.limits.client_timeout} "
                                 f"s without data, {self.server.limits.request_timeout} s in all)")
        except OSError as exc:  # the client reset or left
            log.info("client %s: %s: %s", self.client_address[0], type(exc).__name__, exc)
        except Exception as exc:
            log.exception("reward server: request %r failed", self.requestline)
            if not self.answered:
                self._error(500, f"internal error: {type(exc).__name__}: {exc}")

    def _handle_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.consumed = True
            return
        if len(self.raw_requestline) > 65536:
            raise RequestError(414, "request line longer than 65536 bytes")
        if not self.parse_request():  # it answered (send_error), except to a blank line
            if not self.answered:
                raise RequestError(400, "empty request line")
            return
        if self.command == "GET":
            self.consumed = not (self.headers.get("Content-Length", "0").strip() != "0"
                                 or "Transfer-Encoding" in self.headers)
            self._get()
        elif self.command == "POST":
            self._post()
        else:
            raise RequestError(501, f"method {self.command!r} not supported; GET /health, GET /info or POST /score")

    def _get(self) -> None:
        if self.path == "/health":
            self._send(200, {"version": PROTOCOL_VERSION, "status": "ok", "name": self.server.reward.name})
        elif self.path == "/info":
            self._send(200, self.server.info())
        else:
            raise RequestError(404, f"unknown path {self.path!r}; GET /health, GET /info or POST /score")

    def _post(self) -> None:
        if self.path != "/score":
            raise RequestError(404, f"unknown path {self.path!r}; POST /score")
        request = parse_score_request(self._read_body(), self.server.limits)
        try:
            with self.server.score_lock:  # one batch decoded and scored at a time
                images = request.images()
                result = self.server.reward(images, request.prompts)
            body = _dumps(result_to_json(result))
        except RequestError:
            raise
        except Exception as exc:  # the reward's failure goes back to the caller as a 500 with its message
            log.exception("reward %s failed on a batch of %d", self.server.reward.name, len(request.prompts))
            raise RequestError(500, f"reward {self.server.reward.name!r} failed: {type(exc).__name__}: {exc}") from None
        self._send_bytes(200, body)

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(400, "Transfer-Encoding is not supported; send the body with a Content-Length")
        length = parse_content_length(self.headers.get_all("Content-Length"), self.server.limits.max_request_bytes)
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(400, f"body ended after {len(body)} of its {length} bytes")
        self.consumed = True
        return body

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (bad request line, too many headers, ...) as protocol JSON."""
        self._error(code, message or HTTPStatus(code).phrase)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"version": PROTOCOL_VERSION, "error": message})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        self._send_bytes(status, _dumps(payload))

    def _send_bytes(self, status: int, body: bytes) -> None:
        self.answered = True
        if self.request_version == "HTTP/0.9":  # a status line even to a line parse_request took for HTTP/0.9
            self.request_version = "HTTP/1.0"
        try:
            self.connection.settimeout(self.server.limits.client_timeout)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError as exc:  # reset, broken pipe, or a client that does not read
            log.info("client %s left before the %d response (%s)", self.client_address[0], status, exc)

    def finish(self) -> None:
        super().finish()
        if self.reader.received and not self.consumed:
            _drain(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


def _drain(sock: socket.socket, seconds: float = LINGER_S, limit: int = 2**20) -> None:
    """Half-close and read what the client still sends (at most ``seconds`` and ``limit`` bytes) before the
    socket is closed: closing with unread input resets the connection, which can discard the answer just sent."""
    try:
        sock.shutdown(socket.SHUT_WR)
        end, drained = time.monotonic() + seconds, 0
        while drained < limit and (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass


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
