"""The small general-purpose nodes do their real job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowopd_core.images import from_comfy, to_comfy
from flowopd_core.prompts import PromptSet, PromptSpec, load_prompt_file
from flowopd_nodes.engine import context
from flowopd_nodes.nodes.basic import ImageGrid, PromptFile, PromptText, SavePrompts


@pytest.fixture
def ctx(tmp_path):
    with context.use(context.NodeContext("n", tmp_path, tmp_path)) as c:
        yield c


def test_image_grid_writes_png_with_every_tile(ctx):
    images = torch.zeros(3, 3, 8, 8)
    images[0, 0] = 1.0  # red
    images[1, 1] = 1.0  # green
    images[2, 2] = 1.0  # blue
    prompts = PromptSet(tuple(PromptSpec(t) for t in ["red", "green", "blue"]))
    (path,) = ImageGrid().run(to_comfy(images), "g.png", 3, 2, "", prompts)
    grid = np.asarray(Image.open(path).convert("RGB"))
    # The first pixel of each upscaled tile has the tile's colour.
    assert tuple(grid[2, 2]) == (255, 0, 0)
    assert tuple(grid[2, 2 + 16 + 2]) == (0, 255, 0)
    assert tuple(grid[2, 2 + 2 * 18]) == (0, 0, 255)


def test_image_grid_rejects_caption_count_mismatch(ctx):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ImageGrid().run(torch.zeros(2, 8, 8, 3), "g.png", 0, 1, "", PromptSet((PromptSpec("x"),)))


def test_comfy_layout_round_trip():
    images = torch.rand(2, 3, 5, 7)
    assert to_comfy(images).shape == (2, 5, 7, 3)
    assert torch.equal(from_comfy(to_comfy(images)), images)


def test_prompt_text_and_save_round_trip(ctx, tmp_path):
    (prompts,) = PromptText().run("two red circles\n\n a blue square \n", "compose", "mine")
    assert prompts.texts == ["two red circles", "a blue square"] and prompts.tasks == ["compose"]
    (path,) = SavePrompts().run(prompts, "p.jsonl")
    again = load_prompt_file(path)
    assert again.prompts == prompts.prompts
    assert json.loads(open(path).readline())["task"] == "compose"


def test_prompt_file_txt_with_tasks_and_limit(ctx, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\ncompose\ttwo red circles\ntext\tthe word GO\nplain prompt\n")
    (prompts,) = PromptFile().run(str(f), "auto", "quality", 0, "")
    assert [(p.task, p.text) for p in prompts] == [
        ("compose", "two red circles"),
        ("text", "the word GO"),
        ("quality", "plain prompt"),
    ]
    (two,) = PromptFile().run(str(f), "auto", "", 2, "")
    assert len(two) == 2
    (text,) = PromptFile().run(str(f), "auto", "quality", 0, "text")  # task filter
    assert [p.text for p in text] == ["the word GO"]
    with pytest.raises(ValueError, match="no prompt of task 'ocr'"):
        PromptFile().run(str(f), "auto", "", 0, "ocr")


def test_prompt_ids_are_stable():
    assert PromptSpec("a cat", "compose").id == PromptSpec("a cat", "compose").id
    assert PromptSpec("a cat", "compose").id != PromptSpec("a cat", "text").id
