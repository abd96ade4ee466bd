"""Rewards named in graph files: weights, reward servers, task -> metric maps."""

from __future__ import annotations

import pytest
import torch

from flowopd_core.miniworld.sets import prompt_set, render_set
from flowopd_core.rewards import OCRReward, make_reward
from flowopd_core.rewards.client import RemoteReward
from flowopd_core.rewards.server import start_server
from flowopd_core.rewards.spec import build_reward, parse_reward_weights, parse_servers, parse_task_rewards


def test_parsers_accept_served_names_and_name_bad_items():
    servers = parse_servers("geneval=http://10.0.0.5:18001; deqa=https://scorer.example:443/")
    assert servers == {"geneval": "http://10.0.0.5:18001", "deqa": "https://scorer.example:443/"}
    assert parse_reward_weights("geneval:2, ocr", servers) == {"geneval": 2.0, "ocr": 1.0}
    assert parse_task_rewards("compose=geneval, text=ocr", servers) == {"compose": "geneval", "text": "ocr"}
    for bad, match in (("geneval", "name=http"), ("geneval=ftp://x", "name=http"), ("a=http://x, a=http://y", "two")):
        with pytest.raises(ValueError, match=match):
            parse_servers(bad)
    with pytest.raises(ValueError, match="unknown reward 'geneval'"):
        parse_reward_weights("geneval")
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_weights("ocr:high")
    with pytest.raises(ValueError, match="task=reward"):
        parse_task_rewards("compose")
    for bad, match in (("ocr, ocr:2", "named twice"), ("ocr:nan", "finite"), ("ocr:inf", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_reward_weights(bad)
    with pytest.raises(ValueError, match="two rewards"):
        parse_task_rewards("compose=compose, compose=ocr")
    assert isinstance(build_reward("ocr"), OCRReward)
    assert isinstance(build_reward("geneval", servers), RemoteReward)


def test_a_served_reward_named_in_a_graph_scores_like_the_local_one():
    prompts = prompt_set("compose", "test", per_task=6)
    images = render_set(prompts)
    with start_server("compose") as handle:
        remote = build_reward("compose", {"compose": handle.url})
        assert isinstance(remote, RemoteReward)
        got = remote(images, list(prompts))
    want = make_reward("compose")(images, list(prompts))
    assert torch.equal(got.scores, want.scores)
