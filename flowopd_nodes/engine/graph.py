"""Graph files: safe YAML loading, the in-memory graph, command-line overrides.

A graph file (schema_version 1)::

    schema_version: 1
    name: demo                      # optional; default: the file's stem (names the run directory)
    nodes:
      prompts:                      # node id
        type: FlowOPDPromptFile     # a registered node type
        params: {path: prompts.txt} # widget values
      grid:
        type: FlowOPDImageGrid
        links: {images: render.images}   # input -> "<node id>.<output name>"

Loading is plain data only: YAML tags, anchors and aliases are refused, duplicate keys are errors, and
nothing in the file is ever imported or evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = {"schema_version", "name", "description", "nodes"}
NODE_KEYS = {"type", "params", "links", "title"}


@dataclass
class NodeSpec:
    id: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    title: str = ""


@dataclass
class Graph:
    name: str
    nodes: dict[str, NodeSpec]  # in file order
    base_dir: Path  # relative paths in params resolve against this folder
    source: str = "<memory>"
    description: str = ""
    load_issues: list[GraphIssue] = field(default_factory=list)  # structural problems, reported by validate()

    def to_data(self) -> dict[str, Any]:
        """The graph as plain data (what is written back to YAML)."""
        nodes: dict[str, Any] = {}
        for node in self.nodes.values():
            entry: dict[str, Any] = {"type": node.type}
            if node.title:
                entry["title"] = node.title
            if node.params:
                entry["params"] = dict(node.params)
            if node.links:
                entry["links"] = dict(node.links)
            nodes[node.id] = entry
        data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "name": self.name}
        if self.description:
            data["description"] = self.description
        data["nodes"] = nodes
        return data


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int):
        self.key, self.line = key, line


def _check_duplicate_keys(node: yaml.Node | None) -> None:
    """Walk a composed YAML node tree (nothing constructed) and raise on a key repeated in one mapping."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else repr(key_node)
            if key in seen:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
            _check_duplicate_keys(value_node)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML as plain data, or raise :class:`GraphValidationError` (never runs anything from the file)."""
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            kind = {yaml.TagToken: "tag", yaml.AnchorToken: "anchor", yaml.AliasToken: "alias"}.get(type(token))
            if kind is not None:
                line = token.start_mark.line + 1
                value = getattr(token, "value", "")
                shown = "".join(value) if isinstance(value, tuple) else value
                raise GraphValidationError(
                    [
                        GraphIssue(
                            "unsafe_yaml",
                            f"line {line}: YAML {kind} {shown!r} refused: graph files hold plain data only",
                        )
                    ],
                    source,
                )
        _check_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text)
    except _DuplicateKey as exc:
        raise GraphValidationError(
            [GraphIssue("duplicate_key", f"line {exc.line}: key {exc.key!r} appears twice", field=exc.key)], source
        ) from None
    except yaml.YAMLError as exc:
        raise GraphValidationError([GraphIssue("invalid_yaml", f"cannot parse YAML: {exc}")], source) from None


def load_graph_file(path: str | Path) -> Graph:
    """Read a graph file into a :class:`Graph` (structure only; :func:`validate` checks the rest)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphValidationError([GraphIssue("invalid_yaml", f"no such file: {path}")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GraphValidationError([GraphIssue("invalid_yaml", f"cannot read {path}: {exc}")], source) from None
    data = parse_yaml(text, source)
    return graph_from_data(data, base_dir=path.resolve().parent, default_name=path.stem, source=source)


def graph_from_data(data: Any, *, base_dir: Path, default_name: str, source: str) -> Graph:
    """Build a :class:`Graph` from plain data.

    Structural problems are collected in ``Graph.load_issues`` (malformed nodes are left out) so validation
    can report them together with every other problem; only a non-mapping document raises at once.
    """
    issues: list[GraphIssue] = []
    if not isinstance(data, dict):
        raise GraphValidationError([GraphIssue("invalid_graph", "the file must hold a mapping with `nodes`")], source)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            issues.append(GraphIssue("invalid_graph", f"unknown top-level key {key!r}", field=str(key)))
    version = data.get("schema_version")
    if version is None:
        issues.append(GraphIssue("invalid_graph", "missing `schema_version`", field="schema_version"))
    elif version != SCHEMA_VERSION:
        issues.append(
            GraphIssue(
                "unsupported_schema_version",
                f"schema_version {version!r} is not supported (this flowopd reads {SCHEMA_VERSION})",
                field="schema_version",
            )
        )
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        issues.append(GraphIssue("invalid_graph", f"`name` must be a plain folder name, got {name!r}", field="name"))
        name = default_name
    raw_nodes = data.get("nodes")
    nodes: dict[str, NodeSpec] = {}
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        issues.append(
            GraphIssue("invalid_graph", "`nodes` must be a non-empty mapping of node id -> node", field="nodes")
        )
        raw_nodes = {}
    for node_id, raw in raw_nodes.items():
        nid = str(node_id)
        if not isinstance(node_id, str) or not nid or "." in nid:
            issues.append(GraphIssue("invalid_graph", f"node id {node_id!r} must be a string without dots", node=nid))
            continue
        if not isinstance(raw, dict):
            issues.append(GraphIssue("invalid_graph", "a node must be a mapping with `type`", node=nid))
            continue
        for key in raw:
            if key not in NODE_KEYS:
                issues.append(GraphIssue(
                    "invalid_graph", f"unknown node key {key!r} (use params or links)", node=nid, field=str(key)
                ))
        node_type = raw.get("type")
        if not isinstance(node_type, str):
            issues.append(GraphIssue("invalid_graph", "missing or non-string `type`", node=nid, field="type"))
            node_type = ""
        params = raw.get("params") or {}
        links = raw.get("links") or {}
        if not isinstance(params, dict):
            issues.append(GraphIssue("invalid_graph", "`params` must be a mapping", node=nid, field="params"))
            params = {}
        if not isinstance(links, dict):
            issues.append(
                GraphIssue("invalid_graph", "`links` must be a mapping input -> node.output", node=nid, field="links")
            )
            links = {}
        title = raw.get("title", "")
        nodes[nid] = NodeSpec(
            id=nid,
            type=node_type,
            params={str(k): v for k, v in params.items()},
            links={str(k): v for k, v in links.items()},
            title=title if isinstance(title, str) else "",
        )
    description = data.get("description", "")
    return Graph(
        name=name,
        nodes=nodes,
        base_dir=base_dir,
        source=source,
        description=str(description or ""),
        load_issues=issues,
    )


def parse_link(link: Any) -> tuple[str, str] | None:
    """``"node.output"`` -> ``("node", "output")``; None when malformed."""
    if not isinstance(link, str) or link.count(".") != 1:
        return None
    node, output = link.split(".")
    if not node or not output:
        return None
    return node, output


def apply_overrides(graph: Graph, overrides: list[str]) -> None:
    """Apply ``--set NODE.PARAM=VALUE`` overrides in place (values parsed as YAML scalars, e.g. 3, 0.5, true).

    Raises one :class:`GraphValidationError` listing every malformed override; value checks happen in
    validation, exactly as for values written in the file.
    """
    issues: list[GraphIssue] = []
    for item in overrides:
        target, sep, raw_value = item.partition("=")
        parsed = parse_link(target.strip())
        if not sep or parsed is None:
            issues.append(GraphIssue("bad_override", f"--set {item!r}: expected NODE.PARAM=VALUE"))
            continue
        node_id, param = parsed
        if node_id not in graph.nodes:
            issues.append(GraphIssue("bad_override", f"--set {item!r}: no node {node_id!r}", node=node_id, field=param))
            continue
        try:
            value = parse_yaml(raw_value, f"--set {item}") if raw_value.strip() else ""
        except GraphValidationError as exc:
            issues.append(
                GraphIssue("bad_override", f"--set {item!r}: {exc.issues[0].message}", node=node_id, field=param)
            )
            continue
        if isinstance(value, (dict, list)):
            issues.append(
                GraphIssue("bad_override", f"--set {item!r}: value must be a scalar", node=node_id, field=param)
            )
            continue
        graph.nodes[node_id].params[param] = value
    if issues:
        raise GraphValidationError(issues, graph.source)
