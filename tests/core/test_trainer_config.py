"""The one trainer config base: shared fields and limits in field metadata, checked once, mirrored by the ports."""

from __future__ import annotations

import dataclasses
import math

import pytest

from flowopd_core.distill.trainer import OPDConfig
from flowopd_core.grpo.trainer import GRPOConfig
from flowopd_core.training.config import TrainerConfig, field_errors


def test_both_trainers_share_the_base_fields_with_the_same_limits():
    base = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    for cls in (GRPOConfig, OPDConfig):
        own = {f.name: f for f in dataclasses.fields(cls)}
        assert set(base) <= set(own)
        for name, f in base.items():
            limits = {k: v for k, v in f.metadata.items() if k != "help"}
            theirs = {k: v for k, v in own[name].metadata.items() if k != "help"}
            assert theirs == limits or (cls, name) == (GRPOConfig, "group_size"), (cls.__name__, name)
    assert GRPOConfig().adv_clip == 5.0 and OPDConfig().adv_clip == 0.0  # one name, each trainer's default
    assert OPDConfig().trainable_steps == GRPOConfig().trainable_steps == 9  # one definition (int(10 * 0.99))


def test_every_limit_violation_is_reported_at_once():
    with pytest.raises(ValueError) as caught:
        GRPOConfig(lr=2.0, kind="ode", noise_level=math.nan, group_size=1, adv_clip=0.0)
    message = str(caught.value)
    assert message.startswith("invalid GRPOConfig: ")
    for part in ("lr must be <= 1.0", "kind must be one of ('sde', 'cps')", "noise_level must be > 0.0",
                 "group_size must be >= 2", "adv_clip must be > 0"):
        assert part in message, part
    with pytest.raises(ValueError, match=r"invalid OPDConfig: mode must be one of .*'direct'.*got 'pathwise'"):
        OPDConfig(mode="pathwise")
    with pytest.raises(ValueError, match="task_weights are for route='soft'"):
        OPDConfig(task_weights={"text": {"text": 1.0}})
    assert field_errors(OPDConfig()) == []
