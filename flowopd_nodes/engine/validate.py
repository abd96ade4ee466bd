"""Validation: every problem of a graph found before anything runs, reported once.

:func:`validate` returns a :class:`ValidGraph` (resolved params, the dependency graph and the execution
order) or raises :class:`GraphValidationError` listing all problems, ComfyUI ``node_errors``-style.
:func:`check_inputs` and :func:`node_problems` are the per-node checks every front end runs (graph files,
``--set``, ComfyUI JSON, and ComfyUI's VALIDATE_INPUTS through :mod:`flowopd_nodes.comfy.plugin`); checks
across nodes (cycles, one line per cycle; :meth:`Node.check_facts`) need the whole graph.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError, shown
from flowopd_nodes.engine.graph import Graph, did_you_mean, parse_link
from flowopd_nodes.engine.ports import REQUIRED, SETTINGS_INPUT, In, Node, all_ports, merge_settings
from flowopd_nodes.engine.settings import as_owner, expand_settings
from flowopd_nodes.nodes.registry import REGISTRY


@dataclass(frozen=True)
class Link:
    input: str
    node: str
    output: str


@dataclass
class ResolvedNode:
    id: str
    cls: type[Node]
    params: dict[str, Any]  # every widget input's value: file value, else default; paths made absolute
    links: dict[str, Link]
    title: str = ""


@dataclass
class ValidGraph:
    graph: Graph
    nodes: dict[str, ResolvedNode]
    dag: nx.DiGraph  # edge u -> v when v consumes an output of u
    order: list[str]  # demand-driven execution order: ancestors of output nodes, topologically sorted

    @property
    def name(self) -> str:
        return self.graph.name


_PYTHON_TYPES = {"INT": "an integer", "FLOAT": "a number", "STRING": "a string", "BOOLEAN": "true or false"}
INT_LIMIT = 2**63  # INT values are 64-bit integers wherever they end up (torch, JSON readers)
FLOAT_LIMIT = sys.float_info.max
ARTIFACT_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ARTIFACT_RULE = "a plain file name (no folder part) of 1 to 128 characters out of A-Z a-z 0-9 _ - ."
MAX_CYCLES_SHOWN = 10  # cycles reported (one line each); a cycle shows at most MAX_CYCLE_NODES of its nodes
MAX_CYCLE_NODES = 8


def _type_ok(port: In, value: Any) -> bool:
    if port.type == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if port.type == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if port.type == "BOOLEAN":
        return isinstance(value, bool)
    return isinstance(value, str)  # STRING, COMBO


def _number_hint(port: In, value: Any) -> str:
    """Why YAML read a number as text (``1e-4`` is a string in YAML 1.1), when that is what happened."""
    if port.type not in ("INT", "FLOAT") or not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    return f" (YAML reads {value!r} as text; write {number!r})" if math.isfinite(number) else ""


def check_value(
    port: In, value: Any, node: str, class_type: str, base_dir: Path, check_files: bool = True
) -> tuple[Any, list[GraphIssue]]:
    """Check one widget value against its port; return the resolved value (absolute path) and problems.

    Numbers are compared with their range before any conversion (an integer too large for a float is refused,
    not converted). ``check_files=False`` skips the existence of ``must_exist`` paths (files that live on
    another machine)."""

    def issue(kind: str, message: str) -> tuple[Any, list[GraphIssue]]:
        return value, [GraphIssue(kind, message, node=node, field=port.name, class_type=class_type)]

    if value is None and port.optional:
        return None, []
    if not _type_ok(port, value):
        expected = _PYTHON_TYPES.get(port.type, "one of " + ", ".join(map(repr, port.choices)))
        return issue("invalid_input_type", f"expected {expected} ({port.type}), got {shown(value)}"
                     f"{_number_hint(port, value)}")
    if isinstance(value, float) and not math.isfinite(value):
        return issue("invalid_input_type", f"expected a finite number, got {value!r}")
    if port.choices and value not in port.choices:
        return issue("value_not_in_list", f"{shown(value)} is not one of {list(port.choices)}"
                     f"{did_you_mean(value, port.choices)}")
    if port.min is not None and value < port.min:
        return issue("value_smaller_than_min", f"{shown(value)} is smaller than the minimum {port.min}")
    if port.max is not None and value > port.max:
        return issue("value_bigger_than_max", f"{shown(value)} is bigger than the maximum {port.max}")
    if port.type == "INT" and not -INT_LIMIT <= value < INT_LIMIT:
        return issue("value_bigger_than_max", f"{shown(value)} does not fit in a 64-bit integer")
    if port.type == "FLOAT":
        if abs(value) > FLOAT_LIMIT:
            return issue("value_bigger_than_max", f"{shown(value)} is too large for a FLOAT")
        value = float(value)  # 5 and 5.0 are the same setting (and the same cache key)
    if port.artifact and not (ARTIFACT_PATTERN.fullmatch(value) and value.endswith(port.artifact)):
        return issue("invalid_input_type", f"{shown(value)}: expected {ARTIFACT_RULE}, ending in {port.artifact!r}")
    if port.path and value:
        return _check_path(port, value, base_dir, check_files, issue)
    if port.path and port.must_exist and not value:
        return issue("required_input_missing", "a path is required")
    return value, []


def _check_path(port: In, value: str, base_dir: Path, check_files: bool, issue: Any) -> tuple[Any, list[GraphIssue]]:
    if any(ord(c) < 32 for c in value):
        return issue("invalid_input_type", f"{shown(value)}: a path cannot hold control characters")
    try:
        path = Path(value).expanduser()
    except RuntimeError as exc:  # ~user of an unknown user
        return issue("invalid_input_type", f"{shown(value)}: {exc}")
    # made canonical (no "..", links followed): the same file gives the same value, and so the same cache key,
    # whether a graph file names it relative to its folder or a ComfyUI JSON file relative to the repository
    resolved = path if path.is_absolute() else (base_dir / path)
    try:
        resolved = resolved.resolve()
    except (OSError, RuntimeError):  # a loop of links: kept as written, the existence check reports it
        pass
    if check_files and resolved.exists():
        if port.folder is True and not resolved.is_dir():
            return issue("invalid_input_type", f"{shown(value)} is a file; a folder is expected (looked at {resolved})")
        if port.folder is False and resolved.is_dir():
            return issue("invalid_input_type", f"{shown(value)} is a folder; a file is expected (looked at {resolved})")
    elif port.must_exist and check_files:
        return issue("file_not_found", f"{shown(value)} does not exist (looked at {resolved})")
    return str(resolved), []


def check_inputs(
    cls: type[Node],
    node_id: str,
    values: dict[str, Any],
    linked: dict[str, str | None],
    base_dir: Path,
    check_files: bool = True,
) -> tuple[dict[str, Any], list[GraphIssue]]:
    """One node's inputs, checked the same way for every front end (graph files, ComfyUI's VALIDATE_INPUTS).

    ``values``: the widget values given; ``linked``: input name -> the type of the output linked to it (None:
    not known). Returns every widget's value (given, else its default; paths resolved; linked widgets left
    out) and the problems: link types, values, required inputs neither set nor linked.
    """
    issues: list[GraphIssue] = []
    ct = cls.NODE_ID
    params: dict[str, Any] = {}
    for port in cls.INPUTS:
        if port.name in linked:
            kind = linked[port.name]
            if kind is not None and kind != port.type:
                issues.append(GraphIssue("return_type_mismatch", f"the link carries {kind} but input {port.name!r} "
                                         f"takes {port.type}", node=node_id, field=port.name, class_type=ct))
        elif port.name in values:
            value, problems = check_value(port, values[port.name], node_id, ct, base_dir, check_files)
            issues.extend(problems)
            params[port.name] = value
        elif port.default is not REQUIRED:
            value = port.default
            if port.type == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # as a value written in the file: the same cache key either way
            if port.path and value:
                value, problems = check_value(port, value, node_id, ct, base_dir, check_files)
                issues.extend(problems)
            params[port.name] = value
        elif port.optional:
            params[port.name] = None
        else:
            how = "set it in params" if port.is_widget else f"link a {port.type} output to it"
            issues.append(GraphIssue("required_input_missing", f"required input {port.name!r} is missing: {how}",
                                     node=node_id, field=port.name, class_type=ct))
    return params, issues


def node_problems(cls: type[Node], params: dict[str, Any], linked: frozenset[str] | None) -> list[tuple[str, str]]:
    """The node's own checks (``check_params``, then ``check_links`` unless ``linked`` is None: not known) as
    ``(field, message)``.

    A widget fed by a link is absent from ``params`` at validation: a check that needs its value (a KeyError)
    is left to the node's start, where the hosts run these checks again with every value known."""
    checks = [lambda: cls.check_params(dict(params))]
    if linked is not None:
        checks.append(lambda: cls.check_links(dict(params), linked))
    found: list[tuple[str, str]] = []
    for check in checks:
        try:
            found += check()
        except KeyError:
            pass
    return found


def _check_node(graph: Graph, node_id: str, check_files: bool) -> tuple[ResolvedNode | None, list[GraphIssue]]:
    spec = graph.nodes[node_id]
    cls = REGISTRY.get(spec.type)
    if cls is None:
        return None, [
            GraphIssue("unknown_node_type", f"unknown node type {shown(spec.type)}{did_you_mean(spec.type, REGISTRY)}"
                       f" (known: {', '.join(sorted(REGISTRY))})", node=node_id, field="type")
        ]
    issues: list[GraphIssue] = []
    ct = cls.NODE_ID

    def add(kind: str, field: str, message: str) -> None:
        issues.append(GraphIssue(kind, message, node=node_id, field=field, class_type=ct))

    def unknown(name: str) -> None:
        names = [p.name for p in cls.INPUTS]
        known = [p.name for p in all_ports(cls)]
        more = f"; settings: {known[len(names):]}" if cls.SETTINGS is not None else ""
        add("unknown_input", name, f"{ct} has no input {shown(name)}{did_you_mean(name, known)} (inputs: {names}"
            f"{more})")

    values: dict[str, Any] = {}
    linked: dict[str, str | None] = {}  # input -> the type linked to it; None: not known (or reported already)
    for name, value in spec.params.items():
        port = cls.input(name)
        if port is None:
            unknown(name)
        elif not port.is_widget:
            add("invalid_input_type", name, f"input {name!r} takes a link to a {port.type} output, not a value")
            linked[name] = None  # not also "missing"
        elif name in spec.links:
            add("input_conflict", name, f"input {name!r} is both set in params and linked")
        else:
            values[name] = value
    links: dict[str, Link] = {}
    for name, raw in spec.links.items():
        port = cls.input(name)
        if port is None:
            unknown(name)
            continue
        linked[name] = None  # not "missing", whatever is wrong with the link
        parsed = parse_link(raw)
        if parsed is None:
            add("bad_linked_input", name, f"link {shown(raw)} must be '<node id>.<output name>'")
            continue
        src_id, out_name = parsed
        if src_id not in graph.nodes:
            add("bad_linked_input", name,
                f"link {shown(raw)}: no node {shown(src_id)} in the graph{did_you_mean(src_id, graph.nodes)}")
            continue
        src_cls = REGISTRY.get(graph.nodes[src_id].type)
        if src_cls is None:
            continue  # reported on the source node itself
        index = src_cls.output_index(out_name)
        if index is None:
            outs = [o.name for o in src_cls.OUTPUTS]
            add("bad_linked_input", name, f"link {shown(raw)}: {src_cls.NODE_ID} has no output {shown(out_name)}"
                f"{did_you_mean(out_name, outs)} (outputs: {outs})")
            continue
        linked[name] = src_cls.OUTPUTS[index].type
        if linked[name] == port.type:
            links[name] = Link(name, src_id, out_name)
    params, problems = check_inputs(cls, node_id, values, linked, graph.base_dir, check_files)
    issues.extend(problems)
    if not issues and cls.SETTINGS is None:  # with a settings companion: once its values are known (validate)
        for field, message in node_problems(cls, params, frozenset(links)):
            add("custom_validation_failed", field, message)
    return ResolvedNode(node_id, cls, params, links, spec.title), issues


def _cycle_issues(dag: nx.DiGraph, graph: Graph, resolved: dict[str, ResolvedNode]) -> list[GraphIssue]:
    """One problem per cycle: the nodes of one cycle in each strongly connected part of the graph (found in
    linear time; listing every simple cycle grows exponentially), at most ``MAX_CYCLES_SHOWN`` of them."""
    position = {node_id: i for i, node_id in enumerate(graph.nodes)}
    parts = [sorted(c, key=position.get) for c in nx.strongly_connected_components(dag)
             if len(c) > 1 or dag.has_edge(next(iter(c)), next(iter(c)))]
    parts.sort(key=lambda c: position[c[0]])
    issues = []
    for part in parts[:MAX_CYCLES_SHOWN]:
        cycle = [u for u, _ in nx.find_cycle(dag.subgraph(part), source=part[0])]
        first = min(range(len(cycle)), key=lambda i: position[cycle[i]])
        cycle = cycle[first:] + cycle[:first]  # starts at the node earliest in the file
        shown_nodes = cycle if len(cycle) <= MAX_CYCLE_NODES else [*cycle[: MAX_CYCLE_NODES - 1], "..."]
        path = " -> ".join([*shown_nodes, cycle[0]])
        size = f" ({len(cycle)} nodes)" if len(cycle) > MAX_CYCLE_NODES else ""
        node = resolved.get(cycle[0])
        field = next((name for name, link in node.links.items() if link.node == cycle[-1]), "") if node else ""
        issues.append(GraphIssue("dependency_cycle", f"cycle: {path}{size}", node=cycle[0], field=field,
                                 class_type=node.cls.NODE_ID if node else ""))
    if len(parts) > MAX_CYCLES_SHOWN:
        issues.append(GraphIssue("dependency_cycle", f"{len(parts) - MAX_CYCLES_SHOWN} more cycles not shown"))
    return issues


def _fact_issues(dag: nx.DiGraph, resolved: dict[str, ResolvedNode], skip: set[str]) -> list[GraphIssue]:
    """Link-aware checks that need only the graph (e.g. soft-routing weights against the linked pool's task
    names): each node's :meth:`~Node.check_facts` on the facts its sources' params tell, in link order."""
    facts: dict[str, dict[str, dict[str, Any]]] = {}
    issues = []
    for node_id in nx.topological_sort(dag):
        node = resolved.get(node_id)
        if node is None or node_id in skip:
            continue
        # every linked input: its source's facts, {} when the source's params tell nothing
        known = {name: facts.get(link.node, {}).get(link.output, {}) for name, link in node.links.items()}
        params = _with_settings(node, resolved)
        for field, message in node.cls.check_facts(params, known):
            issues.append(GraphIssue("custom_validation_failed", message, node=node_id, field=field,
                                     class_type=node.cls.NODE_ID))
        facts[node_id] = node.cls.output_facts(params, known)
    return issues


def _with_settings(node: ResolvedNode, resolved: dict[str, ResolvedNode]) -> dict[str, Any]:
    """A node's params with the values of the settings node linked to its ``settings`` input (the settings'
    defaults when none is linked); a settings value that comes from elsewhere stays unknown (absent)."""
    if node.cls.SETTINGS is None:
        return dict(node.params)
    link = node.links.get(SETTINGS_INPUT)
    if link is None:
        return merge_settings(node.cls, dict(node.params), fill=True)
    source = resolved.get(link.node)
    if source is None:
        return dict(node.params)
    return merge_settings(node.cls, {**node.params, SETTINGS_INPUT: source.params}, fill=False)


def _settings_owner_issues(
    resolved: dict[str, ResolvedNode], owners: dict[str, str], bad: set[str]
) -> list[GraphIssue]:
    """The own checks of nodes with a settings companion, on their values merged with their settings: the
    companion's defaults when ``settings`` is unlinked, else the values of the settings node linked to it (a
    widget of it fed by a link is unknown: a check that needs it waits for the node's start)."""
    issues = []
    for node in resolved.values():
        if node.cls.SETTINGS is None or node.id in bad:
            continue
        link = node.links.get(SETTINGS_INPUT)
        source = resolved.get(link.node) if link is not None else None
        if link is not None and (source is None or link.node in bad):
            continue
        params = _with_settings(node, resolved)
        explicit = source is not None and source.id not in owners
        for field, message in node_problems(node.cls, params, frozenset(node.links)):
            if explicit and (not field or node.cls.SETTINGS.input(field) is not None):
                message += f" (settings from node {source.id!r})"
            issues.append(GraphIssue("custom_validation_failed", message, node=node.id, field=field,
                                     class_type=node.cls.NODE_ID))
    return issues


def validate(graph: Graph, *, check_files: bool = True) -> ValidGraph:
    """Check everything; return the runnable graph or raise one :class:`GraphValidationError`.

    ``check_files=False`` checks a graph written for another machine (a cluster's model folders, prompt
    files): everything but the existence of the files it names."""
    written = graph
    graph, owners, issues = expand_settings(graph)  # flat settings -> settings nodes of their own
    issues = list(graph.load_issues) + issues
    resolved: dict[str, ResolvedNode] = {}
    for node_id in graph.nodes:
        node, problems = _check_node(graph, node_id, check_files)
        if node_id in owners:  # a made settings node: its problems are those of the node whose file set them
            problems = [as_owner(issue, owners[node_id], graph) for issue in problems]
        issues.extend(problems)
        if node is not None:
            resolved[node_id] = node
    issues.extend(_settings_owner_issues(resolved, owners, {i.node for i in issues}))

    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    for node in resolved.values():
        for link in node.links.values():
            dag.add_edge(link.node, node.id)
    cycles = _cycle_issues(dag, graph, resolved)
    issues.extend(cycles)
    outputs = [n for n, node in resolved.items() if node.cls.OUTPUT_NODE]
    if graph.nodes and not outputs and not any(i.type == "unknown_node_type" for i in issues):
        issues.append(
            GraphIssue(
                "prompt_no_outputs", "the graph has no output node (e.g. a grid, report or evaluator): nothing to run"
            )
        )
    if not cycles:
        issues.extend(_fact_issues(dag, resolved, {i.node for i in issues}))
    if issues:
        raise GraphValidationError(issues, graph.source)

    needed: set[str] = set(outputs)
    for node_id in outputs:
        needed |= nx.ancestors(dag, node_id)
    position = {node_id: i for i, node_id in enumerate(graph.nodes)}
    order = list(nx.lexicographical_topological_sort(dag.subgraph(needed), key=lambda n: position[n]))
    return ValidGraph(graph=written, nodes=resolved, dag=dag, order=order)
