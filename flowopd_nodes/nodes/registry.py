"""The node registry: an explicit literal list. ComfyUI's mappings derive from it; nothing is ever imported
from a name read from a graph file."""

from __future__ import annotations

from flowopd_nodes.engine.ports import Node
from flowopd_nodes.nodes import adapters, basic, evaluate, grpo, lora_export, miniworld, model, opd, pretrain

NODES: list[type[Node]] = [
    basic.Seed,
    basic.PromptFile,
    basic.PromptText,
    basic.ImageGrid,
    basic.SavePrompts,
    miniworld.MiniWorldPrompts,
    miniworld.RenderGroundTruth,
    model.LoadModel,
    model.Sample,
    adapters.LoadAdapter,
    pretrain.PretrainMiniWorld,
    grpo.GRPOTrainerNode,
    opd.TeacherPoolNode,
    opd.TaskRouterNode,
    opd.ColdStartNode,
    opd.DistillerNode,
    evaluate.Evaluator,
    lora_export.SaveLoRA,
    # settings companions (a node's SETTINGS): the advanced widgets of their nodes, under FlowOPD/settings
    pretrain.PretrainSettings,
    grpo.GRPOSettings,
    opd.ColdStartSettings,
    opd.DistillerSettings,
    evaluate.EvaluatorSettings,
]

REGISTRY: dict[str, type[Node]] = {cls.NODE_ID: cls for cls in NODES}

NODE_CLASS_MAPPINGS: dict[str, type[Node]] = dict(REGISTRY)
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {cls.NODE_ID: cls.DISPLAY_NAME or cls.NODE_ID for cls in NODES}
