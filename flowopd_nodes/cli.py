"""flowopd's headless runner: the ``flowopd`` command (``pip install -e .``) and ``python runner.py``.

    flowopd GRAPH.yaml [...]                       (= python runner.py GRAPH.yaml [...])
    python runner.py GRAPH.yaml [--set NODE.PARAM=VALUE ...] [--run-dir DIR] [--force NODE ...]
    python runner.py run GRAPH.yaml ...            (same as above)
    python runner.py validate GRAPH.yaml [--set ...]
    python runner.py list-nodes [--json]
    python runner.py export GRAPH.yaml [--comfy-api OUT.json] [--comfy-workflow OUT.json]
    python runner.py import COMFY.json [-o OUT.yaml]
    python runner.py serve-reward NAME [--port P] [--host 127.0.0.1] [--set FIELD=VALUE ...] [--limit FIELD=VALUE ...]

GRAPH may also be a ComfyUI API or UI-workflow JSON file (as exported, or saved from the canvas).
Exit codes: 0 ok, 1 a node failed, 2 nothing ran: the graph is invalid (every problem is printed) or another runner
holds the run folder, 128 + N a training node stopped on signal N (143 SIGTERM, 130 SIGINT) after writing a
checkpoint: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spin-waiting. With libgomp's default policy a
# 2-thread torch process next to one busy process ran a GRPO epoch 17x slower than alone; with PASSIVE 1.2x, at
# the cost of 1.5x alone (bench/bench_threads.py, README "CPU threads"). A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # silences "requires torchvision" notices on import

COMMANDS = ("run", "validate", "list-nodes", "export", "import", "serve-reward")
USAGE = """%(prog)s GRAPH.yaml [--set NODE.PARAM=VALUE ...] [--run-dir DIR] [--force NODE ...]
       %(prog)s validate GRAPH.yaml [--set NODE.PARAM=VALUE ...] [--json] [--no-file-check]
       %(prog)s list-nodes [--json]
       %(prog)s export GRAPH.yaml [--comfy-api OUT.json] [--comfy-workflow OUT.json]
       %(prog)s import COMFY.json [-o OUT.yaml]
       %(prog)s serve-reward NAME [--host HOST] [--port P] [--set FIELD=VALUE ...] [--limit FIELD=VALUE ...]"""
EPILOG = """GRAPH may also be a ComfyUI API or UI-workflow JSON file. --set takes the text given for a text input
(STRING or a choice: --set 'router.weights=text: text=0.8 compose=0.2') and reads any other value as a YAML scalar
(3, 0.5, true).
Exit codes: 0 done, 1 a node failed, 2 nothing ran: the graph is invalid (every problem is printed) or another
runner holds the run folder, 128 + N a training node stopped on signal N after writing a checkpoint (rerun the
same command to resume)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(sys.argv[0]).name or "flowopd", usage=USAGE, epilog=EPILOG,
        description="Run flowopd graph files headless (the first form runs a graph: the command 'run' is implied).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def graph_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("graph", type=Path, help="graph file (YAML, or ComfyUI API / UI-workflow JSON)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="NODE.PARAM=VALUE",
            help="override a param (repeatable); validated like the file",
        )

    run = sub.add_parser("run", help="run a graph (default command)")
    graph_args(run)
    run.add_argument("--run-dir", type=Path, help="run directory (default: runs/<graph name>)")
    run.add_argument(
        "--force", action="append", default=[], metavar="NODE", help="re-execute NODE (and so its descendants)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    val = sub.add_parser("validate", help="check a graph; print every problem")
    graph_args(val)
    val.add_argument("--json", action="store_true", help="print problems as ComfyUI-style node_errors JSON")
    val.add_argument("--no-file-check", action="store_true",
                     help="do not require the files the graph names to exist here (a graph for a cluster)")

    ls = sub.add_parser("list-nodes", help="list registered nodes with their ports")
    ls.add_argument("--json", action="store_true", help="machine-readable (ComfyUI object_info-like)")

    exp = sub.add_parser("export", help="convert a graph to ComfyUI formats")
    graph_args(exp)
    exp.add_argument("--comfy-api", type=Path, metavar="OUT.json", help="write ComfyUI API-format JSON (POST /prompt)")
    exp.add_argument(
        "--comfy-workflow", type=Path, metavar="OUT.json", help="write a ComfyUI UI workflow (load it on the canvas)"
    )
    exp.add_argument("--no-file-check", action="store_true",
                     help="do not require the files a graph names to exist here (a cluster graph)")
    imp = sub.add_parser("import", help="convert a ComfyUI API or UI-workflow JSON file to a YAML graph")
    imp.add_argument("json", type=Path, help="ComfyUI JSON file")
    imp.add_argument("-o", "--output", type=Path, metavar="OUT.yaml", help="write here (default: print it)")
    imp.add_argument("--name", help="graph name (default: the one stored in the file, else the file's stem)")
    imp.add_argument("--no-file-check", action="store_true",
                     help="do not require the files the graph names to exist here (a cluster graph)")
    srv = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (JSON protocol, PNG images)")
    srv.add_argument("name", help="reward name (see flowopd_core.rewards: REWARDS and REAL_REWARDS)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; there is no authentication)")
    srv.add_argument("--port", type=int, default=8765, help="port (0 = any free port)")
    srv.add_argument(
        "--set", dest="config", action="append", default=[], metavar="FIELD=VALUE",
        help="a field of the reward's config (repeatable), e.g. --set model_path=/models/pickscore",
    )
    srv.add_argument(
        "--limit", dest="limits", action="append", default=[], metavar="FIELD=VALUE",
        help="a server limit (repeatable; fields of flowopd_core.rewards.server.ServerLimits, e.g. "
             "--limit max_image_pixels=1048576 --limit workers=16); GET /info shows the limits in force",
    )
    return parser


def _serve_reward(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from flowopd_core.rewards.server import ServerLimits, serve

    values: dict[str, dict] = {"--set": {}, "--limit": {}}
    for flag, items in (("--set", args.config), ("--limit", args.limits)):
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                print(f"error: {flag} {item!r}: expected FIELD=VALUE", file=sys.stderr)
                return 2
            values[flag][key] = yaml.safe_load(value) if value else ""
    known = {f.name for f in dataclasses.fields(ServerLimits)}
    unknown = sorted(set(values["--limit"]) - known)
    if unknown:
        print(f"error: --limit: unknown field(s) {unknown}; the limits are {sorted(known)}", file=sys.stderr)
        return 2
    try:
        limits = ServerLimits(**values["--limit"])
        serve(args.name, host=args.host, port=args.port, config=values["--set"], limits=limits)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _load(path: Path, overrides: list[str], check_files: bool = True):
    """Load and validate a graph (YAML, or ComfyUI JSON by its suffix); bad overrides are reported with every
    other problem of the graph."""
    from flowopd_nodes.engine.graph import apply_overrides, load_graph_file
    from flowopd_nodes.engine.validate import validate

    if path.suffix.lower() == ".json":
        from flowopd_nodes.comfy.format import load_comfy_file

        graph = load_comfy_file(path)
    else:
        graph = load_graph_file(path)
    apply_overrides(graph, overrides)
    return validate(graph, check_files=check_files)


def _import(args: argparse.Namespace) -> int:
    """ComfyUI JSON -> YAML graph; the result is validated before it is written (exit 2 and nothing written if not)."""
    from flowopd_nodes.comfy.format import graph_to_yaml, load_comfy_file
    from flowopd_nodes.engine.errors import GraphIssue, GraphValidationError
    from flowopd_nodes.engine.graph import name_problem
    from flowopd_nodes.engine.validate import validate

    out_dir = (args.output.parent if args.output else Path.cwd()).resolve()
    try:
        graph = load_comfy_file(args.json, yaml_dir=out_dir)
        if args.name is not None:
            problem = name_problem(args.name, "--name")
            if problem:
                graph.load_issues.append(GraphIssue("invalid_graph", problem, field="name"))
            else:
                graph.name = args.name
        validate(graph, check_files=not args.no_file_check)
    except GraphValidationError as exc:
        print(exc, file=sys.stderr)
        return 2
    text = graph_to_yaml(graph)
    if args.output:
        return _write_outputs({args.output: text})
    print(text, end="")
    return 0


def _output_problem(path: Path) -> str:
    """Why ``path`` cannot be written as an output file, or "" when it can (its folder exists and is writable)."""
    if path.is_dir():
        return "it is a folder"
    if path.parent.exists() and not path.parent.is_dir():
        return f"{path.parent} is not a folder"
    if not path.parent.is_dir():
        return f"its folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"its folder {path.parent} is not writable"
    return ""


def _write_outputs(texts: dict[Path, str]) -> int:
    """Write each output file atomically after checking all of them (exit 2 and nothing written if one cannot be:
    every problem printed); print what was written."""
    problems = [f"error: cannot write {path}: {why}" for path, why in ((p, _output_problem(p)) for p in texts) if why]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    for path, text in texts.items():
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            print(f"error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


def _list_nodes(as_json: bool) -> int:
    from flowopd_nodes.engine.ports import REQUIRED
    from flowopd_nodes.nodes.registry import NODES

    if as_json:
        info = {
            cls.NODE_ID: {
                "display_name": cls.DISPLAY_NAME,
                "category": cls.CATEGORY,
                "description": cls.DESCRIPTION,
                "input": cls.INPUT_TYPES(),
                "output": list(cls.RETURN_TYPES),
                "output_name": list(cls.RETURN_NAMES),
                "output_node": cls.OUTPUT_NODE,
            }
            for cls in NODES
        }
        print(json.dumps(info, indent=2, default=str))
        return 0
    for cls in NODES:
        print(f"{cls.NODE_ID}  [{cls.CATEGORY}]{'  (output node)' if cls.OUTPUT_NODE else ''}")
        print(f"    {cls.DESCRIPTION}")
        for port in cls.INPUTS:
            bits = [port.type]
            if port.type == "COMBO":
                bits = ["one of " + "|".join(port.choices)]
            if port.is_widget and port.default is not REQUIRED and port.default is not None:
                bits.append(f"default {port.default!r}")
            if port.min is not None or port.max is not None:
                bits.append(f"range [{port.min}, {port.max}]")
            if port.optional:
                bits.append("optional")
            if port.required:
                bits.append("required")
            print(f"    in  {port.name:<18} {', '.join(bits)}: {port.help}")
        for out in cls.OUTPUTS:
            print(f"    out {out.name:<18} {out.type}: {out.help}")
        if cls.SETTINGS is not None:
            print(f"    settings: the fields of {cls.SETTINGS.NODE_ID}, which a graph file may also set as params here")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        _parser().print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    if args.command == "list-nodes":
        return _list_nodes(args.json)
    if args.command == "serve-reward":
        return _serve_reward(args)

    from flowopd_nodes.engine.errors import GraphValidationError, NodeExecutionError, TrainingInterrupted

    if args.command == "import":
        return _import(args)
    if args.command == "export" and not (args.comfy_api or args.comfy_workflow):
        print("error: export needs --comfy-api OUT.json and/or --comfy-workflow OUT.json", file=sys.stderr)
        return 2
    try:
        valid = _load(args.graph, args.overrides, check_files=not getattr(args, "no_file_check", False))
    except GraphValidationError as exc:
        if getattr(args, "json", False):
            print(json.dumps(
                {"error": {"type": "prompt_outputs_failed_validation"}, "node_errors": exc.node_errors()}, indent=2
            ))
        else:
            print(exc, file=sys.stderr)
        return 2

    if args.command == "validate":
        written = valid.graph.nodes  # the nodes of the file (not the settings nodes made for flat settings)
        nodes, to_run = len(written), sum(1 for n in valid.order if n in written)
        if args.json:
            print(json.dumps({"valid": True, "graph": str(args.graph), "name": valid.name, "nodes": nodes,
                              "to_run": to_run, "node_errors": {}}, indent=2))
        else:
            print(f"{args.graph}: valid ({nodes} nodes, {to_run} to run)")
        return 0
    if args.command == "export":
        from flowopd_nodes.comfy.format import to_api_prompt, to_workflow

        return _write_outputs({out: json.dumps(make(valid), indent=2)
                               for out, make in ((args.comfy_api, to_api_prompt), (args.comfy_workflow, to_workflow))
                               if out is not None})

    from flowopd_core.training.distributed import init_from_env
    from flowopd_nodes.engine.graph import inside
    from flowopd_nodes.engine.scheduler import RunFolderUnusable, run_graph

    unknown = sorted(set(args.force) - set(valid.nodes))
    if unknown:
        print(f"error: --force names no node of the graph: {unknown}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or inside("runs", valid.name)  # a validated name: a folder under runs/
    if args.no_progress:  # the libraries' own bars too (loading pipelines, weights)
        _quiet_library_bars()
    world = init_from_env()  # several processes under torchrun / accelerate launch (WORLD_SIZE > 1)
    try:
        result = run_graph(valid, run_dir, force=set(args.force), show_progress=not args.no_progress)
    except RunFolderUnusable as exc:
        print(f"error: {exc}; nothing ran", file=sys.stderr)
        return 2
    except NodeExecutionError as exc:
        if isinstance(exc.cause, TrainingInterrupted):
            print(f"interrupted: {exc.cause}\n(see {run_dir / 'run.log'})", file=sys.stderr)
            return 128 + exc.cause.signum
        print(f"error: {exc}\n(see {run_dir / 'run.log'})", file=sys.stderr)
        return 1
    if not world.is_main:
        return 0
    print(f"{valid.name}: {len(result.executed)} executed, {len(result.cached)} cached -> {run_dir}"
          + (f" ({world.size} processes)" if world.size > 1 else ""))
    for node_id in valid.order:
        if valid.nodes[node_id].cls.OUTPUT_NODE:
            for name, value in result.outputs[node_id].items():
                print(f"  {node_id}.{name}: {_shown(value, run_dir, node_id)}")
    return 0


def _quiet_library_bars() -> None:
    """No progress bars from diffusers, transformers or huggingface_hub (``--no-progress``)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _shown(value: object, run_dir: Path, node_id: str) -> str:
    """An output as a person wants it in the end-of-run summary: an image batch by its size, a file by its path
    through the run folder's ``nodes/<node>`` link instead of the cache entry it lives in."""
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == 4 and shape[-1] == 3:  # ComfyUI's IMAGE: (B, H, W, 3)
        return f"{shape[0]} image(s) of {shape[2]}x{shape[1]} px (see {run_dir / 'nodes' / node_id})"
    if shape is not None:
        return f"tensor {tuple(shape)}"
    try:  # <run>/cache/<node>/<key>/rest -> <run>/nodes/<node>/rest
        rest = Path(str(value)).relative_to(run_dir / "cache" / node_id).parts[1:]
    except ValueError:
        return str(value)
    return str(run_dir / "nodes" / node_id / Path(*rest))


def _exit(code: int) -> None:
    """Exit; a multi-process run leaves its process group first (all processes meet at a barrier when the run
    succeeded) and ends with os._exit: torch's gloo teardown at interpreter exit sometimes aborts a finished
    run ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")  # not imported: a single process
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    if code == 0:
        from flowopd_core.training.distributed import shutdown

        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run() -> None:
    """The console script's entry point: :func:`main` with the process's arguments, then exit with its code."""
    _exit(main())


if __name__ == "__main__":
    run()
