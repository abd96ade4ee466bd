"""The node contract: typed ports declared once, ComfyUI's V1 attributes derived from them.

A node class lists its inputs (:class:`In`) and outputs (:class:`Out`); ``__init_subclass__`` turns those into
``INPUT_TYPES`` / ``RETURN_TYPES`` / ``RETURN_NAMES`` / ``FUNCTION`` / ``CATEGORY`` / ``OUTPUT_NODE`` /
``DESCRIPTION`` so the very same class loads unchanged in ComfyUI and in our runner, and the runner's
validation reads the same declaration (they can never drift).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

# Primitive (widget) types, as ComfyUI names them. COMBO is a list of strings in INPUT_TYPES.
PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CUSTOM_PREFIX = "FLOWOPD_"
NODE_PREFIX = "FlowOPD"
ROOT_CATEGORY = "FlowOPD"
SETTINGS_CATEGORY = "FlowOPD/settings"
SETTINGS_INPUT = "settings"
"""The input through which a node with a settings companion (``SETTINGS``) takes its advanced values."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class In:
    """One typed input port.

    ``type`` is a primitive (``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, ``COMBO``) or a wire type
    (``FLOWOPD_*`` or ComfyUI's ``IMAGE``). Primitive inputs are widgets: set in the graph's ``params``
    (or linked from another node's output of the same type). Wire inputs are always links.
    """

    name: str
    type: str
    default: Any = REQUIRED
    help: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    multiline: bool = False
    optional: bool = False
    path: bool = False  # STRING holding a file-system path: resolved against the graph file's folder
    must_exist: bool = False  # with path=True: the path must exist before anything runs
    folder: bool | None = False  # with path=True: the path names a folder (else a file; None: either); checked
    # when it exists
    artifact: str = ""  # STRING naming a file the node writes in its own artifact folder, with this suffix:
    # a plain file name (no folder part) of safe characters ending in e.g. ".png"

    @property
    def is_widget(self) -> bool:
        return self.type in PRIMITIVES

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.optional

    def comfy_spec(self) -> tuple:
        """This port as a ComfyUI V1 ``INPUT_TYPES`` entry: ``(TYPE, {options})``."""
        opts: dict[str, Any] = {}
        if self.default is not REQUIRED and self.default is not None:
            opts["default"] = self.default
        if self.help:
            opts["tooltip"] = self.help
        for key in ("min", "max", "step"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.type == "STRING" and self.multiline:
            opts["multiline"] = True
        if self.type == "COMBO":
            return (list(self.choices), opts)
        return (self.type, opts)


@dataclass(frozen=True)
class Out:
    """One typed output port."""

    name: str
    type: str
    help: str = ""


class Node:
    """Base class of every FlowOPD node.

    Subclasses set ``NODE_ID`` (prefixed ``FlowOPD``), ``DISPLAY_NAME``, ``CATEGORY`` (under ``FlowOPD``),
    ``DESCRIPTION``, ``INPUTS``, ``OUTPUTS``, optionally ``OUTPUT_NODE = True`` and ``VERSION`` (bump it when
    the node's behaviour changes so cached results are recomputed), and implement ``run(**inputs)`` returning
    a tuple in ``OUTPUTS`` order. ``run`` calls into ``flowopd_core``; no tensor math lives in a node.
    """

    NODE_ID: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str] = ""
    CATEGORY: ClassVar[str] = ROOT_CATEGORY
    DESCRIPTION: ClassVar[str] = ""
    INPUTS: ClassVar[tuple[In, ...]] = ()
    OUTPUTS: ClassVar[tuple[Out, ...]] = ()
    OUTPUT_NODE: ClassVar[bool] = False
    DISTRIBUTED: ClassVar[bool] = False
    """True: under a multi-process launch every process runs the node together (data-parallel training);
    False: process 0 runs it alone and the others read its outputs."""
    VERSION: ClassVar[int] = 1
    SETTINGS: ClassVar[type[SettingsNode] | None] = None
    """The node's settings companion: a :class:`SettingsNode` whose widgets are the node's advanced inputs. Its
    value arrives on the optional input ``settings``; a graph file may also set those fields as the node's own
    params (validation moves them into a settings node: :mod:`flowopd_nodes.engine.settings`)."""
    LEGACY_WIDGETS: ClassVar[tuple[str, ...]] = ()
    """The node's widget order before its settings moved to a companion: a UI workflow saved then (its
    ``widgets_values`` by position) still imports (:mod:`flowopd_nodes.comfy.format`)."""
    PURE: ClassVar[bool] = False
    """True: the outputs are a pure function of the params (a settings node), so the scheduler fingerprints them
    by the cache key alone and the same values give the same downstream keys wherever they come from."""
    FUNCTION: ClassVar[str] = "run"
    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...]] = ()
    OUTPUT_TOOLTIPS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.RETURN_TYPES = tuple(o.type for o in cls.OUTPUTS)
        cls.RETURN_NAMES = tuple(o.name for o in cls.OUTPUTS)
        cls.OUTPUT_TOOLTIPS = tuple(o.help for o in cls.OUTPUTS)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:  # noqa: N802 (ComfyUI's name)
        # A widget with a default is still "required" for ComfyUI: it always carries a value.
        required = {p.name: p.comfy_spec() for p in cls.INPUTS if not p.optional}
        optional = {p.name: p.comfy_spec() for p in cls.INPUTS if p.optional}
        spec: dict[str, dict[str, tuple]] = {"required": required}
        if optional:
            spec["optional"] = optional
        return spec

    @classmethod
    def input(cls, name: str) -> In | None:
        for port in cls.INPUTS:
            if port.name == name:
                return port
        return None

    @classmethod
    def port(cls, name: str) -> In | None:
        """The input ``name`` of this node, else the field ``name`` of its settings companion."""
        port = cls.input(name)
        if port is None and cls.SETTINGS is not None:
            port = cls.SETTINGS.input(name)
        return port

    @classmethod
    def output_index(cls, name: str) -> int | None:
        for i, port in enumerate(cls.OUTPUTS):
            if port.name == name:
                return i
        return None

    @classmethod
    def code_version(cls) -> str:
        """Fingerprint of the node's code for cache keys: its VERSION and the source of its class."""
        return _code_version(cls)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> list[tuple[str, str]]:
        """Cross-field or format checks on widget values, run at validation time before anything executes.

        ``params`` holds every widget value (defaults filled in); return ``(field, message)`` per problem.
        """
        return []

    @classmethod
    def check_links(cls, params: dict[str, Any], linked: frozenset[str]) -> list[tuple[str, str]]:
        """Checks that need to know which wire inputs are connected (``linked``: their names), e.g. one task
        name per connected numbered slot. Runs at validation time after :meth:`check_params`."""
        return []

    @classmethod
    def output_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """What validation can tell of this node's outputs from its params alone (output name -> facts, e.g. a
        teacher pool's task names), given the facts of its linked inputs (``inputs``: input name -> facts).
        Downstream nodes read them in :meth:`check_facts`. A widget that is linked is absent from ``params``.
        Default: a node with a non-empty ``label`` param tells it on its ``FLOWOPD_MODEL`` outputs (the name the
        model has in reports)."""
        label = params.get("label")
        if not isinstance(label, str) or not label:
            return {}
        return {out.name: {"label": label} for out in cls.OUTPUTS if out.type == "FLOWOPD_MODEL"}

    @classmethod
    def check_facts(cls, params: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """Checks against the facts of the linked inputs (see :meth:`output_facts`; ``inputs`` has every linked
        input, ``{}`` when its source tells nothing): at validation time on what the upstream nodes' params tell (a
        graph file), and in ComfyUI when the node is called, on what its linked values tell (each wire type's
        ``facts``, :mod:`flowopd_nodes.engine.types`)."""
        return []

    def run(self, **inputs: Any) -> tuple:
        raise NotImplementedError


class SettingsNode(Node):
    """A settings companion: the advanced inputs of one node (its ``SETTINGS``), as widgets of their own, so the
    node itself stays small on the canvas. Subclasses set ``NODE_ID``, ``DISPLAY_NAME``, ``DESCRIPTION``,
    ``INPUTS`` (the very ``In`` objects the owner had: same ranges, choices and help) and one output of a
    ``FLOWOPD_*_SETTINGS`` type. The output is the values by name, which the owner's host spreads over its own
    inputs (:func:`merge_settings`)."""

    CATEGORY: ClassVar[str] = SETTINGS_CATEGORY
    PURE: ClassVar[bool] = True

    def run(self, **values: Any) -> tuple[dict[str, Any]]:
        return (dict(values),)


def settings_input(companion: type[SettingsNode]) -> In:
    """The optional ``settings`` input of a node whose companion is ``companion``."""
    return In(SETTINGS_INPUT, companion.OUTPUTS[0].type, optional=True,
              help=f"advanced settings from a '{companion.DISPLAY_NAME}' node; unlinked: its defaults")


def split_ports(ports: tuple[In, ...], keep: tuple[str, ...]) -> tuple[tuple[In, ...], tuple[In, ...]]:
    """``ports`` split into those named in ``keep`` and the rest (for a settings companion), order kept."""
    unknown = set(keep) - {p.name for p in ports}
    if unknown:
        raise ValueError(f"no ports {sorted(unknown)} to keep")
    return tuple(p for p in ports if p.name in keep), tuple(p for p in ports if p.name not in keep)


def legacy_widgets(ports: tuple[In, ...], added_since: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A node's ``LEGACY_WIDGETS``: the names of its widget ports in order, less ``added_since`` (ports added
    after its settings moved to a companion, absent from workflows saved before)."""
    unknown = set(added_since) - {p.name for p in ports}
    if unknown:
        raise ValueError(f"no ports {sorted(unknown)} among the widgets")
    return tuple(p.name for p in ports if p.name not in added_since)


def all_ports(cls: type[Node]) -> tuple[In, ...]:
    """The node's inputs, then its settings companion's (the fields a graph file may set on the node)."""
    return cls.INPUTS + (cls.SETTINGS.INPUTS if cls.SETTINGS is not None else ())


def merge_settings(cls: type[Node], values: dict[str, Any], *, fill: bool = True) -> dict[str, Any]:
    """A call's inputs with the ``settings`` value spread over them: the companion's defaults (``fill``), then
    the settings value (name -> value), then the node's own inputs. ``settings`` itself is left out, so ``run``
    and the node's checks see every field by name, as if the node had them all."""
    companion = cls.SETTINGS
    if companion is None:
        return dict(values)
    merged: dict[str, Any] = {}
    if fill:
        merged.update((p.name, p.default) for p in companion.INPUTS if p.default is not REQUIRED)
    given = values.get(SETTINGS_INPUT)
    if isinstance(given, dict):
        merged.update((k, v) for k, v in given.items() if companion.input(k) is not None)
    merged.update((k, v) for k, v in values.items() if k != SETTINGS_INPUT)
    return merged


def require(params: dict[str, Any], names: Any) -> None:
    """KeyError for the first of ``names`` absent from ``params``: a value that comes by link (a linked widget, a
    linked settings node on the canvas) is not known at validation, so a check that needs it waits for the node's
    start (see :func:`flowopd_nodes.engine.validate.node_problems`)."""
    for name in names:
        if name not in params:
            raise KeyError(name)


@functools.cache
def _code_version(cls: type) -> str:
    """VERSION + the class's source + the source of every ``flowopd_core`` module its module imports
    (transitively): editing the core code a node runs re-executes that node, nothing else."""
    digest = hashlib.sha256()
    try:
        digest.update(inspect.getsource(cls).encode())
    except (OSError, TypeError):
        digest.update(cls.__qualname__.encode())
    for name in sorted(core_closure(cls.__module__)):
        digest.update(name.encode() + b"\0" + _module_source(name))
    return f"{cls.VERSION}:{digest.hexdigest()[:16]}"


@functools.cache
def _module_source(name: str) -> bytes:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return b""
    with open(spec.origin, "rb") as handle:
        return handle.read()


def core_closure(module: str) -> set[str]:
    """``flowopd_core`` modules imported by ``module``, transitively (read from the source, nothing run)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        source = _module_source(todo.pop())
        if not source:
            continue
        for node in ast.walk(ast.parse(source)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] == "flowopd_core" and name not in seen and _is_module(name):
                    seen.add(name)
                    todo.append(name)
    return seen


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def contract_problems(cls: type[Node]) -> list[str]:
    """Every way ``cls`` breaks the node contract (empty = fine). Used by the registry and its test."""
    problems: list[str] = []
    if not cls.NODE_ID.startswith(NODE_PREFIX):
        problems.append(f"NODE_ID {cls.NODE_ID!r} must start with {NODE_PREFIX!r}")
    if not cls.CATEGORY.startswith(ROOT_CATEGORY):
        problems.append(f"CATEGORY {cls.CATEGORY!r} must be under {ROOT_CATEGORY!r}")
    if not cls.DESCRIPTION:
        problems.append("DESCRIPTION is empty")
    if not cls.OUTPUTS and not cls.OUTPUT_NODE:
        problems.append("a node with no outputs must be an OUTPUT_NODE")
    names = [p.name for p in cls.INPUTS]
    if len(set(names)) != len(names):
        problems.append(f"duplicate input names {names}")
    out_names = [o.name for o in cls.OUTPUTS]
    if len(set(out_names)) != len(out_names):
        problems.append(f"duplicate output names {out_names}")
    if cls.FUNCTION != "run" or cls.run is Node.run:
        problems.append("must implement run()")
    problems += _settings_problems(cls)
    for port in cls.INPUTS:
        where = f"input {port.name!r}"
        if not port.help:
            problems.append(f"{where} has no help")
        if port.type not in PRIMITIVES and not port.type.startswith(CUSTOM_PREFIX) and port.type != "IMAGE":
            problems.append(f"{where}: custom wire types must start with {CUSTOM_PREFIX}, got {port.type!r}")
        if port.type == "COMBO" and not port.choices:
            problems.append(f"{where}: COMBO needs choices")
        if port.type == "COMBO" and port.default is not REQUIRED and port.default not in port.choices:
            problems.append(f"{where}: default {port.default!r} not in choices")
        if not port.is_widget and port.default is not REQUIRED and port.default is not None:
            problems.append(f"{where}: wire inputs cannot have a default value")
        if port.path and port.type != "STRING":
            problems.append(f"{where}: path=True needs type STRING")
        if (port.must_exist or port.folder) and not port.path:
            problems.append(f"{where}: must_exist and folder need path=True")
        if port.artifact and (port.type != "STRING" or port.path or not port.artifact.startswith(".")):
            problems.append(f"{where}: artifact needs type STRING, no path=True and a suffix such as '.png'")
        if port.choices and port.type != "COMBO":
            problems.append(f"{where}: a port with choices must be a COMBO (a dropdown, checked at validation)")
    for out in cls.OUTPUTS:
        if out.type not in PRIMITIVES and not out.type.startswith(CUSTOM_PREFIX) and out.type != "IMAGE":
            problems.append(f"output {out.name!r}: custom wire types must start with {CUSTOM_PREFIX}")
        if not out.help:
            problems.append(f"output {out.name!r} has no help")
    signature = inspect.signature(cls.run)
    params = [p for p in signature.parameters.values() if p.name != "self"]
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if not accepts_kwargs:
        missing = set(names) - {p.name for p in params}
        if missing:
            problems.append(f"run() lacks parameters for inputs {sorted(missing)}")
    return problems


def _settings_problems(cls: type[Node]) -> list[str]:
    """The rules of settings companions: a settings node has widgets only and one ``FLOWOPD_*_SETTINGS`` output;
    a node with ``SETTINGS`` takes it on an optional input ``settings`` and shares no field name with it."""
    problems: list[str] = []
    if issubclass(cls, SettingsNode):
        if cls.CATEGORY != SETTINGS_CATEGORY:
            problems.append(f"a settings node belongs in {SETTINGS_CATEGORY!r}")
        if len(cls.OUTPUTS) != 1 or not cls.OUTPUTS[0].type.endswith("_SETTINGS"):
            problems.append("a settings node has one output, of a FLOWOPD_*_SETTINGS type")
        if any(not p.is_widget for p in cls.INPUTS):
            problems.append("a settings node takes widgets only")
        if cls.SETTINGS is not None:
            problems.append("a settings node has no settings companion itself")
    companion = cls.SETTINGS
    if companion is None:
        if cls.input(SETTINGS_INPUT) is not None and not issubclass(cls, SettingsNode):
            problems.append(f"input {SETTINGS_INPUT!r} is reserved for nodes with a SETTINGS companion")
        return problems
    if not (isinstance(companion, type) and issubclass(companion, SettingsNode)):
        problems.append("SETTINGS must be a SettingsNode subclass")
        return problems
    port = cls.input(SETTINGS_INPUT)
    if port is None or not port.optional or port.type != companion.OUTPUTS[0].type:
        problems.append(f"SETTINGS needs an optional input {SETTINGS_INPUT!r} of type {companion.OUTPUTS[0].type} "
                        "(settings_input)")
    shared = {p.name for p in cls.INPUTS} & {p.name for p in companion.INPUTS}
    if shared:
        problems.append(f"inputs {sorted(shared)} are also fields of {companion.NODE_ID}")
    return problems


_ANNOTATION_TYPES = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING"}


def config_inputs(config_cls: type, *, skip: tuple[str, ...] = (), **limits: dict[str, Any]) -> tuple[In, ...]:
    """Input ports mirroring a frozen config dataclass one to one (name, type, default, help).

    Field metadata may carry ``help``, ``min``, ``max``, ``above`` (an exclusive minimum, shown as the port's
    minimum), ``step`` and ``choices``; ``limits`` adds or overrides
    them per field (``steps={"min": 1, "max": 10**6}``). Fields whose type is not a plain int/float/bool/str
    must be listed in ``skip``.
    """
    import dataclasses

    ports: list[In] = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        meta = {**dict(f.metadata), **limits.get(f.name, {})}
        kind = "COMBO" if meta.get("choices") else _ANNOTATION_TYPES.get(annotation)
        if kind is None:
            raise TypeError(f"{config_cls.__name__}.{f.name}: type {annotation!r} has no port type; skip it")
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{config_cls.__name__}.{f.name} needs a default to become a port")
        ports.append(
            In(
                f.name,
                kind,
                f.default,
                meta.get("help", ""),
                min=meta.get("min", meta.get("above")),
                max=meta.get("max"),
                step=meta.get("step"),
                choices=tuple(meta.get("choices", ())),
            )
        )
    return tuple(ports)


def build_config(config_cls: type, values: dict[str, Any]) -> Any:
    """The config dataclass from a node's inputs (only the fields it declares are taken)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in names})
