"""Rewards named in graph files: ``"compose:1, ocr:0.5"`` weights, reward servers and task -> reward maps.

A reward name is either registered (:data:`~flowopd_core.rewards.REWARDS`, ``REAL_REWARDS``; their names are
:mod:`flowopd_core.rewards.names`) or served by a reward server
(``runner.py serve-reward``) named in a ``servers`` map, e.g. ``"geneval=http://10.0.0.5:18001"``: that is how a
cluster graph reaches GenEval, PaddleOCR, DeQA and other heavy scorers. Nothing is imported from a name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from flowopd_core.rewards.names import ALL_REWARD_NAMES

if TYPE_CHECKING:
    from flowopd_core.rewards.base import Reward


def _items(spec: str) -> list[str]:
    return [part.strip() for part in spec.replace(";", ",").split(",") if part.strip()]


def parse_servers(spec: str) -> dict[str, str]:
    """``"geneval=http://host:18001, ocr=http://host:18002"`` -> {name: url}; raises ValueError naming the item."""
    servers: dict[str, str] = {}
    for item in _items(spec):
        name, eq, url = (s.strip() for s in item.partition("="))
        parsed = urlparse(url)
        if not eq or not name or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"expected name=http://host:port, got {item!r}")
        if name in servers:
            raise ValueError(f"reward {name!r} has two servers")
        servers[name] = url
    return servers


def known_rewards(servers: Mapping[str, str] | None = None) -> list[str]:
    """Every reward name a graph may use: the registered ones and the served ones."""
    return sorted({*ALL_REWARD_NAMES, *(servers or {})})


def parse_reward_weights(spec: str, servers: Mapping[str, str] | None = None) -> dict[str, float]:
    """``"compose"`` or ``"compose:1, ocr:0.5"`` -> {name: weight}; names must be registered or served."""
    weights: dict[str, float] = {}
    for item in _items(spec):
        name, _, weight = (s.strip() for s in item.partition(":"))
        if name not in known_rewards(servers):
            raise ValueError(f"unknown reward {name!r}; registered or served: {known_rewards(servers)}")
        if name in weights:
            raise ValueError(f"reward {name!r} is named twice; give it once, with its weight")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {weight!r}") from None
        if not math.isfinite(weights[name]):
            raise ValueError(f"weight of {name!r} must be a finite number, got {weight!r}")
    if not weights:
        raise ValueError("name at least one reward, e.g. 'compose' or 'compose:1, ocr:1'")
    return weights


def parse_task_rewards(spec: str, servers: Mapping[str, str] | None = None) -> dict[str, str]:
    """``"compose=geneval, text=ocr"`` -> {task: reward name} (the metric that judges each task)."""
    mapping: dict[str, str] = {}
    for item in _items(spec):
        task, eq, name = (s.strip() for s in item.partition("="))
        if not eq or not task or not name:
            raise ValueError(f"expected task=reward, got {item!r}")
        if name not in known_rewards(servers):
            raise ValueError(
                f"unknown reward {name!r} for task {task!r}; registered or served: {known_rewards(servers)}"
            )
        if task in mapping:
            raise ValueError(f"task {task!r} is given two rewards ({mapping[task]!r} and {name!r}); give it one")
        mapping[task] = name
    return mapping


def build_reward(name: str, servers: Mapping[str, str] | None = None) -> Reward:
    """The reward ``name``: a :class:`RemoteReward` when ``servers`` names a server for it, else the registered
    one (local weights only). The rewards' code is imported here, not with this module: the parse_* helpers
    validate graphs without it."""
    if servers and name in servers:
        from flowopd_core.rewards.client import RemoteReward

        return RemoteReward(servers[name], name=name)
    from flowopd_core.rewards.registry import make_reward

    return make_reward(name)
