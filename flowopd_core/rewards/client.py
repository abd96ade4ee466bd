"""``RemoteReward``: a reward scored by a reward server (``server.py``), called exactly like a local reward.

``RemoteReward(url)(images, prompts) -> RewardResult`` with ``images`` ``(B, 3, H, W)`` float in [0, 1]. It is a
``Reward``, so the base class does what it does for every reward: check the inputs, give non-finite images NaN
without sending them, and quantise the rest to uint8 -- the very images the PNGs carry, so remote scores equal
in-process scores (see ``server.py``). The valid images go out in requests of at most ``batch_size``, fewer
where the server's pixel budget or image count per request (its ``GET /info`` limits) needs it. (A model
reward whose forward depends on the batch's make-up -- text padded to the longest prompt, batched kernels -- may
differ in the last float bits when the requests split a batch differently from an in-process call.)

Networking is stdlib ``urllib``. Connection errors, timeouts and 5xx answers are retried ``retries`` times with
exponential backoff (``backoff``, 2 x ``backoff``, ...); a 4xx answer is the caller's mistake and raises at once.
Every failure raises ``RemoteRewardError`` naming the URL. A call to a dead server therefore gives up after at
most ``(retries + 1) x timeout`` plus the backoff sleeps. Proxy variables of the environment are ignored: a
reward server is reached directly.

The reward's ``name`` and ``has_strict`` come from the server's ``GET /info`` on first use (a ``name`` given
to the constructor must match it: a guard against calling the wrong server).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowopd_core.prompts import PromptSpec
from flowopd_core.rewards.base import Reward, RewardResult, SampleScore
from flowopd_core.rewards.server import PROTOCOL_VERSION, encode_image


class RemoteRewardError(RuntimeError):
    """A reward server could not be reached, refused the request or answered nonsense (message names the URL)."""


@dataclass(frozen=True)
class RemoteConfig:
    url: str = field(default="", metadata={"help": "base URL of the reward server, e.g. http://127.0.0.1:8765"})
    name: str | None = field(
        default=None, metadata={"help": "expected reward name (checked against the server); None = accept any"}
    )
    timeout: float = field(default=30.0, metadata={"help": "seconds per HTTP attempt (connect + answer)"})
    retries: int = field(default=3, metadata={"help": "extra attempts after a connection error, timeout or 5xx"})
    backoff: float = field(default=0.5, metadata={"help": "seconds before the first retry, doubled for each next"})
    batch_size: int = field(default=64, metadata={"help": "images per request; larger inputs are split"})

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"reward server url must be http(s)://host:port, got {self.url!r}")
        if self.timeout <= 0 or self.backoff < 0:
            raise ValueError(f"timeout must be > 0 and backoff >= 0, got {self.timeout} and {self.backoff}")
        if self.retries < 0 or self.batch_size < 1:
            raise ValueError(f"retries must be >= 0 and batch_size >= 1, got {self.retries} and {self.batch_size}")
        object.__setattr__(self, "url", self.url.rstrip("/"))


class RemoteReward(Reward):
    """A reward served over HTTP, with the local reward call signature (module doc)."""

    name = "remote"  # replaced by the server's reward name on first use
    config_type = RemoteConfig

    def __init__(
        self,
        url: str,
        name: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        batch_size: int = 64,
    ) -> None:
        super().__init__(
            RemoteConfig(url=url, name=name, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size)
        )
        if name is not None:
            self.name = name
        self._info: dict[str, Any] | None = None
        self._info_lock = threading.Lock()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def info(self) -> dict[str, Any]:
        """The server's ``GET /info`` (fetched once); sets ``name`` and ``has_strict`` from it."""
        with self._info_lock:
            if self._info is None:
                info = self._request("/info")
                expected = self.config.name
                if expected is not None and info.get("name") != expected:
                    raise RemoteRewardError(f"{self.config.url} serves reward {info.get('name')!r}, not {expected!r}")
                self.name = str(info["name"])
                self.has_strict = bool(info["has_strict"])
                self._info = info
            return self._info

    def __call__(self, images: torch.Tensor, prompts: Sequence[PromptSpec]) -> RewardResult:
        """``images`` ``(B, 3, H, W)`` float in [0, 1], B ``PromptSpec`` -> ``RewardResult`` from the server."""
        self.info()
        return super().__call__(images, prompts)

    def score_batch(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        """``(N, H, W, 3)`` uint8 images -> N ``SampleScore`` in requests of at most ``batch_size`` images,
        fewer where the server's pixel budget per request (``GET /info`` limits) needs it."""
        limits = self.info().get("limits", {})
        pixels = images.shape[1] * images.shape[2]
        if pixels > limits.get("max_image_pixels", pixels):
            raise RemoteRewardError(f"{self.config.url}: images of {images.shape[2]}x{images.shape[1]} pixels are "
                                    f"over the server's limit of {limits['max_image_pixels']} per image")
        size = min(self.config.batch_size, limits.get("max_images", self.config.batch_size),
                   limits.get("max_request_pixels", pixels) // pixels)
        out: list[SampleScore] = []
        for start in range(0, len(prompts), size):
            out += self._score_chunk(images[start:start + size], prompts[start:start + size])
        return out

    def _score_chunk(self, images: np.ndarray, prompts: Sequence[PromptSpec]) -> list[SampleScore]:
        payload = {
            "version": PROTOCOL_VERSION,
            "images": [encode_image(image) for image in images],
            "prompts": [p.to_json() for p in prompts],
        }
        body = json.dumps(payload).encode("utf-8")
        limit = self.info().get("limits", {}).get("max_request_bytes")
        if limit is not None and len(body) > limit:
            raise RemoteRewardError(f"{self.config.url}: a request of {len(prompts)} images is {len(body)} bytes, "
                                    f"over the server's limit of {limit}; lower batch_size")
        return parse_scores(self._request("/score", body), len(prompts), self.config.url)

    def _request(self, path: str, body: bytes | None = None) -> dict[str, Any]:
        """GET (``body`` None) or POST JSON to ``path`` with retries; the decoded JSON answer."""
        url = self.config.url + path
        attempts = self.config.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.config.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(request, timeout=self.config.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                message = _error_message(exc)
                if exc.code < 500:
                    raise RemoteRewardError(f"{url}: HTTP {exc.code}: {message}") from None
                last = f"HTTP {exc.code}: {message}"
                continue
            except urllib.error.URLError as exc:  # refused, unknown host, connect timeout
                last = f"{type(exc.reason).__name__}: {exc.reason}"
                continue
            except (OSError, http.client.HTTPException) as exc:  # read timeout, reset, truncated answer
                last = f"{type(exc).__name__}: {exc}"
                continue
            try:
                answer = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RemoteRewardError(f"{url}: the answer is not JSON: {raw[:200]!r}") from None
            if not isinstance(answer, dict) or answer.get("version") != PROTOCOL_VERSION:
                raise RemoteRewardError(f"{url}: expected a protocol v{PROTOCOL_VERSION} object, got {raw[:200]!r}")
            return answer
        raise RemoteRewardError(f"reward server {url} failed after {attempts} attempt(s), timeout "
                                f"{self.config.timeout} s each; last error: {last}")


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The ``error`` of a server's JSON error body, else the raw body / reason."""
    raw = exc.read()
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace") or str(exc.reason)


def parse_scores(answer: dict[str, Any], count: int, url: str) -> list[SampleScore]:
    """A ``POST /score`` answer -> ``count`` ``SampleScore`` (``null`` -> NaN). Raises ``RemoteRewardError``."""
    scores, strict, details = answer.get("scores"), answer.get("strict"), answer.get("details")
    if not (isinstance(scores, list) and isinstance(details, list) and len(scores) == len(details) == count
            and (strict is None or (isinstance(strict, list) and len(strict) == count))):
        raise RemoteRewardError(f"{url}: malformed /score answer for {count} images (keys {sorted(answer)})")
    out = []
    for i in range(count):
        strict_i = None if strict is None else _float(strict[i])
        out.append(SampleScore(score=_float(scores[i]), details=details[i], strict=strict_i))
    return out


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)
