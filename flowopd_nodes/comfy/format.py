"""ComfyUI graph formats (plain data; needs no ComfyUI): our graphs <-> API ("prompt") JSON and UI-workflow JSON.

- API format, what ``POST /prompt`` takes: ``{id: {class_type, inputs: {name: value | [src id, output index]},
  _meta: {title}}}``. Our export keeps our node ids as keys; the graph's name and description ride in the
  first node's ``_meta.flowopd``.
- UI workflow (version 0.4), what the canvas saves and loads: ``nodes`` (integer ids; ``inputs`` = wire
  inputs then widget inputs, each in ``INPUT_TYPES`` order, as ComfyUI's frontend writes them;
  ``widgets_values`` in widget order) and ``links`` ``[link id, src, src slot, dst, dst slot, type]``. Our node
  ids are kept in each node's ``properties.flowopd_id``, name and description in ``extra.flowopd``. Nodes are
  placed by :mod:`flowopd_nodes.comfy.layout` (columns by depth, readable at fit-to-view).

Export writes every widget value resolved (defaults filled in; paths inside the repository relative to its root,
where ComfyUI and import resolve them, other paths absolute) so the JSON runs on another checkout too. Import
reads both formats back into a :class:`Graph`: every value is kept (defaults included, so the graph keeps its
meaning when a default changes), relative paths in a JSON file are taken relative to the repository root (where the
ComfyUI adapter resolves them) and written relative to the YAML file's folder when they share a parent below
``/``. Nodes of other packs are kept (validation names them); notes, muted nodes and reroutes are not graph
nodes, and a primitive node's value becomes a param of the nodes it feeds.

Settings: export writes the settings nodes validation made for flat settings (collapsed on the canvas); import
folds a settings node that feeds one node back into its flat params (:mod:`flowopd_nodes.engine.settings`) and
reads a workflow saved before a node's settings moved by the node's former widget order (``LEGACY_WIDGETS``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowopd_nodes.comfy import layout
from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError, shown
from flowopd_nodes.engine.graph import (
    MAX_DEPTH,
    MAX_NODES,
    SCHEMA_VERSION,
    Graph,
    graph_from_data,
    name_problem,
    read_graph_text,
    safe_name,
)
from flowopd_nodes.engine.ports import In, Node, SettingsNode
from flowopd_nodes.engine.settings import fold_settings
from flowopd_nodes.engine.validate import ValidGraph
from flowopd_nodes.nodes.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]  # relative paths in ComfyUI JSON are relative to the repository root
WORKFLOW_VERSION = 0.4
NOTE_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASS = 2, 4


# --- export -------------------------------------------------------------------------------------------------


def to_api_prompt(valid: ValidGraph) -> dict[str, dict[str, Any]]:
    """The graph as ComfyUI's API format: ``{id: {class_type, inputs, _meta: {title}}}``.

    Widget values are written resolved (defaults filled in, paths inside the repository relative to its root,
    others absolute: see :func:`_export_params`); links become ``[source id, output index]``.
    """
    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in valid.nodes.items():
        inputs: dict[str, Any] = {k: v for k, v in _export_params(node).items() if v is not None}
        for name, link in node.links.items():
            src_cls = valid.nodes[link.node].cls
            inputs[name] = [link.node, src_cls.output_index(link.output)]
        meta: dict[str, Any] = {"title": node.title or node_id}
        if not prompt:
            meta["flowopd"] = _graph_meta(valid)
        prompt[node_id] = {"class_type": node.cls.NODE_ID, "inputs": inputs, "_meta": meta}
    return prompt


def _export_params(node: Any) -> dict[str, Any]:
    """A node's resolved widget values. Paths inside the repository are written relative to its root (where
    ComfyUI and import resolve relative paths), so a shared workflow runs on a colleague's checkout; other
    paths are written absolute."""
    params = dict(node.params)
    for port in node.cls.INPUTS:
        if port.path and isinstance(params.get(port.name), str) and params[port.name]:
            absolute = Path(params[port.name]).resolve()
            inside = absolute.is_relative_to(ROOT)
            params[port.name] = absolute.relative_to(ROOT).as_posix() if inside else str(absolute)
    return params


def _graph_meta(valid: ValidGraph) -> dict[str, Any]:
    meta = {"schema_version": SCHEMA_VERSION, "name": valid.name}
    if valid.graph.description:
        meta["description"] = valid.graph.description
    return meta


def _wire_ports(cls: type[Node]) -> list[In]:
    """Input slots of a node on the canvas: wire inputs, then widgets, each in INPUT_TYPES order."""
    ordered = [p for p in cls.INPUTS if not p.optional] + [p for p in cls.INPUTS if p.optional]
    return [p for p in ordered if not p.is_widget] + [p for p in ordered if p.is_widget]


def _widget_ports(cls: type[Node]) -> list[In]:
    ordered = [p for p in cls.INPUTS if not p.optional] + [p for p in cls.INPUTS if p.optional]
    return [p for p in ordered if p.is_widget]


def _node_size(cls: type[Node], title: str) -> list[int]:
    """About the size ComfyUI's frontend gives the node (see :func:`layout.node_size`)."""
    return layout.node_size(
        title,
        [p.name for p in _wire_ports(cls) if not p.is_widget],
        [o.name for o in cls.OUTPUTS],
        [(p.name, p.multiline) for p in _widget_ports(cls)],
    )


def _shows_images(cls: type[Node]) -> bool:
    """A node that writes files shows its PNGs on the canvas once it has run (the layout keeps room below)."""
    return cls.OUTPUT_NODE or any(o.type == "FLOWOPD_FILE" for o in cls.OUTPUTS)


def _topological(valid: ValidGraph) -> list[str]:
    import networkx as nx

    position = {n: i for i, n in enumerate(valid.nodes)}
    return list(nx.lexicographical_topological_sort(valid.dag, key=lambda n: position[n]))


def to_workflow(valid: ValidGraph) -> dict[str, Any]:
    """The graph as a ComfyUI UI workflow (version 0.4), laid out by :func:`layout.arrange`."""
    number = {node_id: i for i, node_id in enumerate(valid.nodes, start=1)}
    order = {node_id: i for i, node_id in enumerate(_topological(valid))}
    links: list[list[Any]] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    in_links: dict[tuple[str, str], int] = {}
    for node_id in _topological(valid):
        node = valid.nodes[node_id]
        slots = [p.name for p in _wire_ports(node.cls)]
        for name, link in sorted(node.links.items(), key=lambda item: slots.index(item[0])):
            src_cls = valid.nodes[link.node].cls
            src_slot = src_cls.output_index(link.output)
            link_id = len(links) + 1
            links.append([
                link_id, number[link.node], src_slot, number[node_id], slots.index(name), src_cls.OUTPUTS[src_slot].type
            ])
            out_links.setdefault((link.node, src_slot), []).append(link_id)
            in_links[(node_id, name)] = link_id
    nodes = []
    for node_id, node in valid.nodes.items():
        cls = node.cls
        inputs = []
        for port in _wire_ports(cls):
            entry: dict[str, Any] = {"localized_name": port.name, "name": port.name, "type": port.type}
            if port.is_widget:
                entry["widget"] = {"name": port.name}
            elif port.optional:
                entry["shape"] = 7  # how the frontend marks an optional input
            entry["link"] = in_links.get((node_id, port.name))
            inputs.append(entry)
        outputs = [
            {"localized_name": o.name, "name": o.name, "type": o.type, "links": out_links.get((node_id, i), [])}
            for i, o in enumerate(cls.OUTPUTS)
        ]
        params = _export_params(node)
        widgets = [_widget_value(params.get(p.name), p) for p in _widget_ports(cls)]
        nodes.append(
            {
                "id": number[node_id],
                "type": cls.NODE_ID,
                "pos": [0.0, 0.0],  # set by layout.arrange below
                "size": _node_size(cls, node.title or node_id),
                "flags": {"collapsed": True} if issubclass(cls, SettingsNode) else {},  # settings: one title row
                "order": order[node_id],
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "title": node.title or node_id,
                "properties": {"Node name for S&R": cls.NODE_ID, "flowopd_id": node_id},
                "widgets_values": widgets,
            }
        )
    layout.arrange(nodes, links, previews={number[n] for n, node in valid.nodes.items() if _shows_images(node.cls)})
    return {
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}, "flowopd": _graph_meta(valid)},
        "version": WORKFLOW_VERSION,
    }


def _widget_value(value: Any, port: In) -> Any:
    if value is None:  # an unset optional widget: the canvas shows the type's empty value
        return {
            "INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "COMBO": port.choices[0] if port.choices else ""
        }.get(port.type, "")
    return value


# --- import -------------------------------------------------------------------------------------------------


def _fail(message: str, source: str, kind: str = "invalid_graph", **where: str) -> GraphValidationError:
    return GraphValidationError([GraphIssue(kind, message, **where)], source)


def detect(data: Any) -> str:
    """``"workflow"``, ``"api"`` or ``""`` for data that is neither."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list):
        return "workflow"
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return ""


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def parse_json(text: str, source: str) -> Any:
    """JSON as plain data, or :class:`GraphValidationError`: within the graph files' limits (nesting depth,
    size), with duplicate keys refused (JSON would keep the last one silently)."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _fail(f"key {shown(exc.args[0])} appears twice in one object", source, "duplicate_key",
                    field=str(exc.args[0])[:80]) from None
    except RecursionError:
        raise _fail(f"cannot read {source} as JSON: nested more than {MAX_DEPTH} levels deep", source) from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise _fail(f"cannot read {source} as JSON: {exc}", source) from None
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _fail(f"cannot read {source} as JSON: nested more than {MAX_DEPTH} levels deep", source)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return data


def load_comfy_file(path: str | Path, *, yaml_dir: Path | None = None) -> Graph:
    """A ComfyUI JSON file (API or UI workflow, or a ``{"prompt": ...}`` request body) as a :class:`Graph`.

    ``yaml_dir``: where the graph will be written as YAML (paths are made relative to it); None keeps them
    absolute (for running the file directly).
    """
    path = Path(path)
    source = str(path)
    data = parse_json(read_graph_text(path, unreadable="invalid_graph"), source)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    default = safe_name(path.stem.removesuffix(".api").removesuffix(".workflow"))
    return graph_from_comfy(data, default_name=default, source=source, yaml_dir=yaml_dir)


def graph_from_comfy(data: Any, *, default_name: str, source: str = "<memory>", yaml_dir: Path | None = None) -> Graph:
    kind = detect(data)
    if kind == "":
        raise _fail("not a ComfyUI graph: expected API format ({id: {class_type, inputs}}) or a UI workflow "
                    "({nodes, links})", source)
    size = len(data["nodes"]) if kind == "workflow" else len(data)
    if size > MAX_NODES:
        raise _fail(f"{size} nodes; a graph may have {MAX_NODES}", source)
    shape = _workflow_shape(data) if kind == "workflow" else _api_shape(data)
    if shape:
        raise GraphValidationError(shape, source)
    doc = _from_workflow(data, source) if kind == "workflow" else _from_api(data, source)
    for node in doc["nodes"].values():
        _tidy_params(node, yaml_dir)
    doc.setdefault("name", default_name)
    base = yaml_dir if yaml_dir is not None else ROOT
    graph = graph_from_data(doc, base_dir=base.resolve(), default_name=default_name, source=source)
    return fold_settings(graph)  # a settings node feeding one node: that node's flat params again


def _is_id(value: Any) -> bool:
    """A ComfyUI node or link id: an integer (the canvas) or a string (API keys, newer frontends)."""
    return isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool)


def _api_shape(data: dict[str, Any]) -> list[GraphIssue]:
    """Problems of an API prompt's shape, each naming the node and field (a conversion could not go on)."""
    issues = []
    for key, raw in data.items():
        node = str(key)[:80]
        if not isinstance(raw.get("class_type"), str):
            issues.append(GraphIssue("invalid_graph", f"class_type must be a node type name, got "
                                     f"{shown(raw.get('class_type'))}", node=node, field="class_type"))
        if not isinstance(raw.get("inputs", {}), dict):
            issues.append(GraphIssue("invalid_graph", "inputs must be an object", node=node, field="inputs"))
    return issues


def _workflow_shape(data: dict[str, Any]) -> list[GraphIssue]:
    """Problems of a UI workflow's shape (ids, slots, links), each naming the node and field."""
    issues = []

    def bad(node: Any, field: str, message: str) -> None:
        issues.append(GraphIssue("invalid_graph", message, node=str(node)[:80] if _is_id(node) else "", field=field))

    seen: set[Any] = set()
    for index, node in enumerate(data["nodes"]):
        if not isinstance(node, dict):
            bad("", "nodes", f"nodes[{index}] must be an object, got {shown(node)}")
            continue
        node_id = node.get("id")
        if not _is_id(node_id):
            bad("", "id", f"nodes[{index}]: a node id must be an integer or a string, got {shown(node_id)}")
            continue
        if node_id in seen:
            bad(node_id, "id", f"node id {shown(node_id)} appears twice")
        seen.add(node_id)
        if not isinstance(node.get("type"), str):
            bad(node_id, "type", f"type must be a node type name, got {shown(node.get('type'))}")
        for key, kinds in (("inputs", list), ("outputs", list), ("properties", dict),
                           ("widgets_values", (list, dict))):
            if node.get(key) is not None and not isinstance(node[key], kinds):
                bad(node_id, key, f"{key} has the wrong shape: {shown(node[key])}")
        for key in ("inputs", "outputs"):
            slots = node.get(key) if isinstance(node.get(key), list) else []
            for slot in slots:
                if not isinstance(slot, dict) or not isinstance(slot.get("name", ""), str):
                    bad(node_id, key, f"a slot of {key} must be an object with a name, got {shown(slot)}")
                elif key == "inputs" and slot.get("link") is not None and not _is_id(slot["link"]):
                    bad(node_id, slot["name"], f"link must be a link id, got {shown(slot['link'])}")
    for link in data["links"]:
        if isinstance(link, list):
            ends = link[:5]
        elif isinstance(link, dict):
            ends = [link.get(k) for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
        else:
            ends = []
        if len(ends) < 5 or not all(map(_is_id, ends[:2] + ends[3:4])) or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in (ends[2], ends[4])):
            bad("", "links", f"a link must be [id, source, slot, target, slot, type], got {shown(link)}")
    return issues


def _meta_doc(meta: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    if isinstance(meta, dict):
        if isinstance(meta.get("name"), str) and meta["name"]:
            doc["name"] = meta["name"]
        if isinstance(meta.get("description"), str) and meta["description"].strip():
            doc["description"] = meta["description"].strip()
    return doc


def _safe_id(raw: Any, taken: set[str]) -> str:
    """Our id for a ComfyUI id: ComfyUI's separators ``.`` and ``:`` (nested nodes) become ``_``. An id that
    would still break the node id rule is kept as written, for validation to refuse in the user's spelling."""
    base = str(raw).replace(".", "_").replace(":", "_") or "node"
    if name_problem(base, "node id"):
        base = str(raw)
    node_id, i = base, 2
    while node_id in taken:
        node_id, i = f"{base}_{i}", i + 1
    taken.add(node_id)
    return node_id


def _title(title: Any, node_id: str, cls: type[Node] | None) -> str:
    if not isinstance(title, str) or not title or title == node_id:
        return ""
    if cls is not None and title in (cls.DISPLAY_NAME, cls.NODE_ID):
        return ""
    return title


def _from_api(data: dict[str, Any], source: str) -> dict[str, Any]:
    first_meta = next(iter(data.values())).get("_meta", {})
    doc = _meta_doc(first_meta.get("flowopd") if isinstance(first_meta, dict) else None)
    taken: set[str] = set()
    ids = {key: _safe_id(key, taken) for key in data}
    nodes: dict[str, Any] = {}
    for key, raw in data.items():
        class_type = raw["class_type"]
        cls = REGISTRY.get(class_type)
        entry: dict[str, Any] = {"type": class_type, "params": {}, "links": {}}
        meta = raw.get("_meta") if isinstance(raw.get("_meta"), dict) else {}
        title = _title(meta.get("title"), ids[key], cls)
        if title:
            entry["title"] = title
        inputs = raw.get("inputs") if isinstance(raw.get("inputs"), dict) else {}
        for name, value in inputs.items():
            if (isinstance(value, list) and len(value) == 2 and _is_id(value[0]) and str(value[0]) in data
                    and isinstance(value[1], int) and not isinstance(value[1], bool)):
                src = data[str(value[0])]
                src_cls = REGISTRY.get(src["class_type"])
                outputs = [o.name for o in src_cls.OUTPUTS] if src_cls is not None else []
                out_name = outputs[value[1]] if 0 <= value[1] < len(outputs) else f"output{value[1]}"
                entry["links"][name] = f"{ids[str(value[0])]}.{out_name}"
            elif isinstance(value, dict) and "__value__" in value:
                entry["params"][name] = value["__value__"]
            else:
                entry["params"][name] = value
        nodes[ids[key]] = entry
    doc["nodes"] = nodes
    return doc


def _from_workflow(data: dict[str, Any], source: str) -> dict[str, Any]:
    extra = data.get("extra") if isinstance(data.get("extra"), dict) else {}
    doc = _meta_doc(extra.get("flowopd"))
    raw_nodes = {n.get("id"): n for n in data["nodes"] if isinstance(n, dict)}
    issues: list[GraphIssue] = []
    links: dict[Any, tuple[Any, int, Any, int]] = {}
    for link in data["links"]:
        if isinstance(link, list) and len(link) >= 5:
            links[link[0]] = (link[1], link[2], link[3], link[4])
        elif isinstance(link, dict):  # the newer object form
            links[link.get("id")] = (
                link.get("origin_id"), link.get("origin_slot"), link.get("target_id"), link.get("target_slot")
            )

    def skipped(node: dict[str, Any]) -> bool:
        return node.get("type") in NOTE_TYPES or node.get("mode") == MODE_MUTED

    for node in raw_nodes.values():
        if node.get("mode") == MODE_BYPASS:
            issues.append(GraphIssue("invalid_graph", f"node {node.get('id')} ({node.get('type')}) is bypassed: "
                                     "remove it or turn bypass off", node=str(node.get("id"))))

    def source_of(link_id: Any) -> tuple[Any, int] | None:
        """The (node, slot) a link starts from, followed back through reroutes."""
        for _ in range(len(links) + 1):  # a loop of reroutes ends here
            if link_id not in links:
                return None
            src, slot, _, _ = links[link_id]
            node = raw_nodes.get(src)
            if node is None or node.get("type") != "Reroute":
                return src, slot
            link_id = (node.get("inputs") or [{}])[0].get("link")
        return None

    taken: set[str] = set()
    ids: dict[Any, str] = {}
    for raw_id, node in raw_nodes.items():
        if skipped(node) or node.get("type") in ("Reroute", "PrimitiveNode"):
            continue
        wanted = (node.get("properties") or {}).get("flowopd_id")
        ids[raw_id] = _safe_id(wanted if isinstance(wanted, str) and wanted else raw_id, taken)
    nodes: dict[str, Any] = {}
    for raw_id, node_id in ids.items():
        node = raw_nodes[raw_id]
        cls = REGISTRY.get(node.get("type"))
        entry: dict[str, Any] = {"type": node.get("type"), "params": {}, "links": {}}
        title = _title(node.get("title"), node_id, cls)
        if title:
            entry["title"] = title
        values = node.get("widgets_values")
        slots = node.get("inputs") or []
        linked = {s.get("name") for s in slots if isinstance(s, dict) and s.get("link") is not None}
        if cls is not None:
            widgets = _widget_ports(cls)
            if isinstance(values, dict):
                given = {p.name: values[p.name] for p in widgets if p.name in values}
            elif isinstance(values, list) and len(values) == len(cls.LEGACY_WIDGETS) != len(widgets):
                given = dict(zip(cls.LEGACY_WIDGETS, values))  # saved before the settings moved: flat settings
            elif isinstance(values, list):
                given = dict(zip([p.name for p in widgets], values))
            else:
                given = {}
            entry["params"] = {k: v for k, v in given.items() if k not in linked}
        for slot in slots:
            if not isinstance(slot, dict) or slot.get("link") is None:
                continue
            name = slot.get("name")
            src = source_of(slot["link"])
            if src is None or src[0] not in raw_nodes:
                issues.append(GraphIssue("bad_linked_input", f"input {name!r}: link {slot['link']} leads nowhere",
                                         node=node_id, field=str(name)))
                continue
            src_node = raw_nodes[src[0]]
            if src_node.get("type") == "PrimitiveNode":
                primitive = src_node.get("widgets_values")
                entry["params"][name] = primitive[0] if isinstance(primitive, list) and primitive else None
                continue
            if skipped(src_node):
                continue
            src_cls = REGISTRY.get(src_node.get("type"))
            outputs = src_cls.OUTPUTS if src_cls is not None else ()
            out_name = outputs[src[1]].name if isinstance(src[1], int) and 0 <= src[1] < len(outputs) else None
            if out_name is None:
                out_slots = src_node.get("outputs") or []
                out_name = (
                    out_slots[src[1]].get("name")
                    if isinstance(src[1], int) and 0 <= src[1] < len(out_slots)
                    else f"output{src[1]}"
                )
            entry["links"][name] = f"{ids[src[0]]}.{out_name}"
        nodes[node_id] = entry
    if issues:
        raise GraphValidationError(issues, source)
    doc["nodes"] = nodes
    return doc


def _tidy_params(node: dict[str, Any], yaml_dir: Path | None) -> None:
    """Write paths relative to the YAML file where that reads well. Every value the file gives is kept, those
    equal to today's defaults too: a shared graph must not change meaning when a default changes."""
    cls = REGISTRY.get(node.get("type"))
    if cls is None:
        return
    params = node["params"]
    for name in list(params):
        port = cls.port(name)
        if port is None or not port.is_widget:
            continue
        value = params[name]
        if port.path and isinstance(value, str) and value:
            params[name] = _relative_path(value, yaml_dir)
    if not params:
        del node["params"]
    if not node["links"]:
        del node["links"]


def _relative_path(value: str, yaml_dir: Path | None) -> str:
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of an unknown user: validation reports it
        return value
    absolute = Path(os.path.normpath(path if path.is_absolute() else ROOT / path))
    if yaml_dir is None:
        return str(absolute)
    folder = yaml_dir.resolve()
    common = Path(os.path.commonpath([absolute, folder]))
    if common == Path(common.anchor):  # nothing shared but the root: an absolute path reads better
        return str(absolute)
    return os.path.relpath(absolute, folder)


def graph_to_yaml(graph: Graph) -> str:
    """A graph as YAML text in the style of the shipped graph files (flat params and links inline)."""
    import yaml

    return yaml.safe_dump(graph.to_data(), sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)


__all__ = [
    "detect",
    "graph_from_comfy",
    "graph_to_yaml",
    "load_comfy_file",
    "to_api_prompt",
    "to_workflow",
]
