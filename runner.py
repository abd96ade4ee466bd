#!/usr/bin/env python3
"""flowopd's headless runner, kept at the repository root so that ``python runner.py GRAPH.yaml`` works from a
checkout. The same as the ``flowopd`` command that ``pip install -e .`` installs; see :mod:`flowopd_nodes.cli`.
"""

from flowopd_nodes.cli import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
