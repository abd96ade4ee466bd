"""flowopd_core never imports the node layer, networkx, yaml or ComfyUI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "flowopd_core"
FORBIDDEN = {
    "networkx", "yaml", "comfy", "comfy_extras", "server", "folder_paths", "flowopd_nodes", "execution", "nodes"
}


def test_no_forbidden_import_statements():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_all_of_core_loads_no_node_or_comfy_module():
    code = (
        "import importlib, pkgutil, sys, flowopd_core\n"
        "for m in pkgutil.walk_packages(flowopd_core.__path__, 'flowopd_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in {'flowopd_nodes', 'comfy', 'networkx'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CORE.parent)
    assert out.stdout.strip() == ""
