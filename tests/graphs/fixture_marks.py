"""The bad-graph fixtures (tests/fixtures/graphs) and the marks their comment lines carry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "graphs"
BAD = sorted(FIXTURES.glob("*.yaml"))


def marked(path: Path, mark: str) -> set[tuple[str, str, str]]:
    """``# <mark>: [TYPE] node=ID field=NAME`` lines as (type, node, field); a quoted value is a Python literal
    (``node='two\\nlines'``)."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(rf"# {mark}: (?:(\w+)\s)?(.*)", line + " ")
        if m:
            fields = {k: ast.literal_eval(v) if v[0] in "'\"" else v
                      for k, v in re.findall(r"(\w+)=('(?:[^'\\]|\\.)*'|\S+)", m.group(2))}
            out.add((m.group(1) or "", fields.get("node", ""), fields.get("field", "")))
    return out
