"""route_rows (torch-free, used at validation) agrees with route (the tensors used in training)."""

import pytest

from flowopd_core.distill.loss import route
from flowopd_core.distill.routing import route_rows
from flowopd_core.prompts import UNTAGGED, PromptSpec


def test_route_rows_match_route_weights():
    weights = {"text": {"text": 3, "compose": 1}}
    prompts = [PromptSpec(text="a", task="text"), PromptSpec(text="b", task="compose"), PromptSpec(text="c")]
    plan = route(prompts, ("compose", "text"), "soft", weights)
    rows = route_rows([p.task for p in prompts], ("compose", "text"), "soft", weights)
    assert plan.weights.tolist() == [rows[p.task] for p in prompts]
    assert rows[UNTAGGED] == [0.5, 0.5]


def test_route_rows_raise_like_route():
    with pytest.raises(ValueError, match="unknown teachers"):
        route_rows([], ("compose",), "soft", {"text": {"ocr": 1}})
    with pytest.raises(ValueError, match="no teacher"):
        route_rows(["text"], ("compose",))
