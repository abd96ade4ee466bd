"""Small general-purpose nodes: seeds, prompt sets, image grids."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowopd_core.prompts import PromptSet, PromptSpec, load_prompt_file, write_prompt_file
from flowopd_nodes.engine import context
from flowopd_nodes.engine.ports import In, Node, Out

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**31 - 1


class Seed(Node):
    NODE_ID = "FlowOPDSeed"
    DISPLAY_NAME = "Seed"
    CATEGORY = "FlowOPD/config"
    DESCRIPTION = "One seed shared by several nodes, so a whole graph is re-seeded by changing one value."
    INPUTS = (In("seed", "INT", 0, "the seed", min=0, max=MAX_SEED),)
    OUTPUTS = (Out("seed", "INT", "the same seed, to link into other nodes' seed inputs"),)

    def run(self, seed: int) -> tuple[int]:
        return (seed,)


class PromptFile(Node):
    NODE_ID = "FlowOPDPromptFile"
    DISPLAY_NAME = "Prompt file"
    CATEGORY = "FlowOPD/data"
    DESCRIPTION = (
        "Loads a prompt set from a .txt file (one prompt per line, optional 'task<TAB>prompt') or a .jsonl file "
        '({"text", "task", "id", "spec"} per line).'
    )
    INPUTS = (
        In("path", "STRING", help="prompt file (.txt or .jsonl), relative to the graph file", path=True,
           must_exist=True),
        In("format", "COMBO", "auto", "file format: auto = by extension (.jsonl/.ndjson -> jsonl)",
           choices=("auto", "txt", "jsonl")),
        In("default_task", "STRING", "", "task tag for prompts that carry none"),
        In("limit", "INT", 0, "keep only the first N prompts (0 = all)", min=0, max=1_000_000),
        In("task", "STRING", "", "keep only the prompts of this task tag ('' = all), before the limit"),
    )
    OUTPUTS = (Out("prompts", "FLOWOPD_PROMPTS", "the prompt set"),)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        """The file is read at validation, so a malformed line or a task it lacks stops the graph before
        anything runs (a missing file is the path check's; with --no-file-check it is read where it runs)."""
        read = _read_prompt_file(params)
        return [read[1]] if read and read[1] else []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        read = _read_prompt_file(params)
        return {"prompts": {"tasks": read[0]}} if read and read[0] is not None else {}

    def run(self, path: str, format: str, default_task: str, limit: int, task: str) -> tuple[PromptSet]:
        return (_select(load_prompt_file(path, default_task=default_task, format=format), path, limit, task),)


def _select(prompts: PromptSet, path: str, limit: int, task: str) -> PromptSet:
    """The prompts of ``task`` ('' = all), then the first ``limit`` (0 = all); ValueError for a task not there."""
    if task:
        if task not in prompts.tasks:
            raise ValueError(f"no prompt of task {task!r} in {path} (tasks there: {list(prompts.tasks)})")
        prompts = prompts.by_task(task)
    return prompts.head(limit) if limit else prompts


def _read_prompt_file(params: dict[str, Any]) -> tuple[tuple[str, ...] | None, tuple[str, str] | None] | None:
    """What validation learns from a prompt file node's params: (the task tags of its prompts, None) or (None,
    (field, problem)); None when it cannot look (the path or another setting comes from a link, or the file is
    not there)."""
    names = ("path", "format", "default_task", "limit", "task")
    if any(name not in params for name in names) or not params["path"] or not Path(params["path"]).is_file():
        return None
    stat = Path(params["path"]).stat()
    return _read_cached(*(params[name] for name in names), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_cached(path: str, format: str, default_task: str, limit: int, task: str, _mtime: int,
                 _size: int) -> tuple[tuple[str, ...] | None, tuple[str, str] | None]:
    try:
        prompts = load_prompt_file(path, default_task=default_task, format=format)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return None, ("path", str(exc))
    try:
        return tuple(_select(prompts, path, limit, task).tasks), None
    except ValueError as exc:
        return None, ("task", str(exc))


class PromptText(Node):
    NODE_ID = "FlowOPDPromptText"
    DISPLAY_NAME = "Prompt list"
    CATEGORY = "FlowOPD/data"
    DESCRIPTION = "A prompt set typed in place: one prompt per line, all with the same task tag."
    INPUTS = (
        In("text", "STRING", "", "one prompt per line (blank lines are skipped)", multiline=True),
        In("task", "STRING", "", "task tag for every prompt (routes it to a teacher)"),
        In("name", "STRING", "prompts", "name shown in reports"),
    )
    OUTPUTS = (Out("prompts", "FLOWOPD_PROMPTS", "the prompt set"),)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        text = params.get("text")
        return [("text", "text holds no prompt")] if isinstance(text, str) and not text.strip() else []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {"prompts": {"tasks": (params["task"],)}} if isinstance(params.get("task"), str) else {}

    def run(self, text: str, task: str, name: str) -> tuple[PromptSet]:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError("text holds no prompt")
        return (PromptSet(tuple(PromptSpec(text=line, task=task) for line in lines), name=name),)


class ImageGrid(Node):
    NODE_ID = "FlowOPDImageGrid"
    DISPLAY_NAME = "Save image grid"
    CATEGORY = "FlowOPD/output"
    DESCRIPTION = "Writes images as one PNG grid (upscaled so small images are easy to see), captioned with prompts."
    OUTPUT_NODE = True
    INPUTS = (
        In("images", "IMAGE", help="images to lay out"),
        In("prompts", "FLOWOPD_PROMPTS", help="captions, one prompt per image (optional)", optional=True),
        In("filename", "STRING", "grid.png", "file name inside the node's artifact folder", artifact=".png"),
        In("columns", "INT", 0, "images per row (0 = near-square)", min=0, max=256),
        In("scale", "INT", 4, "nearest-neighbour upscale factor", min=1, max=32),
        In("title", "STRING", "", "title drawn above the grid"),
    )
    OUTPUTS = (Out("path", "FLOWOPD_FILE", "the PNG file"),)

    def run(
        self,
        images: torch.Tensor,
        filename: str,
        columns: int,
        scale: int,
        title: str,
        prompts: PromptSet | None = None,
    ) -> tuple[str]:
        if Path(filename).name != filename or not filename.endswith(".png"):
            raise ValueError(f"filename must be a plain .png file name, got {filename!r}")
        captions = prompts.texts if prompts is not None else None
        if captions is not None and len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} prompts")
        out = context.current().artifact_dir / filename
        from flowopd_core.images import from_comfy, save_grid

        save_grid(from_comfy(images), out, ncols=columns, scale=scale, captions=captions, title=title)
        return (str(out),)


class SavePrompts(Node):
    NODE_ID = "FlowOPDSavePrompts"
    DISPLAY_NAME = "Save prompt set"
    CATEGORY = "FlowOPD/output"
    DESCRIPTION = "Writes a prompt set as JSON Lines (readable by 'Prompt file') plus a per-task count summary."
    OUTPUT_NODE = True
    INPUTS = (
        In("prompts", "FLOWOPD_PROMPTS", help="the prompt set to write"),
        In("filename", "STRING", "prompts.jsonl", "file name inside the node's artifact folder", artifact=".jsonl"),
    )
    OUTPUTS = (Out("path", "FLOWOPD_FILE", "the .jsonl file"),)

    def run(self, prompts: PromptSet, filename: str) -> tuple[str]:
        if Path(filename).name != filename or not filename.endswith(".jsonl"):
            raise ValueError(f"filename must be a plain .jsonl file name, got {filename!r}")
        out = context.current().artifact_dir / filename
        write_prompt_file(prompts, out)
        return (str(out),)
