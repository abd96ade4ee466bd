"""Graph problems, collected and raised once, in the shape of ComfyUI's ``node_errors``."""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from typing import Any

# Every problem type the validator reports (ComfyUI's names where ComfyUI has one).
ISSUE_TYPES = (
    "invalid_yaml",  # the file cannot be read or parsed
    "unsafe_yaml",  # a YAML tag, anchor or alias: graph files carry plain data only
    "duplicate_key",  # the same key twice in one mapping
    "invalid_graph",  # wrong top-level structure (no `nodes`, wrong field types, unknown top-level key)
    "unsupported_schema_version",
    "unknown_node_type",  # `type` is not in the registry
    "unknown_input",  # a param or link names no input of the node
    "required_input_missing",
    "input_conflict",  # the same input both set as a param and linked
    "invalid_input_type",  # value of the wrong type (e.g. a string for an INT)
    "value_smaller_than_min",
    "value_bigger_than_max",
    "value_not_in_list",  # not one of a COMBO's choices
    "file_not_found",  # a path input that must exist does not
    "custom_validation_failed",  # a node's own check of its params (Node.check_params) failed
    "bad_linked_input",  # a malformed link, or a link to a missing node or output
    "return_type_mismatch",  # a link joins ports of different types
    "dependency_cycle",
    "prompt_no_outputs",  # no output node in the graph
    "bad_override",  # a --set override that names no node/input or is malformed
)


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a message quotes what it refuses without repeating a huge
    value (control characters and NUL bytes show escaped)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class GraphIssue:
    """One problem, located as precisely as possible (node id and field may be empty for file-level ones)."""

    type: str
    message: str
    node: str = ""
    field: str = ""
    class_type: str = ""
    details: str = ""

    def __post_init__(self) -> None:
        if self.type not in ISSUE_TYPES:
            raise ValueError(f"unknown issue type {self.type!r}")

    def __str__(self) -> str:
        where = []
        if self.node:
            where.append(f"node {self.node!r}" + (f" ({self.class_type})" if self.class_type else ""))
        if self.field:
            where.append(f"field {self.field!r}")
        prefix = ", ".join(where) or "graph"
        return f"{prefix}: [{self.type}] {self.message}"


@dataclass
class GraphValidationError(Exception):
    """All problems of one graph, sorted by node and field. ``str()`` is the readable report."""

    issues: list[GraphIssue]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.issues = sorted(self.issues, key=lambda i: (i.node, i.field, i.type, i.message))
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"{n} error{'s' if n != 1 else ''} in graph {self.source}".rstrip() + ":"
        return "\n".join([head] + [f"  - {issue}" for issue in self.issues])

    def node_errors(self) -> dict[str, dict[str, Any]]:
        """ComfyUI's ``node_errors`` shape: ``{node_id: {errors: [...], dependent_outputs, class_type}}``.

        File-level problems (no node) are filed under the key ``""``.
        """
        out: dict[str, dict[str, Any]] = {}
        for issue in self.issues:
            entry = out.setdefault(
                issue.node, {"errors": [], "dependent_outputs": [], "class_type": issue.class_type}
            )
            entry["errors"].append(
                {
                    "type": issue.type,
                    "message": issue.message,
                    "details": issue.details,
                    "extra_info": {"input_name": issue.field} if issue.field else {},
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "issues": [asdict(i) for i in self.issues]}


class NodeExecutionError(RuntimeError):
    """A node failed while running; names the node so the user knows where to look."""

    def __init__(self, node: str, class_type: str, cause: BaseException):
        self.node, self.class_type, self.cause = node, class_type, cause
        super().__init__(f"node {node!r} ({class_type}) failed: {type(cause).__name__}: {cause}")


class TrainingInterrupted(Exception):
    """A training node stopped on SIGTERM/SIGINT: ``signum``; ``checkpoint``: where its state is (None if it
    has none). Rerunning the same command resumes from the checkpoint."""

    def __init__(self, node: str, signum: int, epoch: int, checkpoint: str | None):
        self.node, self.signum, self.epoch, self.checkpoint = node, signum, epoch, checkpoint
        name = signal.Signals(signum).name
        where = f"its checkpoint is {checkpoint}" if checkpoint else "it has no checkpoint (it starts over)"
        super().__init__(f"{name}: node {node!r} stopped after {epoch} epochs; {where}; "
                         "rerun the same command to resume")
