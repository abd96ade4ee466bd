"""Prompt sets: prompts with a task tag (used by the task router) and a ground-truth spec (used by rewards).

A prompt file is either plain text (one prompt per line, ``#`` comments, optional ``task<TAB>prompt``) or
JSON Lines (``{"text": ..., "task": ..., "id": ..., "spec": {...}}`` per line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNTAGGED = ""  # task tag of a prompt that carries none (the router documents what happens to those)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt. ``spec`` is a JSON-able ground truth (objects, a word, ...), empty when unknown."""

    text: str
    task: str = UNTAGGED
    id: str = ""
    spec: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"prompt text must be a string, got {type(self.text).__name__}")
        if not self.id:
            digest = hashlib.sha1(f"{self.task}\x00{self.text}".encode()).hexdigest()[:10]
            object.__setattr__(self, "id", f"{self.task or 'prompt'}-{digest}")

    @property
    def category(self) -> str:
        """The prompt's category within its task (``spec["template"]``, e.g. compose's ``count``), "" if none:
        what the evaluator weighs equally and the GRPO trainer can balance."""
        return str(self.spec.get("template", ""))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "task": self.task, "spec": self.spec}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptSpec:
        return cls(text=data["text"], task=data.get("task", UNTAGGED), id=data.get("id", ""), spec=data.get("spec", {}))


@dataclass(frozen=True)
class PromptSet:
    """An ordered collection of prompts with a name (for reports)."""

    prompts: tuple[PromptSpec, ...]
    name: str = "prompts"

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[PromptSpec]:
        return iter(self.prompts)

    def __getitem__(self, index: int) -> PromptSpec:
        return self.prompts[index]

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def tasks(self) -> list[str]:
        """Distinct task tags in order of first appearance."""
        return list(dict.fromkeys(p.task for p in self.prompts))

    def by_task(self, task: str) -> PromptSet:
        return PromptSet(tuple(p for p in self.prompts if p.task == task), name=f"{self.name}/{task}")

    def head(self, n: int) -> PromptSet:
        return PromptSet(self.prompts[:n], name=self.name)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prompts": [p.to_json() for p in self.prompts]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptSet:
        return cls(tuple(PromptSpec.from_json(p) for p in data["prompts"]), name=data.get("name", "prompts"))


def load_prompt_file(path: str | Path, *, default_task: str = UNTAGGED, format: str = "auto") -> PromptSet:
    """Read a ``.txt`` or ``.jsonl`` prompt file (see module doc). Raises ``ValueError`` naming the line.

    ``format``: ``"auto"`` (by extension), ``"txt"`` or ``"jsonl"``.
    """
    path = Path(path)
    if format not in ("auto", "txt", "jsonl"):
        raise ValueError(f"unknown prompt file format {format!r}")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[PromptSpec] = []
    jsonl = format == "jsonl" or (format == "auto" and path.suffix.lower() in (".jsonl", ".ndjson"))
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if jsonl:
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict) or not isinstance(data.get("text"), str):
                raise ValueError(f'{path}:{number}: each line must be an object with a string "text"')
            data.setdefault("task", default_task)
            prompts.append(PromptSpec.from_json(data))
        elif "\t" in line:
            task, text = line.split("\t", 1)
            prompts.append(PromptSpec(text=text.strip(), task=task.strip()))
        else:
            prompts.append(PromptSpec(text=line, task=default_task))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return PromptSet(tuple(prompts), name=path.stem)


def write_prompt_file(prompts: PromptSet, path: str | Path) -> Path:
    """Write ``prompts`` as JSON Lines (the format :func:`load_prompt_file` reads back exactly)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as handle:
        for prompt in prompts:
            handle.write(json.dumps(prompt.to_json(), sort_keys=True) + "\n")
    return path
