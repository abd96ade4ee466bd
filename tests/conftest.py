import json
import os
from pathlib import Path

import pytest

# No machine reaches a model hub: a wrong local path must fail fast instead of retrying the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


MINIWORLD = Path(__file__).resolve().parents[1] / "models" / "miniworld"


@pytest.fixture
def miniworld_with_index(tmp_path):
    """A factory: ``make(changes, folder="pipeline")`` -> a folder under ``tmp_path`` holding the shipped mini-world
    pipeline as symlinks, its ``model_index.json`` with the entries in ``changes`` replaced (tests of what a
    folder's index may name)."""

    def make(changes: dict, folder: str = "pipeline") -> Path:
        out = tmp_path / folder
        out.mkdir()
        for entry in MINIWORLD.iterdir():
            if entry.name != "model_index.json":
                (out / entry.name).symlink_to(entry)
        index = json.loads((MINIWORLD / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, **changes}))
        return out

    return make
