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

Loading is plain data only: YAML tags, anchors, aliases and merge keys are refused, duplicate keys are errors,
and nothing in the file is ever imported or evaluated. The text is parsed once (PyYAML's C loader when it is
installed) within limits: ``MAX_FILE_BYTES``, ``MAX_DEPTH`` levels of nesting, ``MAX_NODES`` nodes.

Node ids and graph names name folders of the run directory, so they are kept to a safe character set
(``NAME_RULE``); every path made from them is checked to stay inside its folder (:func:`inside`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError, shown

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS = {"schema_version", "name", "description", "nodes"}
NODE_KEYS = {"type", "params", "links", "title"}
MAX_FILE_BYTES = 64 * 2**20  # a 50,000-node graph is about 5 MB
MAX_DEPTH = 32  # mappings and lists inside each other; a graph file needs 5
MAX_NODES = 100_000
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
NAME_RULE = "1 to 64 characters out of A-Z a-z 0-9 _ -, not starting with '-'"
"""Node ids and graph names (they name folders: no dots, slashes, spaces or control characters)."""
SAFE_PARSER = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
"""PyYAML's safe loader, the one ``yaml.safe_load`` uses (libyaml's C version when PyYAML has it): it parses,
composes and builds plain data only (SafeConstructor), never objects."""
_MERGE_TAG = "tag:yaml.org,2002:merge"


def name_problem(value: Any, what: str) -> str | None:
    """Why ``value`` is not a safe node id / graph name (``what`` names it in the message); None if it is."""
    if isinstance(value, str) and NAME_PATTERN.fullmatch(value):
        return None
    return f"{what} {shown(value)} is not allowed: use {NAME_RULE}"


def safe_name(text: str) -> str:
    """``text`` made a safe name (a default taken from a file name): other characters become ``_``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", text).lstrip("-")[:64]
    return name or "graph"


def inside(base: str | Path, *parts: str) -> Path:
    """``base / parts`` for parts that are single folder or file names: ValueError for an empty part, ``.``,
    ``..``, a separator, an absolute path or a control character, so the result stays inside ``base``."""
    for part in parts:
        if (not part or part in (".", "..") or "/" in part or "\\" in part or Path(part).is_absolute()
                or any(ord(c) < 32 for c in part)):
            raise ValueError(f"refused path part {shown(part)} under {base}: it would lead outside")
    return Path(base).joinpath(*parts)


def did_you_mean(word: str, options: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


def _fail(kind: str, message: str, source: str, **where: str) -> GraphValidationError:
    return GraphValidationError([GraphIssue(kind, message, **where)], source)


def read_graph_text(path: str | Path, unreadable: str = "invalid_yaml") -> str:
    """A graph file's text, or :class:`GraphValidationError`: ``file_not_found``, or ``unreadable`` (the problem
    type of the file's format) for a folder, a file over ``MAX_FILE_BYTES``, or one that cannot be read."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise _fail(unreadable, f"{path} is a folder, not a graph file", source)
        if size > MAX_FILE_BYTES:
            raise _fail(unreadable, f"{path} has {size} bytes; a graph file may have {MAX_FILE_BYTES}", source)
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail("file_not_found", f"no such graph file: {path}", source) from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, a NUL byte in the name
        raise _fail(unreadable, f"cannot read {path}: {exc}", source) from None


def _refuse_tags(text: str, source: str) -> None:
    """Raise on the first YAML tag, anchor or alias (read from the safe loader's events: nothing is constructed)."""
    for event in _events(text):
        tag = getattr(event, "tag", None)
        if isinstance(event, yaml.AliasEvent):
            kind, value = "alias", event.anchor
        elif getattr(event, "anchor", None) is not None:
            kind, value = "anchor", event.anchor
        elif tag is not None:
            kind, value = "tag", tag
        else:
            continue
        line = event.start_mark.line + 1
        raise _fail("unsafe_yaml", f"line {line}: YAML {kind} {shown(value)} refused: graph files hold plain data "
                    "only", source)


def _events(text: str) -> Iterator[yaml.Event]:
    """The YAML event stream of ``text`` from the safe loader (parsing only)."""
    loader = SAFE_PARSER(text)
    try:
        while loader.check_event():
            yield loader.get_event()
    finally:
        loader.dispose()


def _safe_load_checked(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` in its two steps, the same safe loader for both, with the composed node tree
    checked (:func:`_check_tree`) between composing and building plain values."""
    loader = SAFE_PARSER(text)
    try:
        node = loader.get_single_node()  # the node tree: nothing constructed yet
        if node is None:
            return None
        _check_tree(node, source)
        return loader.construct_document(node)  # SafeConstructor: plain data only
    finally:
        loader.dispose()


def _check_tree(root: yaml.Node, source: str) -> None:
    """Walk the composed YAML (nothing constructed yet): nesting depth, merge keys, keys that are not plain
    values, keys repeated in one mapping."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, yaml.ScalarNode):
            continue
        line = node.start_mark.line + 1
        if depth > MAX_DEPTH:
            raise _fail("invalid_yaml", f"line {line}: nested more than {MAX_DEPTH} levels deep", source)
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)
            continue
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail("invalid_yaml", f"line {key_line}: a key must be a plain value, not a list or mapping",
                            source)
            if key_node.tag == _MERGE_TAG:
                raise _fail("unsafe_yaml", f"line {key_line}: YAML merge key '<<' refused: graph files hold plain "
                            "data only", source)
            if key_node.value in seen:
                raise _fail("duplicate_key", f"line {key_line}: key {shown(key_node.value)} appears twice", source,
                            field=str(key_node.value))
            seen.add(key_node.value)
            stack.append((value_node, depth + 1))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML as plain data, or raise :class:`GraphValidationError` (never runs anything from the file).

    One parse (libyaml when present): tags, anchors and aliases are looked for in the event stream only when
    the text holds a ``!``, ``&`` or ``*`` at all; the composed tree is checked before any value is built.
    """
    if len(text) > MAX_FILE_BYTES:
        raise _fail("invalid_yaml", f"{len(text)} characters; a graph may have {MAX_FILE_BYTES}", source)
    try:
        if "!" in text or "&" in text or "*" in text:
            _refuse_tags(text, source)
        return _safe_load_checked(text, source)
    except yaml.YAMLError as exc:
        raise _fail("invalid_yaml", "cannot parse YAML: " + " ".join(str(exc).split()), source) from None
    except RecursionError:
        raise _fail("invalid_yaml", f"nested more than {MAX_DEPTH} levels deep", source) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits, a date out of range
        raise _fail("invalid_yaml", f"a value cannot be read: {exc}", source) from None


def load_graph_file(path: str | Path) -> Graph:
    """Read a graph file into a :class:`Graph` (structure only; :func:`validate` checks the rest)."""
    path = Path(path)
    data = parse_yaml(read_graph_text(path), str(path))
    return graph_from_data(data, base_dir=path.resolve().parent, default_name=safe_name(path.stem), source=str(path))


def graph_from_data(data: Any, *, base_dir: Path, default_name: str, source: str) -> Graph:
    """Build a :class:`Graph` from plain data.

    Structural problems are collected in ``Graph.load_issues`` (malformed nodes are left out) so validation
    can report them together with every other problem; only a non-mapping document raises at once.
    """
    issues: list[GraphIssue] = []
    if not isinstance(data, dict):
        raise _fail("invalid_graph", "the file must hold a mapping with `nodes`", source)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            issues.append(GraphIssue("invalid_graph", f"unknown top-level key {shown(key)}"
                                     f"{did_you_mean(key, TOP_LEVEL_KEYS)}", field=str(key)))
    version = data.get("schema_version")
    if version is None:
        issues.append(GraphIssue("invalid_graph", "missing `schema_version`", field="schema_version"))
    elif version != SCHEMA_VERSION:
        issues.append(
            GraphIssue(
                "unsupported_schema_version",
                f"schema_version {shown(version)} is not supported (this flowopd reads {SCHEMA_VERSION})",
                field="schema_version",
            )
        )
    name = data.get("name", default_name)
    problem = name_problem(name, "`name`")
    if problem:
        issues.append(GraphIssue("invalid_graph", problem + " (it names the run folder)", field="name"))
        name = default_name
    raw_nodes = data.get("nodes")
    nodes: dict[str, NodeSpec] = {}
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        issues.append(
            GraphIssue("invalid_graph", "`nodes` must be a non-empty mapping of node id -> node", field="nodes")
        )
        raw_nodes = {}
    elif len(raw_nodes) > MAX_NODES:
        issues.append(GraphIssue("invalid_graph", f"{len(raw_nodes)} nodes; a graph may have {MAX_NODES}",
                                 field="nodes"))
        raw_nodes = {}
    for node_id, raw in raw_nodes.items():
        problem = name_problem(node_id, "node id")
        if problem:
            issues.append(GraphIssue("invalid_graph", problem, node=str(node_id)[:80]))
            continue
        nid = node_id
        if not isinstance(raw, dict):
            issues.append(GraphIssue("invalid_graph", "a node must be a mapping with `type`", node=nid))
            continue
        for key in raw:
            if key not in NODE_KEYS:
                issues.append(GraphIssue(
                    "invalid_graph", f"unknown node key {shown(key)} (use params or links)", node=nid, field=str(key)
                ))
        node_type = raw.get("type")
        if not isinstance(node_type, str):
            issues.append(GraphIssue("invalid_graph", f"missing or non-string `type`: {shown(node_type)}", node=nid,
                                     field="type"))
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
    description = data.get("description") or ""
    if not isinstance(description, str):
        issues.append(GraphIssue("invalid_graph", "`description` must be text", field="description"))
        description = ""
    return Graph(
        name=name,
        nodes=nodes,
        base_dir=base_dir,
        source=source,
        description=description,
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


TEXT_TYPES = ("STRING", "COMBO")
"""Port types whose ``--set`` value is taken as the text given (every other type is read as a YAML scalar)."""


def apply_overrides(graph: Graph, overrides: list[str]) -> None:
    """Apply ``--set NODE.PARAM=VALUE`` overrides in place.

    A STRING or COMBO input takes VALUE as the text given (``--set 'router.weights=text: text=0.8'``); any
    other input reads it as a YAML scalar (``3``, ``0.5``, ``true``); an empty VALUE is the empty string.
    Malformed overrides, and those naming no node, are added to ``graph.load_issues``: :func:`validate`
    reports them with every other problem. Values are checked in validation, exactly as values in the file.
    """
    if not overrides:
        return
    from flowopd_nodes.nodes.registry import REGISTRY  # graph files load without the node classes

    for item in overrides:
        target, sep, raw_value = item.partition("=")
        parsed = parse_link(target.strip())
        if not sep or parsed is None:
            graph.load_issues.append(GraphIssue("bad_override", f"--set {shown(item)}: expected NODE.PARAM=VALUE"))
            continue
        node_id, param = parsed
        node = graph.nodes.get(node_id)
        if node is None:
            graph.load_issues.append(GraphIssue(
                "bad_override", f"--set {shown(item)}: no node {shown(node_id)}{did_you_mean(node_id, graph.nodes)}",
                node=node_id[:80], field=param,
            ))
            continue
        cls = REGISTRY.get(node.type)
        port = cls.port(param) if cls is not None else None  # its own input, or a field of its settings
        if port is not None and port.type in TEXT_TYPES:
            node.params[param] = raw_value
            continue
        if not raw_value.strip():
            node.params[param] = ""
            continue
        try:
            value = parse_yaml(raw_value, f"--set {item}")
        except GraphValidationError as exc:
            graph.load_issues.append(
                GraphIssue("bad_override", f"--set {shown(item)}: {exc.issues[0].message}", node=node_id, field=param)
            )
            continue
        if isinstance(value, (dict, list)):
            graph.load_issues.append(GraphIssue(
                "bad_override", f"--set {shown(item)}: the value must be a single number, true/false or text",
                node=node_id, field=param,
            ))
            continue
        node.params[param] = value
