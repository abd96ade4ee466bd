"""ComfyUI's check of a queued prompt (``execution.validate_inputs``, ComfyUI 0.3.x), reduced to what decides
which check runs where, so tests drive the adapter's VALIDATE_INPUTS the way POST /prompt does, without a
ComfyUI install:

- a link: the source's output type is recorded for ``input_types``; ComfyUI compares it with the input's
  type itself only when VALIDATE_INPUTS does not take ``input_types``;
- a value: converted to the widget's type (``int()``, ``float()``, ``str()``, ``bool()``; a failure is
  ``invalid_input_type``), then range- and choice-checked by ComfyUI only when VALIDATE_INPUTS does not take
  the input;
- VALIDATE_INPUTS gets the inputs its signature names (a linked one as None), the node id and the link
  types; anything but True is a ``custom_validation_failed`` whose details carry the returned text.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from flowopd_nodes.comfy.plugin import NODE_CLASS_MAPPINGS
from flowopd_nodes.engine.graph import Graph, parse_link
from flowopd_nodes.engine.ports import REQUIRED
from flowopd_nodes.engine.settings import expand_settings
from flowopd_nodes.nodes.registry import REGISTRY

CONVERT = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def api_prompt(graph: Graph) -> dict[str, dict[str, Any]]:
    """A loaded (not validated) graph as an API prompt, as the exporter writes it: values as written, defaults
    filled in, paths made absolute, flat settings on a settings node of their own."""
    prompt = {}
    graph = expand_settings(graph)[0]
    for node in graph.nodes.values():
        cls = REGISTRY.get(node.type)
        defaults = {p.name: p.default for p in cls.INPUTS if p.is_widget and p.default not in (REQUIRED, None)}
        inputs: dict[str, Any] = {}
        for name, value in {**defaults, **node.params}.items():
            port = cls.input(name) if cls is not None else None
            if port is not None and port.path and isinstance(value, str) and value:
                value = str(Path(graph.base_dir, value))
            inputs[name] = value
        for name, link in node.links.items():
            inputs.pop(name, None)
            src_id, output = parse_link(link)
            inputs[name] = [src_id, REGISTRY[graph.nodes[src_id].type].output_index(output)]
        prompt[node.id] = {"class_type": node.type, "inputs": inputs}
    return prompt


def _error(kind: str, name: str, details: str = "") -> dict[str, Any]:
    return {"type": kind, "details": f"{name} - {details}" if details else name, "extra_info": {"input_name": name}}


def validate_node(prompt: dict[str, dict[str, Any]], node_id: str) -> list[dict[str, Any]]:
    """The errors ComfyUI reports for one node of ``prompt``."""
    node = prompt[node_id]
    cls = NODE_CLASS_MAPPINGS[node["class_type"]]
    spec = cls.INPUT_TYPES()
    declared = {**spec["required"], **spec.get("optional", {})}
    takes = inspect.getfullargspec(cls.VALIDATE_INPUTS).args[1:] if hasattr(cls, "VALIDATE_INPUTS") else []
    inputs = dict(node["inputs"])
    received: dict[str, str] = {}
    errors = []
    for name, (kind, opts) in declared.items():
        if name not in inputs:
            if name in spec["required"]:
                errors.append(_error("required_input_missing", name))
            continue
        value = inputs[name]
        if isinstance(value, list):
            source = NODE_CLASS_MAPPINGS[prompt[value[0]]["class_type"]]
            received[name] = source.RETURN_TYPES[value[1]]
            if "input_types" not in takes and received[name] != kind:
                errors.append(_error("return_type_mismatch", name))
            continue
        try:
            value = inputs[name] = CONVERT[kind](value) if isinstance(kind, str) and kind in CONVERT else value
        except Exception as exc:  # noqa: BLE001 (ComfyUI catches everything here)
            errors.append(_error("invalid_input_type", name, str(exc)))
            continue
        if name not in takes:
            if "min" in opts and value < opts["min"]:
                errors.append(_error("value_smaller_than_min", name))
            elif "max" in opts and value > opts["max"]:
                errors.append(_error("value_bigger_than_max", name))
            elif isinstance(kind, list) and value not in kind:
                errors.append(_error("value_not_in_list", name))
    if takes:
        args: dict[str, Any] = {}
        for name in takes:
            if name == "unique_id":
                args[name] = node_id
            elif name == "input_types":
                args[name] = received
            elif name in inputs:
                args[name] = None if isinstance(inputs[name], list) else inputs[name]
        result = cls.VALIDATE_INPUTS(**args)
        if result is not True:
            errors.append(_error("custom_validation_failed", "VALIDATE_INPUTS", str(result)))
    return errors


def validate_prompt(prompt: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """node id -> its errors, for every node with any (ComfyUI's ``node_errors``, less its bookkeeping)."""
    found = {node_id: validate_node(prompt, node_id) for node_id in prompt}
    return {node_id: errors for node_id, errors in found.items() if errors}
