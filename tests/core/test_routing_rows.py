"""route_rows (torch-free, used at validation and by route): the routing weights in closed form."""

import pytest

from flowopd_core.distill.loss import route
from flowopd_core.distill.routing import route_rows
from flowopd_core.prompts import UNTAGGED, PromptSpec


def test_route_rows_are_the_normalised_weights_and_the_plan_uses_them():
    weights = {"text": {"text": 3, "compose": 1}}
    prompts = [PromptSpec(text="a", task="text"), PromptSpec(text="b", task="compose"), PromptSpec(text="c")]
    rows = route_rows([p.task for p in prompts], ("compose", "text"), "soft", weights)
    # text: 1 : 3 normalised; compose: its own teacher; untagged: the uniform blend
    assert rows["text"] == [0.25, 0.75] and rows["compose"] == [1.0, 0.0] and rows[UNTAGGED] == [0.5, 0.5]
    plan = route(prompts, ("compose", "text"), "soft", weights)
    assert plan.weights.tolist() == [[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]] and plan.index.tolist() == [-1, 0, -1]


def test_route_rows_raise_like_route():
    with pytest.raises(ValueError, match="unknown teachers"):
        route_rows([], ("compose",), "soft", {"text": {"ocr": 1}})
    with pytest.raises(ValueError, match="no teacher"):
        route_rows(["text"], ("compose",))
