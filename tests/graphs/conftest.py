import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT, Path(__file__).resolve().parent):  # runner.py; the helpers beside the tests
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
