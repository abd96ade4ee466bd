"""Where the nodes of an exported UI workflow sit on ComfyUI's canvas (plain data; needs no ComfyUI).

Two parts:

- :func:`node_size`: about the size ComfyUI's frontend gives a node (its ``LGraphNode.computeSize``: title,
  one row per slot, one row per widget, multiline text boxes taller, width from the longest label or title).
  A node may be drawn bigger than this, never smaller: the frontend grows a loaded node to at least its own
  minimum. A collapsed node is drawn as its title bar only.
- :func:`place`: positions. Columns follow the depth of each node (links run left to right); a column taller
  than the canvas allows wraps into sub-columns; each column is ordered after its neighbours' order to cut
  link crossings; a collapsed source that feeds a single node (a settings node) sits right above that node.
  Of all the column heights tried, the layout kept is the one whose fit-to-view zoom is highest, so the whole
  graph reads at "fit view" on a 1600 x 900 window. Output nodes that show images after a run keep free room
  below them (the frontend grows them downwards); the room shrinks, down to a floor, when the graph would
  otherwise not fit.

Geometry is LiteGraph's: a node's ``pos`` is the top-left corner of its body and its title bar
(:data:`TITLE_HEIGHT`) sits above ``pos``, so a node's box is ``(x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT)``.
:func:`fit_zoom` is the frontend's "Fit view" (``createBounds`` pads the nodes' boxes by 10, ``fitToBounds``
fills 75 % of the canvas).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# LiteGraph's constants as ComfyUI's frontend (1.27) sets them.
TITLE_HEIGHT = 30
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 20
WIDGET_GAP = 4  # below each widget row
MULTILINE_HEIGHT = 100  # a multiline text box (the frontend's minimum is about 50; a little room to read)
TITLE_FONT, LABEL_FONT = 14, 12  # px; text measured as 0.6 em a character (the frontend's own fallback)
MIN_WIDTH, WIDGET_MIN_WIDTH, MAX_WIDTH = 140, 240, 480
WIDGET_PADDING = 42 + 2 * (15 + 6 + 10)  # minimum value width + margins and arrows on both sides

# The canvas: a 1600 x 900 browser window leaves ComfyUI's canvas 1536 x 822 (side bar and menu bar).
CANVAS_WIDTH, CANVAS_HEIGHT = 1536, 822
FIT_FILL, FIT_PADDING = 0.75, 10  # fitToBounds fills 75 % of the canvas; createBounds pads by 10
# Below this zoom the frontend draws nodes in low quality, without their titles (its default "level of detail"
# font size, 8 px, over the 14 px title font).
TITLE_ZOOM = 8 / 14

# ROW_GAP and ATTACHED_GAP leave room for the node-source badge the frontend draws above a node's title bar.
COLUMN_GAP, SUB_COLUMN_GAP, ROW_GAP, ATTACHED_GAP, MARGIN = 50, 24, 20, 18, 40
PREVIEW_ROOM, PREVIEW_FLOOR = 220, 70  # free height below a node that shows images after a run
MINIMAP = 230  # the frontend's minimap covers the canvas's bottom-right corner: the last column keeps clear of it


def text_width(text: str, font: int) -> float:
    return 0.6 * font * len(text)


def node_size(
    title: str,
    wires: Sequence[str],
    outputs: Sequence[str],
    widgets: Sequence[tuple[str, bool]],
) -> list[int]:
    """``[width, body height]`` of a node: ``wires`` and ``outputs`` are slot labels, ``widgets`` are
    ``(label, multiline)`` pairs. A collapsed node keeps this size (it opens to it); :func:`box_size` gives
    the box it takes on the canvas."""
    title_width = TITLE_HEIGHT + text_width(title, TITLE_FONT) + TITLE_HEIGHT * 0.33
    in_width = max((text_width(w, LABEL_FONT) for w in wires), default=0)
    out_width = max((text_width(o, LABEL_FONT) for o in outputs), default=0)
    slots_width = in_width + out_width + 2 * SLOT_HEIGHT + (5 if in_width and out_width else 0)
    widget_width = max((text_width(label, LABEL_FONT) for label, _ in widgets), default=0)
    if widgets:
        widget_width += WIDGET_PADDING
    width = max(slots_width, widget_width, title_width, WIDGET_MIN_WIDTH if widgets else MIN_WIDTH)
    rows = max(len(wires), len(outputs), 1)
    height = rows * SLOT_HEIGHT + 6
    if widgets:
        height += sum((MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT) + WIDGET_GAP for _, multiline in widgets) + 8
    return [int(round(min(width, MAX_WIDTH))), int(height)]


def box_size(size: Sequence[float], title: str, collapsed: bool) -> tuple[float, float]:
    """Width and full height (title bar included) a node takes on the canvas."""
    if collapsed:
        return min(size[0], text_width(title, LABEL_FONT) + 2 * TITLE_HEIGHT), TITLE_HEIGHT
    return size[0], size[1] + TITLE_HEIGHT


def fit_zoom(width: float, height: float, canvas: tuple[float, float] = (CANVAS_WIDTH, CANVAS_HEIGHT)) -> float:
    """The zoom ComfyUI's "Fit view" picks for nodes spanning ``width`` x ``height`` (title bars included)."""
    w, h = max(width + 2 * FIT_PADDING, 300), max(height + 2 * FIT_PADDING, 300)
    return FIT_FILL * min(canvas[0] / w, canvas[1] / h)


@dataclass(frozen=True)
class Item:
    """A node to place: its box (title bar included), whether it is collapsed, and the room its previews need."""

    id: object
    width: float
    height: float
    collapsed: bool = False
    preview: bool = False


@dataclass
class _Unit:
    """What a column holds: a node and the settings nodes stacked above it."""

    node: object
    members: list[object]  # top to bottom; the node last
    width: float
    height: float  # without preview room
    preview: bool


def _depths(ids: list[object], edges: list[tuple[object, object]]) -> dict[object, int]:
    """Longest path from a node without inputs (Kahn's order; a cycle is refused)."""
    targets: dict[object, list[object]] = {i: [] for i in ids}
    waiting = dict.fromkeys(ids, 0)
    for src, dst in edges:
        targets[src].append(dst)
        waiting[dst] += 1
    depth = dict.fromkeys(ids, 0)
    ready = [i for i in ids if waiting[i] == 0]
    while ready:
        node = ready.pop()
        for dst in targets[node]:
            depth[dst] = max(depth[dst], depth[node] + 1)
            waiting[dst] -= 1
            if waiting[dst] == 0:
                ready.append(dst)
    if any(waiting.values()):
        raise ValueError("the links form a cycle")
    return depth


def _units(items: dict[object, Item], edges: list[tuple[object, object]]) -> list[_Unit]:
    consumers: dict[object, set[object]] = {i: set() for i in items}
    fed: set[object] = set()
    for src, dst in edges:
        consumers[src].add(dst)
        fed.add(dst)
    def hostable(node_id: object) -> bool:  # a settings node: collapsed, no inputs, one consumer
        return items[node_id].collapsed and node_id not in fed and len(consumers[node_id]) == 1

    attached: dict[object, list[object]] = {}
    for node_id in items:
        if hostable(node_id):
            (target,) = consumers[node_id]
            if not hostable(target):
                attached.setdefault(target, []).append(node_id)
    hosted = {a for group in attached.values() for a in group}
    units = []
    for node_id, item in items.items():
        if node_id in hosted:
            continue
        above = attached.get(node_id, [])
        members = [*above, node_id]
        height = sum(items[m].height for m in members) + ATTACHED_GAP * len(above)
        width = max(items[m].width for m in members)
        units.append(_Unit(node_id, members, width, height, item.preview))
    return units


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default


def _order_columns(columns: list[list[_Unit]], sources: dict[object, list[object]],
                   targets: dict[object, list[object]]) -> None:
    """Reorder each column in place by the mean rank of its neighbours (a few down and up sweeps)."""
    rank: dict[object, float] = {}

    def note(col: list[_Unit]) -> None:
        rank.update((u.node, (i + 0.5) / len(col)) for i, u in enumerate(col))

    for col in columns:
        note(col)
    for _ in range(3):
        for sweep, near in ((range(1, len(columns)), sources), (range(len(columns) - 2, -1, -1), targets)):
            for c in sweep:
                current = {u.node: i for i, u in enumerate(columns[c])}
                columns[c].sort(key=lambda u, current=current, near=near: (
                    _mean([rank[n] for n in near[u.node]], rank[u.node]), current[u.node]))
                note(columns[c])


def _pack(columns: list[list[_Unit]], cap: float, room: float, sources: dict[object, list[object]],
          stack: bool) -> tuple[dict[object, tuple[float, float]], float, float]:
    """Top-left corners of each unit's box for sub-columns at most ``cap`` tall; with the width and height.
    Preview room is kept between a node and the next one down; below the lowest node of a sub-column a preview
    grows past the layout's bounds, over nothing. ``stack``: a column holding one node fed by the single node
    of the column before (a chain such as pool -> router -> cold start) goes below it, in the same column,
    while they fit ``cap``."""
    def after(u: _Unit) -> float:  # from the top of u to the top of the next unit down
        return u.height + (room if u.preview else 0) + ROW_GAP

    def span(sub: list[_Unit]) -> float:
        return sum(after(u) for u in sub[:-1]) + sub[-1].height

    slots: list[list[_Unit]] = []
    chain = False  # the last slot is a chain of one-node columns
    for col in columns:
        if stack and chain and len(col) == 1 and slots[-1][-1].node in sources[col[0].node] and (
                span(slots[-1]) - slots[-1][-1].height + after(slots[-1][-1]) + col[0].height <= cap):
            slots[-1].append(col[0])
            continue
        slots.append(list(col))
        chain = len(col) == 1
    stacks: list[list[list[_Unit]]] = []
    for col in slots:
        subs: list[list[_Unit]] = [[]]
        used = 0.0  # top of the next unit in the current sub-column
        for unit in col:
            if subs[-1] and used + unit.height > cap:
                subs.append([])
                used = 0.0
            subs[-1].append(unit)
            used += after(unit)
        stacks.append(subs)
    total_height = max((span(sub) for subs in stacks for sub in subs), default=0.0)
    corner: dict[object, tuple[float, float]] = {}
    x = 0.0
    for c, subs in enumerate(stacks):
        for s, sub in enumerate(subs):
            if s:
                x += SUB_COLUMN_GAP
            height = span(sub)
            near = [corner[n][1] for u in sub for n in sources[u.node] if n in corner]
            wanted = _mean(near, (total_height - height) / 2)
            lowest = total_height - height
            if c == len(stacks) - 1 and s == len(subs) - 1:
                lowest = max(lowest - MINIMAP, 0.0)
            y = min(max(wanted, 0.0), lowest)
            for unit in sub:
                corner[unit.node] = (x, y)
                y += after(unit)
            x += max(u.width for u in sub)
        x += COLUMN_GAP
    return corner, max(x - COLUMN_GAP, 0.0), total_height


def place(items: Iterable[Item], edges: Iterable[tuple[object, object]],
          canvas: tuple[float, float] = (CANVAS_WIDTH, CANVAS_HEIGHT)) -> dict[object, list[float]]:
    """``pos`` (top-left of the body, as LiteGraph stores it) of every item; ``edges`` are (source, target)
    pairs, several links between the same two nodes allowed."""
    by_id = {item.id: item for item in items}
    index = {node: i for i, node in enumerate(by_id)}
    pairs = sorted({(s, d) for s, d in edges}, key=lambda e: (index[e[0]], index[e[1]]))
    if not by_id:
        return {}
    units = _units(by_id, pairs)
    unit_of = {m: u.node for u in units for m in u.members}
    unit_edges = [(unit_of[s], unit_of[d]) for s, d in pairs if unit_of[s] != unit_of[d]]
    sources: dict[object, list[object]] = {u.node: [] for u in units}
    targets: dict[object, list[object]] = {u.node: [] for u in units}
    for s, d in unit_edges:
        sources[d].append(s)
        targets[s].append(d)
    depth = _depths([u.node for u in units], unit_edges)
    arrangements = []
    for early in (False, True):  # a node without inputs right before its first consumer's column, or in the first
        placed = dict(depth)
        for node, out in targets.items():
            if out and not sources[node]:
                placed[node] = 0 if early else min(depth[d] for d in out) - 1
        levels = {level: c for c, level in enumerate(sorted(set(placed.values())))}
        columns: list[list[_Unit]] = [[] for _ in levels]
        for unit in units:
            columns[levels[placed[unit.node]]].append(unit)
        _order_columns(columns, sources, targets)
        arrangements.append((not early, columns))

    tallest = max(u.height for u in units)
    total = sum(u.height + PREVIEW_ROOM + ROW_GAP for u in units)
    steps = 48 if len(units) <= 200 else 8 if len(units) <= 5000 else 2  # column heights tried
    caps = sorted({tallest, tallest + PREVIEW_ROOM} | {
        tallest + (total - tallest) * k / steps for k in range(steps + 1)})
    # The layout kept: titles drawn at fit view if at all possible, then the most room for previews, then
    # links left to right (no stacked chain), then sources beside their consumers, then the highest zoom.
    best: tuple | None = None
    room = PREVIEW_ROOM
    while True:
        for late, columns in arrangements:
            for stack in (False, True):
                for cap in caps:
                    corner, width, height = _pack(columns, max(cap, tallest), room, sources, stack)
                    zoom = fit_zoom(width, height, canvas)
                    score = (min(zoom, TITLE_ZOOM), room, not stack, late, zoom)
                    if best is None or score > best[:5]:
                        best = (*score, corner)
        if best[0] >= TITLE_ZOOM or room <= PREVIEW_FLOOR:
            break
        room = max(PREVIEW_FLOOR, room - 40)
    corner = best[5]
    pos: dict[object, list[float]] = {}
    for unit in units:
        x, y = corner[unit.node]
        for member in unit.members:
            item = by_id[member]
            pos[member] = [float(round(MARGIN + x)), float(round(MARGIN + y + TITLE_HEIGHT))]
            y += item.height + ATTACHED_GAP
    return pos


def arrange(nodes: list[dict], links: Sequence[Sequence[object]], previews: Iterable[object] = (),
            canvas: tuple[float, float] = (CANVAS_WIDTH, CANVAS_HEIGHT)) -> None:
    """Set ``pos`` of every node of a UI workflow (``nodes`` with ``id``, ``size``, ``title``, ``flags``;
    ``links`` as ``[link id, source, slot, target, slot, type]``); ``previews``: ids of nodes that show
    images after a run."""
    shows = set(previews)
    items = []
    for node in nodes:
        collapsed = bool((node.get("flags") or {}).get("collapsed"))
        width, height = box_size(node["size"], str(node.get("title", "")), collapsed)
        items.append(Item(node["id"], width, height, collapsed, node["id"] in shows and not collapsed))
    pos = place(items, [(link[1], link[3]) for link in links], canvas)
    for node in nodes:
        node["pos"] = pos[node["id"]]


def boxes(nodes: Iterable[dict]) -> list[tuple[float, float, float, float]]:
    """``(x, y, w, h)`` of every node's box on the canvas, title bar included."""
    out = []
    for node in nodes:
        collapsed = bool((node.get("flags") or {}).get("collapsed"))
        width, height = box_size(node["size"], str(node.get("title", "")), collapsed)
        out.append((node["pos"][0], node["pos"][1] - TITLE_HEIGHT, width, height))
    return out
