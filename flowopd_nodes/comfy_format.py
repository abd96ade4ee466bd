"""ComfyUI graph formats (plain data; needs no ComfyUI): our graph -> API ("prompt") format."""

from __future__ import annotations

from typing import Any

from flowopd_nodes.validate import ValidGraph


def to_api_prompt(valid: ValidGraph) -> dict[str, dict[str, Any]]:
    """The graph as ComfyUI's API format: ``{id: {class_type, inputs, _meta: {title}}}``.

    Widget values are written resolved (defaults filled in, paths absolute) so the prompt runs wherever
    ComfyUI's working folder is; links become ``[source id, output index]``.
    """
    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in valid.nodes.items():
        inputs: dict[str, Any] = {k: v for k, v in node.params.items() if v is not None}
        for name, link in node.links.items():
            src_cls = valid.nodes[link.node].cls
            inputs[name] = [link.node, src_cls.output_index(link.output)]
        prompt[node_id] = {
            "class_type": node.cls.NODE_ID,
            "inputs": inputs,
            "_meta": {"title": node.title or node_id},
        }
    return prompt
