"""Validation: every problem of a graph found before anything runs, reported once.

:func:`validate` returns a :class:`ValidGraph` (resolved params, the dependency graph and the execution
order) or raises :class:`GraphValidationError` listing all problems, ComfyUI ``node_errors``-style.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError
from flowopd_nodes.engine.graph import Graph, parse_link
from flowopd_nodes.engine.ports import REQUIRED, In, Node
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


def _type_ok(port: In, value: Any) -> bool:
    if port.type == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if port.type == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if port.type == "BOOLEAN":
        return isinstance(value, bool)
    return isinstance(value, str)  # STRING, COMBO


def check_value(
    port: In, value: Any, node: str, class_type: str, base_dir: Path, check_files: bool = True
) -> tuple[Any, list[GraphIssue]]:
    """Check one widget value against its port; return the resolved value (absolute path) and problems.
    ``check_files=False`` skips the existence of ``must_exist`` paths (files that live on another machine)."""

    def issue(kind: str, message: str) -> list[GraphIssue]:
        return [GraphIssue(kind, message, node=node, field=port.name, class_type=class_type)]

    if value is None and port.optional:
        return None, []
    if not _type_ok(port, value):
        expected = _PYTHON_TYPES.get(port.type, "one of " + ", ".join(map(repr, port.choices)))
        return value, issue("invalid_input_type", f"expected {expected} ({port.type}), got {value!r}")
    if port.type == "FLOAT":
        if not math.isfinite(value):
            return value, issue("invalid_input_type", f"expected a finite number, got {value!r}")
        value = float(value)  # 5 and 5.0 are the same setting (and the same cache key)
    if port.type == "COMBO" and value not in port.choices:
        return value, issue("value_not_in_list", f"{value!r} is not one of {list(port.choices)}")
    if port.min is not None and value < port.min:
        return value, issue("value_smaller_than_min", f"{value!r} is smaller than the minimum {port.min}")
    if port.max is not None and value > port.max:
        return value, issue("value_bigger_than_max", f"{value!r} is bigger than the maximum {port.max}")
    if port.path and value:
        path = Path(value).expanduser()
        resolved = path if path.is_absolute() else (base_dir / path)
        if port.must_exist and check_files and not resolved.exists():
            return value, issue("file_not_found", f"{value!r} does not exist (looked at {resolved})")
        return str(resolved), []
    if port.path and port.must_exist and not value:
        return value, issue("required_input_missing", "a path is required")
    return value, []


def _check_node(graph: Graph, node_id: str, check_files: bool) -> tuple[ResolvedNode | None, list[GraphIssue]]:
    spec = graph.nodes[node_id]
    cls = REGISTRY.get(spec.type)
    if cls is None:
        known = ", ".join(sorted(REGISTRY))
        return None, [
            GraphIssue(
                "unknown_node_type", f"unknown node type {spec.type!r} (known: {known})", node=node_id, field="type"
            )
        ]
    issues: list[GraphIssue] = []
    ct = cls.NODE_ID

    def add(kind: str, field: str, message: str) -> None:
        issues.append(GraphIssue(kind, message, node=node_id, field=field, class_type=ct))

    params: dict[str, Any] = {}
    links: dict[str, Link] = {}
    for name in spec.params:
        port = cls.input(name)
        if port is None:
            add("unknown_input", name, f"{ct} has no input {name!r} (inputs: {[p.name for p in cls.INPUTS]})")
        elif not port.is_widget:
            add("invalid_input_type", name, f"input {name!r} takes a link to a {port.type} output, not a value")
        elif name in spec.links:
            add("input_conflict", name, f"input {name!r} is both set in params and linked")
    for name, raw in spec.links.items():
        port = cls.input(name)
        if port is None:
            add("unknown_input", name, f"{ct} has no input {name!r} (inputs: {[p.name for p in cls.INPUTS]})")
            continue
        parsed = parse_link(raw)
        if parsed is None:
            add("bad_linked_input", name, f"link {raw!r} must be '<node id>.<output name>'")
            continue
        src_id, out_name = parsed
        if src_id not in graph.nodes:
            add("bad_linked_input", name, f"link {raw!r}: no node {src_id!r} in the graph")
            continue
        src_cls = REGISTRY.get(graph.nodes[src_id].type)
        if src_cls is None:
            continue  # reported on the source node itself
        index = src_cls.output_index(out_name)
        if index is None:
            outs = [o.name for o in src_cls.OUTPUTS]
            add("bad_linked_input", name,
                f"link {raw!r}: {src_cls.NODE_ID} has no output {out_name!r} (outputs: {outs})")
            continue
        out_type = src_cls.OUTPUTS[index].type
        if out_type != port.type:
            add("return_type_mismatch", name, f"link {raw!r} carries {out_type} but input {name!r} takes {port.type}")
            continue
        links[name] = Link(name, src_id, out_name)
    for port in cls.INPUTS:
        if port.name in spec.links or (port.name in spec.params and not port.is_widget):
            continue  # linked, or already reported as a value given for a wire input
        if port.name in spec.params and port.is_widget:
            value, problems = check_value(port, spec.params[port.name], node_id, ct, graph.base_dir, check_files)
            issues.extend(problems)
            params[port.name] = value
        elif port.default is not REQUIRED:
            value = port.default
            if port.path and value:
                value, problems = check_value(port, value, node_id, ct, graph.base_dir, check_files)
                issues.extend(problems)
            params[port.name] = value
        elif port.optional:
            params[port.name] = None
        else:
            how = "set it in params" if port.is_widget else f"link a {port.type} output to it"
            add("required_input_missing", port.name, f"required input {port.name!r} is missing: {how}")
    if not issues:
        for field, message in [*cls.check_params(dict(params)), *cls.check_links(dict(params), frozenset(links))]:
            add("custom_validation_failed", field, message)
    return ResolvedNode(node_id, cls, params, links, spec.title), issues


def validate(graph: Graph, *, check_files: bool = True) -> ValidGraph:
    """Check everything; return the runnable graph or raise one :class:`GraphValidationError`.

    ``check_files=False`` checks a graph written for another machine (a cluster's model folders, prompt
    files): everything but the existence of the files it names."""
    issues: list[GraphIssue] = list(graph.load_issues)
    resolved: dict[str, ResolvedNode] = {}
    for node_id in graph.nodes:
        node, problems = _check_node(graph, node_id, check_files)
        issues.extend(problems)
        if node is not None:
            resolved[node_id] = node

    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    for node in resolved.values():
        for link in node.links.values():
            dag.add_edge(link.node, node.id)
    cycles = [] if nx.is_directed_acyclic_graph(dag) else list(nx.simple_cycles(dag))
    for cycle in cycles:
        path = " -> ".join(cycle + [cycle[0]])
        for node_id in sorted(cycle):
            ct = resolved[node_id].cls.NODE_ID if node_id in resolved else ""
            issues.append(GraphIssue("dependency_cycle", f"cycle: {path}", node=node_id, class_type=ct))
    outputs = [n for n, node in resolved.items() if node.cls.OUTPUT_NODE]
    if graph.nodes and not outputs and not any(i.type == "unknown_node_type" for i in issues):
        issues.append(
            GraphIssue(
                "prompt_no_outputs", "the graph has no output node (e.g. a grid, report or evaluator): nothing to run"
            )
        )
    if issues:
        raise GraphValidationError(issues, graph.source)

    needed: set[str] = set(outputs)
    for node_id in outputs:
        needed |= nx.ancestors(dag, node_id)
    position = {node_id: i for i, node_id in enumerate(graph.nodes)}
    order = list(nx.lexicographical_topological_sort(dag.subgraph(needed), key=lambda n: position[n]))
    return ValidGraph(graph=graph, nodes=resolved, dag=dag, order=order)
