"""The exported UI workflow reads on ComfyUI's canvas: no two nodes overlap (title bars included), nodes that
show images keep room below, and "Fit view" on a 1600 x 900 window gives a zoom at which the frontend still
draws node titles. Geometry is recomputed here from positions and sizes, independently of the layout code."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowopd_nodes.comfy import layout
from flowopd_nodes.comfy.format import to_workflow
from flowopd_nodes.engine.graph import load_graph_file
from flowopd_nodes.engine.validate import validate
from flowopd_nodes.nodes.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
GRAPHS = sorted((ROOT / "graphs").rglob("*.yaml"))
IDS = [str(p.relative_to(ROOT / "graphs")) for p in GRAPHS]

TITLE = 30  # LiteGraph's title bar, drawn above a node's pos
# ComfyUI frontend 1.27 in a 1600 x 900 window: the canvas is 1536 x 822; "Fit view" pads the nodes' bounds by
# 10 and fills 75 % of the canvas; below zoom 8/14 nodes are drawn without titles (checked in a real browser).
CANVAS = (1536, 822)
LEGIBLE = 8 / 14
MANY_WIDGETS = 12  # issue 19: nodes keep at most 12 widgets (the rest on collapsed settings nodes)


def boxes(wf: dict) -> dict[int, tuple[float, float, float, float]]:
    """(x, y, w, h) of each node on the canvas, title bar included. A collapsed node is its title bar, as wide as
    its title in the 12 px font plus 60, at most the node's width (the frontend's rule; text measured at 0.6 em
    a character, wider than Arial's letters)."""
    out = {}
    for n in wf["nodes"]:
        if (n.get("flags") or {}).get("collapsed"):
            width = min(n["size"][0], 0.6 * 12 * len(n["title"]) + 2 * TITLE)
            out[n["id"]] = (n["pos"][0], n["pos"][1] - TITLE, width, TITLE)
        else:
            out[n["id"]] = (n["pos"][0], n["pos"][1] - TITLE, n["size"][0], n["size"][1] + TITLE)
    return out


def overlapping(b: dict) -> list[tuple[int, int]]:
    items = list(b.items())
    return [
        (i, j)
        for k, (i, (ax, ay, aw, ah)) in enumerate(items)
        for j, (bx, by, bw, bh) in items[k + 1 :]
        if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
    ]


def fit_view_zoom(b: dict) -> float:
    x0 = min(x for x, _, _, _ in b.values())
    y0 = min(y for _, y, _, _ in b.values())
    w = max(x + bw for x, _, bw, _ in b.values()) - x0 + 20
    h = max(y + bh for _, y, _, bh in b.values()) - y0 + 20
    return 0.75 * min(CANVAS[0] / max(w, 300), CANVAS[1] / max(h, 300))


def export(path: Path) -> tuple[dict, object]:
    valid = validate(load_graph_file(path), check_files=False)
    return to_workflow(valid), valid


@pytest.mark.parametrize("graph", GRAPHS, ids=IDS)
def test_exported_workflow_reads_at_fit_view(graph):
    wf, valid = export(graph)
    b = boxes(wf)
    assert overlapping(b) == []
    assert all(x >= 0 and y >= 0 for x, y, _, _ in b.values())  # on the canvas, from the top-left margin
    # links run left to right, or down from a settings node stacked right above the node it feeds
    for _, src, _, dst, _, _ in wf["links"]:
        (sx, sy, sw, sh), (dx, dy, _, _) = b[src], b[dst]
        assert sx + sw < dx or (sx == dx and sy + sh <= dy), (src, dst)
    # nodes that show images after a run keep free room below them
    for n in wf["nodes"]:
        cls = REGISTRY[n["type"]]
        if cls.OUTPUT_NODE or any(o.type == "FLOWOPD_FILE" for o in cls.OUTPUTS):
            x, y, w, h = b[n["id"]]
            strip = {"room": (x, y + h, w, layout.PREVIEW_FLOOR)}
            assert overlapping({**{k: v for k, v in b.items() if k != n["id"]}, **strip}) == [], n["title"]
    zoom = fit_view_zoom(b)
    crowded = max(len(n["widgets_values"]) for n in wf["nodes"] if not n["flags"].get("collapsed")) > MANY_WIDGETS
    if zoom < LEGIBLE and crowded:
        pytest.xfail(f"zoom {zoom:.2f}: nodes with more than {MANY_WIDGETS} widgets do not fit the canvas")
    assert zoom >= LEGIBLE, f"fit view zoom {zoom:.3f} < {LEGIBLE:.3f}: titles are not drawn"
    assert layout.fit_zoom(*size_of(b)) == pytest.approx(zoom)  # the layout's own rule is the same


def size_of(b: dict) -> tuple[float, float]:
    return (max(x + w for x, _, w, _ in b.values()) - min(x for x, _, _, _ in b.values()),
            max(y + h for _, y, _, h in b.values()) - min(y for _, y, _, _ in b.values()))


# Sizes ComfyUI's frontend (1.27.10, in Chromium) gave these nodes when loaded with size [1, 1]: the export
# must be at least as big (else the canvas grows them over their neighbours) and not much taller.
MEASURED = {"FlowOPDMiniWorldPrompts": (210, 130), "FlowOPDLoadModel": (225, 178),
            "FlowOPDTeacherPool": (210, 198), "FlowOPDTaskRouter": (210, 82)}


def test_node_sizes_cover_what_the_frontend_draws():
    wf, _ = export(ROOT / "graphs" / "full_opd.yaml")
    seen = set()
    for n in wf["nodes"]:
        if n["type"] in MEASURED:
            width, height = MEASURED[n["type"]]
            assert width <= n["size"][0] <= width + 80 and height <= n["size"][1] <= height + 10, n["type"]
            seen.add(n["type"])
    assert seen == set(MEASURED)


def synthetic(count: int, height: float, settings: bool = False) -> tuple[list[dict], list[list]]:
    """One source feeding ``count`` tall nodes, which all feed one sink; with ``settings``, each tall node also
    has a collapsed settings node feeding it."""
    nodes = [{"id": 1, "title": "source", "size": [240, 80], "flags": {}}]
    links: list[list] = []
    for i in range(count):
        nodes.append({"id": 2 + i, "title": f"tall {i}", "size": [260, height], "flags": {}})
        links.append([len(links) + 1, 1, 0, 2 + i, 0, "T"])
        links.append([len(links) + 1, 2 + i, 0, 100, i, "T"])
        if settings:
            nodes.append({"id": 200 + i, "title": f"tall {i} settings", "size": [260, 300],
                          "flags": {"collapsed": True}})
            links.append([len(links) + 1, 200 + i, 0, 2 + i, 1, "S"])
    nodes.append({"id": 100, "title": "sink", "size": [240, 80 + 20 * count], "flags": {}})
    return nodes, links


def test_a_tall_column_wraps_into_sub_columns():
    nodes, links = synthetic(8, 330)
    layout.arrange(nodes, links)
    wf = {"nodes": nodes, "links": links}
    b = boxes(wf)
    assert overlapping(b) == []
    tall_x = sorted({b[i][0] for i in range(2, 10)})
    assert len(tall_x) >= 2  # wrapped: 8 x 360 does not fit 1,043 graph units of height
    assert b[1][0] + b[1][2] < tall_x[0] and tall_x[-1] + 260 < b[100][0]  # still left to right
    assert fit_view_zoom(b) >= LEGIBLE
    # one column of them (what a layout without wrapping gives) would not read: the check can fail
    for i, node in enumerate(n for n in nodes if 2 <= n["id"] < 10):
        node["pos"] = [400, 40 + TITLE + i * 370]
    assert fit_view_zoom(boxes(wf)) < 0.5


def test_settings_nodes_sit_right_above_the_node_they_feed():
    nodes, links = synthetic(4, 300, settings=True)
    layout.arrange(nodes, links)
    b = boxes({"nodes": nodes})
    assert overlapping(b) == []
    for i in range(4):
        (sx, sy, _, sh), (tx, ty, _, _) = b[200 + i], b[2 + i]
        assert sx == tx and 0 <= ty - (sy + sh) <= 20
    assert fit_view_zoom(b) >= LEGIBLE


def test_the_checks_catch_overlaps_and_crowding():
    b = {1: (0, 0, 100, 100), 2: (99, 99, 10, 10), 3: (200, 0, 10, 10)}
    assert overlapping(b) == [(1, 2)]
    assert fit_view_zoom({1: (0, 0, 4000, 100)}) < 0.5
    assert layout.fit_zoom(4000, 100) == pytest.approx(fit_view_zoom({1: (0, 0, 4000, 100)}))
