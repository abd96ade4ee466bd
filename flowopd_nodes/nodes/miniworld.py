"""Mini-world nodes: its prompt sets and ground-truth images."""

from __future__ import annotations

from typing import Any

from flowopd_core.miniworld.tasks import SPLITS, TASKS
from flowopd_core.prompts import PromptSet
from flowopd_nodes.engine.ports import In, Node, Out


class MiniWorldPrompts(Node):
    NODE_ID = "FlowOPDMiniWorldPrompts"
    DISPLAY_NAME = "Mini-world prompts"
    CATEGORY = "FlowOPD/data"
    DESCRIPTION = (
        "Prompts of the mini-world's tasks (compose: shapes/colours/counts/positions; text: a rendered word; "
        "quality: clean well-formed objects) with task tags and ground truth. Test prompts are never trained on."
    )
    INPUTS = (
        In("task", "COMBO", "all", "one task or all of them", choices=("all", *TASKS)),
        In("split", "COMBO", "test", "train or held-out test prompts", choices=SPLITS),
        In("per_task", "INT", 0, "keep a seeded random subset of N prompts per task (0 = all)", min=0, max=100_000),
        In("seed", "INT", 0, "seed of the subset", min=0, max=2**31 - 1),
    )
    OUTPUTS = (Out("prompts", "FLOWOPD_PROMPTS", "the prompt set"),)

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        task = params.get("task")
        if task not in ("all", *TASKS):
            return {}  # linked or refused: nothing known
        return {"prompts": {"tasks": TASKS if task == "all" else (task,)}}  # every task keeps prompts (per_task)

    def run(self, task: str, split: str, per_task: int, seed: int) -> tuple[PromptSet]:
        from flowopd_core.miniworld.sets import prompt_set

        return (prompt_set(task, split, per_task, seed),)


class RenderGroundTruth(Node):
    NODE_ID = "FlowOPDRenderGroundTruth"
    DISPLAY_NAME = "Mini-world ground truth"
    CATEGORY = "FlowOPD/data"
    DESCRIPTION = "Renders the mini-world's ground-truth image for each prompt (what a perfect model would draw)."
    INPUTS = (
        In("prompts", "FLOWOPD_PROMPTS", help="mini-world prompts (with ground-truth specs)"),
        In("size", "INT", 32, "image size in pixels", min=16, max=512, step=8),
        In("seed", "INT", 0, "seed of the random layout", min=0, max=2**31 - 1),
    )
    OUTPUTS = (Out("images", "IMAGE", "one image per prompt"),)

    def run(self, prompts: PromptSet, size: int, seed: int) -> tuple:
        from flowopd_core.images import to_comfy
        from flowopd_core.miniworld.sets import render_set

        return (to_comfy(render_set(prompts, seed, size)),)
