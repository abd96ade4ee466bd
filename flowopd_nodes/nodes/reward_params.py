"""The reward ports several nodes share: reward servers named in the graph and the checks of reward specs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowopd_core.rewards.spec import parse_reward_weights, parse_servers
from flowopd_nodes.engine.ports import In

REWARD_SERVERS = In(
    "reward_servers", "STRING", "",
    "rewards scored by reward servers (runner.py serve-reward), e.g. 'geneval=http://10.0.0.5:18001'; those names "
    "may then be used like registered ones",
)


def optional_weights(spec: str, servers: dict[str, str]) -> dict[str, float]:
    """:func:`parse_reward_weights`, with an empty spec meaning no rewards."""
    return parse_reward_weights(spec, servers) if spec.strip() else {}


def reward_param_errors(
    params: dict[str, Any], **parsers: Callable[[str, dict[str, str]], Any]
) -> list[tuple[str, str]]:
    """Validation-time problems of ``reward_servers`` and of each port named in ``parsers`` (port -> a parser
    ``(spec, servers)`` that raises ValueError), as ``(field, message)``."""
    try:
        servers = parse_servers(params["reward_servers"])
    except ValueError as exc:
        return [("reward_servers", str(exc))]
    errors = []
    for port, parse in parsers.items():
        try:
            parse(params[port], servers)
        except ValueError as exc:
            errors.append((port, str(exc)))
    return errors
