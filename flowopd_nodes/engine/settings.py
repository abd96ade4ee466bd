"""Settings companions in graphs: a node's advanced params written flat <-> a settings node wired into it.

A node with a settings companion (``SETTINGS``, e.g. the Flow-GRPO trainer and ``FlowOPDGRPOSettings``) shows a
few widgets itself; the rest are widgets of the companion, whose value reaches the node through its optional
``settings`` input. Graph files stay flat: a node's ``params`` (and ``links``) may name the companion's fields as
if they were the node's own.

- :func:`expand_settings` (run by validation, so for YAML, ``--set`` and ComfyUI JSON alike) moves those into
  a settings node made for the node, ``<node id>_settings``, placed just before it and linked to its
  ``settings``. Problems found in them are reported on the user's node and field, never on the made node.
  Flat settings on a node whose ``settings`` is also linked is one ``input_conflict``.
- :func:`fold_settings` (run by the ComfyUI import) does the opposite: a settings node that feeds exactly one
  node becomes that node's flat params again, so YAML -> ComfyUI JSON -> YAML reads like the original. A
  settings node that feeds several nodes stays a node.

A settings node's output is a pure function of its values (:attr:`Node.PURE`): the scheduler fingerprints it by
its cache key alone, so flat settings and the same values on an explicit settings node give the same cache keys.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from flowopd_nodes.engine.errors import GraphIssue
from flowopd_nodes.engine.graph import Graph, NodeSpec, parse_link
from flowopd_nodes.engine.ports import SETTINGS_INPUT, SettingsNode
from flowopd_nodes.nodes.registry import REGISTRY

SUFFIX = "_settings"
MAX_ID = 64  # the node id rule's length limit


def _made_id(owner: str, taken: set[str]) -> str:
    base = owner[: MAX_ID - len(SUFFIX) - 3] + SUFFIX
    node_id, i = base, 2
    while node_id in taken:
        node_id, i = f"{base}_{i}", i + 1
    taken.add(node_id)
    return node_id


def expand_settings(graph: Graph) -> tuple[Graph, dict[str, str], list[GraphIssue]]:
    """``graph`` as it runs: each node's flat settings moved into a settings node of their own.

    Returns the expanded graph (a copy; ``graph`` is left as written), made settings node id -> the id of the
    node it was made for, and the problems found (flat settings on a node whose ``settings`` is linked).
    """
    nodes: dict[str, NodeSpec] = {}
    owners: dict[str, str] = {}
    issues: list[GraphIssue] = []
    taken = set(graph.nodes)
    for node_id, spec in graph.nodes.items():
        cls = REGISTRY.get(spec.type)
        companion = cls.SETTINGS if cls is not None else None
        if companion is None:
            nodes[node_id] = spec
            continue
        flat = [n for n in spec.params if companion.input(n) is not None and cls.input(n) is None]
        wired = [n for n in spec.links if companion.input(n) is not None and cls.input(n) is None]
        if not flat and not wired:
            nodes[node_id] = spec
            continue
        params = {k: v for k, v in spec.params.items() if k not in flat}
        links = {k: v for k, v in spec.links.items() if k not in wired}
        if SETTINGS_INPUT in spec.links or SETTINGS_INPUT in spec.params:
            names = ", ".join(repr(n) for n in [*flat, *wired])
            issues.append(GraphIssue(
                "input_conflict",
                f"{names} {'is a setting' if len(flat) + len(wired) == 1 else 'are settings'} of "
                f"{companion.NODE_ID} and input {SETTINGS_INPUT!r} is linked too: set "
                f"{'it' if len(flat) + len(wired) == 1 else 'them'} on the linked settings node, or unlink "
                f"{SETTINGS_INPUT!r}", node=node_id, field=SETTINGS_INPUT, class_type=cls.NODE_ID,
            ))
            nodes[node_id] = replace(spec, params=params, links=links)
            continue
        made = _made_id(node_id, taken)
        nodes[made] = NodeSpec(made, companion.NODE_ID, params={k: spec.params[k] for k in flat},
                               links={k: spec.links[k] for k in wired})
        owners[made] = node_id
        nodes[node_id] = replace(spec, params=params, links={**links, SETTINGS_INPUT: f"{made}.settings"})
    expanded = replace(graph, nodes=nodes, load_issues=list(graph.load_issues))
    return expanded, owners, issues


def as_owner(issue: GraphIssue, owner: str, graph: Graph) -> GraphIssue:
    """A problem of a made settings node, told on the node it was made for (whose file sets the field)."""
    cls = REGISTRY.get(graph.nodes[owner].type)
    return replace(issue, node=owner, class_type=cls.NODE_ID if cls is not None else issue.class_type)


def is_settings_type(node_type: str) -> bool:
    cls = REGISTRY.get(node_type)
    return cls is not None and issubclass(cls, SettingsNode)


def fold_settings(graph: Graph) -> Graph:
    """``graph`` with each settings node that feeds exactly one node (on that node's ``settings``, which it is the
    companion of, and that sets none of the same fields) folded into that node's flat params and links."""
    graph = replace(graph, nodes=copy.deepcopy(graph.nodes))
    consumers: dict[str, list[tuple[str, str]]] = {}
    for node_id, spec in graph.nodes.items():
        for name, raw in spec.links.items():
            parsed = parse_link(raw)
            if parsed is not None:
                consumers.setdefault(parsed[0], []).append((node_id, name))
    for settings_id in [n for n, spec in graph.nodes.items() if is_settings_type(spec.type)]:
        spec = graph.nodes[settings_id]
        uses = consumers.get(settings_id, [])
        if len(uses) != 1 or uses[0][1] != SETTINGS_INPUT:
            continue
        owner = graph.nodes[uses[0][0]]
        owner_cls = REGISTRY.get(owner.type)
        if owner_cls is None or owner_cls.SETTINGS is not REGISTRY[spec.type]:
            continue
        fields = set(spec.params) | set(spec.links)
        if fields & (set(owner.params) | set(owner.links)):
            continue
        del owner.links[SETTINGS_INPUT]
        owner.params.update(spec.params)
        owner.links.update(spec.links)
        del graph.nodes[settings_id]
    return graph
