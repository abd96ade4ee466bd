"""What every diagnostic script under ``bench/`` starts with: the checkout on the import path, the runner's thread
policy (set before torch loads), and an argument parser with the base model option.

    from _diagnostic import ROOT, diagnostic_parser  # bench/ is on the path of a script run from it
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the runner: idle threads sleep beside other work


def diagnostic_parser(doc: str, model_help: str = "base pipeline folder") -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--model`` (default: the shipped mini-world base)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "miniworld"), help=model_help)
    return parser
