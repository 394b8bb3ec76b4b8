"""Run an API-format ComfyUI prompt without ComfyUI.

    python nodes/runner.py workflows/api/animatediff_txt2vid.json \\
        --models-dir DIR --output-dir DIR [--set 3.seed=5] [--quiet] [--verbose]

The file may be an API prompt ("Save (API)"), a ``POST /prompt`` body or a
UI-format workflow (converted the way the frontend converts it). Exit status 0
on success, 1 on any error (the message goes to stderr; ``--verbose`` adds the
traceback).

From Python::

    from kinema.nodes.runner import run_prompt
    outputs = run_prompt(prompt)            # {node_id: {"result": tuple, "ui": dict | None}}

It behaves like ComfyUI's executor for the V1 node classes of this pack: every
node is validated first (unknown class, missing required input, bad link, link
type mismatch, widget value outside its type/list/range, a class's own
``VALIDATE_INPUTS``), then only output nodes (``OUTPUT_NODE = True``) and what
they depend on run, each once, in topological order, under
``torch.inference_mode()``. Hidden inputs ``PROMPT``, ``EXTRA_PNGINFO``,
``UNIQUE_ID`` are passed when a class asks for them. There is no cache and no
list mapping (``INPUT_IS_LIST``/``OUTPUT_IS_LIST`` are refused).
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: load the repository root as the package ``kinema`` (the
    # way ComfyUI and the tests load the pack) and hand over to it.
    import importlib
    import importlib.util

    _HERE = os.path.dirname(os.path.abspath(__file__))
    _ROOT = os.path.dirname(_HERE)
    # the script's folder must not shadow top-level modules with the pack's node modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:  # Ctrl-C while torch and the pack load: the same message and status as later
        if "kinema" not in sys.modules:
            _spec = importlib.util.spec_from_file_location(
                "kinema", os.path.join(_ROOT, "__init__.py"), submodule_search_locations=[_ROOT])
            _pack = importlib.util.module_from_spec(_spec)
            sys.modules["kinema"] = _pack
            _spec.loader.exec_module(_pack)
        _main = importlib.import_module("kinema.nodes.runner").main
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    sys.exit(_main(sys.argv[1:]))

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

from ..models.errors import KinemaError  # noqa: E402
from . import workflow_format as wf  # noqa: E402

HIDDEN_KINDS = ("PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID")
OUTPUT_UI_KEYS = ("images", "gifs", "videos", "animated", "audio", "files")


class _Node:
    """One validated prompt node: its class, literal values and links."""

    __slots__ = ("id", "class_type", "cls", "literals", "links", "specs")

    def __init__(self, node_id, class_type, cls, specs):
        self.id, self.class_type, self.cls, self.specs = node_id, class_type, cls, specs
        self.literals = {}   # name -> value (converted)
        self.links = {}      # name -> (source id, output index)

    def label(self):
        return f"node {self.id} ({self.class_type})"


def _registry(node_classes):
    if node_classes is None:
        from . import NODE_CLASS_MAPPINGS  # the pack's registry
        node_classes = NODE_CLASS_MAPPINGS
    return node_classes


def _types_match(received, expected):
    received, expected = wf.output_type_name(received), wf.output_type_name(expected)
    if received == expected or received == "*" or expected == "*":
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


def _validate_function(cls):
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return None, set(), False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn, set(), True
    names = {p.name for p in params.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    has_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return fn, names, has_kwargs


def _hidden_values(node, prompt, extra_pnginfo):
    out = {}
    for s in node.specs:
        if s.category != "hidden":
            continue
        if s.type == "PROMPT":
            out[s.name] = prompt
        elif s.type == "EXTRA_PNGINFO":
            out[s.name] = extra_pnginfo
        elif s.type == "UNIQUE_ID":
            out[s.name] = node.id
    return out


def validate_prompt(prompt, node_classes=None, extra_pnginfo=None):
    """Check every node of ``prompt``; returns ``{node_id: _Node}``.

    Raises :class:`KinemaError` naming the node id, class and input at fault.
    """
    node_classes = _registry(node_classes)
    if not isinstance(prompt, dict) or not prompt:
        raise KinemaError("the prompt is empty or not a JSON object of nodes")
    original = prompt
    prompt = {str(k): v for k, v in prompt.items()}
    plan = {}
    for nid in sorted(prompt, key=wf._id_key):
        entry = prompt[nid]
        if not isinstance(entry, dict) or not isinstance(entry.get("class_type"), str):
            raise KinemaError(f"node {nid}: no class_type (is this an API-format prompt?)")
        ct = entry["class_type"]
        cls = node_classes.get(ct)
        if cls is None:
            raise KinemaError(f"node {nid} ({ct}): unknown class_type {ct!r}; "
                              "is the node pack that provides it installed?")
        inputs = entry.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise KinemaError(f"node {nid} ({ct}): 'inputs' must be a JSON object")
        try:
            specs = wf.input_specs(cls)
        except Exception as e:  # a broken INPUT_TYPES is the class's bug, name it
            raise KinemaError(f"node {nid} ({ct}): INPUT_TYPES() failed: {e}") from e
        node = _Node(nid, ct, cls, specs)
        vfn, vnames, vkwargs = _validate_function(cls)
        received_types = {}
        for s in specs:
            if s.category == "hidden":
                continue
            where = f"node {nid} ({ct}): input '{s.name}'"
            if s.name not in inputs:
                if s.category == "required":
                    raise KinemaError(f"{where}: required input is missing")
                continue
            value = inputs[s.name]
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            elif isinstance(value, list):
                if not wf._is_link(value):
                    raise KinemaError(f"{where}: a link must be [\"<node id>\", <output index>], "
                                      f"got {value!r}")
                src, idx = str(value[0]), value[1]
                if src not in prompt:
                    raise KinemaError(f"{where}: links to node {src}, which is not in the prompt")
                src_entry = prompt[src] if isinstance(prompt[src], dict) else {}
                src_cls = node_classes.get(src_entry.get("class_type"))
                if src_cls is None:
                    raise KinemaError(f"{where}: links to node {src}, whose class "
                                      f"{src_entry.get('class_type')!r} is unknown")
                rtypes = wf.return_types(src_cls)
                if not 0 <= idx < len(rtypes):
                    raise KinemaError(f"{where}: links to output {idx} of node {src} "
                                      f"({src_entry['class_type']}), which has {len(rtypes)} "
                                      f"output{'s' if len(rtypes) != 1 else ''}")
                received_types[s.name] = rtypes[idx]
                if "input_types" not in vnames and not _types_match(rtypes[idx], s.socket_type):
                    raise KinemaError(f"{where}: expects {s.socket_type}, but output {idx} of node "
                                      f"{src} ({src_entry['class_type']}) is "
                                      f"{wf.output_type_name(rtypes[idx])}")
                node.links[s.name] = (src, idx)
                continue
            if not s.is_widget:
                if s.type == "*" or (isinstance(s.type, str) and s.type.strip() == "*"):
                    node.literals[s.name] = value
                    continue
                raise KinemaError(f"{where}: expects a link from a {s.socket_type} output, "
                                  f"got the value {value!r}")
            try:
                node.literals[s.name] = wf.check_value(
                    s, value, check_range=not (s.name in vnames or vkwargs))
            except ValueError as e:
                _missing_model(cls, s.name, value, where)  # a model not in its folder: where it was looked for
                raise KinemaError(f"{where}: {e}") from None
        if vfn is not None and (vnames or vkwargs):
            args = {}
            for name in node.literals:
                if vkwargs or name in vnames:
                    args[name] = node.literals[name]
            for name in node.links:
                if vkwargs or name in vnames:
                    args[name] = None  # like ComfyUI: linked values are unknown before running
            for name, v in _hidden_values(node, original, extra_pnginfo).items():
                if vkwargs or name in vnames:
                    args[name] = v
            if "input_types" in vnames:
                args["input_types"] = received_types
            try:
                ok = vfn(**args)
            except Exception as e:
                raise KinemaError(f"node {nid} ({ct}): VALIDATE_INPUTS failed: "
                                  f"{_describe(e)}") from e
            if ok is not True:
                reason = "" if ok is False else f": {ok}"
                raise KinemaError(f"node {nid} ({ct}): invalid inputs{reason}")
        plan[nid] = node
    _check_acyclic(plan)
    return plan


def _check_acyclic(plan):
    state = {}
    for start in sorted(plan, key=wf._id_key):
        if state.get(start):
            continue
        stack = [(start, iter(sorted({s for s, _ in plan[start].links.values()}, key=wf._id_key)))]
        path = [start]
        state[start] = 1
        while stack:
            nid, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[nid] = 2
                stack.pop()
                path.pop()
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise KinemaError("the prompt has a cycle: " + " -> ".join(
                    f"{n} ({plan[n].class_type})" for n in cycle))
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted({s for s, _ in plan[nxt].links.values()},
                                               key=wf._id_key))))


def execution_order(plan):
    """Output nodes and their dependencies, dependencies first, each once."""
    outputs = [nid for nid in sorted(plan, key=wf._id_key)
               if getattr(plan[nid].cls, "OUTPUT_NODE", False)]
    if not outputs:
        raise KinemaError("the prompt has no output node (a node with OUTPUT_NODE = True, "
                          "such as a video saver): there is nothing to run")
    order, seen = [], set()

    def visit(nid):  # the graph is acyclic (checked in validate_prompt)
        if nid in seen:
            return
        seen.add(nid)
        node = plan[nid]
        for s in node.specs:
            if s.name in node.links:
                visit(node.links[s.name][0])
        order.append(nid)

    for nid in outputs:
        visit(nid)
    return order, outputs


def _describe(e):
    if isinstance(e, KinemaError):
        return str(e)
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _normalize_output(node, out):
    ui = None
    if isinstance(out, dict):
        if "expand" in out:
            raise KinemaError(f"{node.label()}: node expansion is not supported by the headless runner")
        ui = out.get("ui")
        result = out.get("result", ())
        if result is None:
            result = ()
    else:
        result = out
    if result is None:
        result = ()
    if not isinstance(result, (tuple, list)):
        raise KinemaError(f"{node.label()}: {node.cls.__name__}.{node.cls.FUNCTION} returned "
                          f"{type(result).__name__}; a node must return a tuple of outputs")
    return {"result": tuple(result), "ui": ui}


def _inference_mode():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the pack
        import contextlib
        return contextlib.nullcontext()
    return torch.inference_mode()


def run_prompt(prompt, node_classes=None, outputs_only=True, progress=True, workflow=None):
    """Validate and run an API-format prompt.

    ``node_classes`` maps class_type to a V1 node class (default: the pack's
    ``NODE_CLASS_MAPPINGS``). ``workflow``, the UI-format graph the prompt came
    from, is passed to nodes as ``extra_pnginfo = {"workflow": workflow}``.
    Returns ``{node_id: {"result": tuple, "ui": dict | None}}`` for the output
    nodes (every executed node with ``outputs_only=False``).
    """
    node_classes = _registry(node_classes)
    extra_pnginfo = {"workflow": workflow} if workflow is not None else None
    plan = validate_prompt(prompt, node_classes, extra_pnginfo)
    order, outputs = execution_order(plan)
    for nid in order:
        cls = plan[nid].cls
        out_list = getattr(cls, "OUTPUT_IS_LIST", None)
        if getattr(cls, "INPUT_IS_LIST", False) or (out_list and any(out_list)):
            raise KinemaError(f"{plan[nid].label()}: list inputs/outputs (INPUT_IS_LIST/"
                              "OUTPUT_IS_LIST) are not supported by the headless runner")
    results = {}
    t_all = time.perf_counter()
    with _inference_mode():
        for k, nid in enumerate(order):
            node = plan[nid]
            kwargs = dict(node.literals)
            for name, (src, idx) in node.links.items():
                produced = results[src]["result"]
                if idx >= len(produced):
                    raise KinemaError(f"{node.label()}: input '{name}' takes output {idx} of node "
                                      f"{src} ({plan[src].class_type}), which returned only "
                                      f"{len(produced)} value{'s' if len(produced) != 1 else ''}")
                kwargs[name] = produced[idx]
            kwargs.update(_hidden_values(node, prompt, extra_pnginfo))
            if progress:
                print(f"[kinema] {k + 1}/{len(order)} {node.label()} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                instance = node.cls()
                fn = getattr(instance, node.cls.FUNCTION)
                out = fn(**kwargs)
            except Exception as e:
                raise KinemaError(f"node {nid} ({node.class_type}): {_describe(e)}") from e
            results[nid] = _normalize_output(node, out)
            if progress:
                print(f"[kinema] {k + 1}/{len(order)} {node.label()} done in "
                      f"{time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    if progress:
        print(f"[kinema] prompt finished in {time.perf_counter() - t_all:.2f}s",
              file=sys.stderr, flush=True)
    keep = outputs if outputs_only else order
    return {nid: results[nid] for nid in keep}


# ----------------------------------------------------------------- command line
def output_files(results):
    """``(node_id, key, item)`` for every file the output nodes reported in their ``ui``."""
    found = []
    for nid, res in results.items():
        ui = res.get("ui") if isinstance(res, dict) else None
        if not isinstance(ui, dict):
            continue
        for key in OUTPUT_UI_KEYS:
            for item in ui.get(key) or []:
                if isinstance(item, dict) and "filename" in item:
                    found.append((nid, key, item))
    return found


def _parse_override(text, prompt, node_classes):
    target, eq, raw = text.partition("=")
    nid, dot, name = target.partition(".")
    if not eq or not dot or not nid or not name:
        raise KinemaError(f"--set {text!r}: expected NODE_ID.INPUT=VALUE, e.g. --set 3.seed=5")
    if nid not in prompt:
        raise KinemaError(f"--set {text!r}: the prompt has no node {nid} "
                          f"(nodes: {', '.join(sorted(prompt, key=wf._id_key))})")
    cls = node_classes.get(prompt[nid].get("class_type"))
    specs = {s.name: s for s in wf.input_specs(cls) if s.category != "hidden"} if cls else {}
    if cls is not None and name not in specs:
        raise KinemaError(f"--set {text!r}: node {nid} ({prompt[nid]['class_type']}) has no input "
                          f"{name!r} (inputs: {', '.join(specs)})")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    spec = specs.get(name)
    if spec is not None and (spec.type == "STRING" or spec.is_combo) and not isinstance(value, str):
        value = raw  # "5" stays a string for text and list inputs
    return nid, name, value


def _host_dir(host, kind, explicit):
    if explicit:
        return explicit
    for attr in (f"get_{kind}_dir", f"get_{kind}_directory"):
        fn = getattr(host, attr, None) if host is not None else None
        if callable(fn):
            try:
                return fn()
            except Exception:  # the folder is only for display
                return None
    return None


def _missing_model(cls, name, value, where):
    """For a loader's model input (``MODEL_INPUTS``) naming no file of its list: the host's KinemaError for that
    name (the folders searched and where to put the file), prefixed with ``where``; nothing otherwise."""
    kind = getattr(cls, "MODEL_INPUTS", {}).get(name)
    if kind is None or not isinstance(value, str):
        return
    try:
        from . import host
    except ImportError:
        return
    resolve = host.resolve_model_dir if kind in getattr(host, "MODEL_DIR_KINDS", ()) else host.resolve_model
    try:
        resolve(kind, value)
    except KinemaError as e:
        raise KinemaError(f"{where}: {e}") from None


def use_demo_models(prompt, node_classes, host):
    """Point the host at the pack's demo models and swap in a demo file for every model name.

    Used when no models folder is configured: each loader input named in a class's
    ``MODEL_INPUTS`` gets the demo model of its kind. Returns the notes to print.
    """
    from ..models import demo

    # entries that are not nodes with inputs are left to validate_prompt's messages
    loaders = [(nid, node, getattr(node_classes.get(node.get("class_type")), "MODEL_INPUTS", {}))
               for nid, node in prompt.items() if isinstance(node, dict) and isinstance(node.get("inputs"), dict)]
    if not any(inputs for _, _, inputs in loaders):
        return []
    folder = demo.default_cache_dir()
    demo.write_demo_models(folder)
    host.set_models_dir(folder)
    notes = [f"No models folder configured (--models-dir or KINEMA_MODELS_DIR): using Kinema's demo models "
             f"in {folder}. {demo.UNTRAINED_NOTE}"]
    for nid, node, inputs in loaders:
        for name, kind in inputs.items():
            value = node["inputs"].get(name)
            folders = kind in getattr(host, "MODEL_DIR_KINDS", ())  # model folders (depth models), not files
            if not isinstance(value, str) or value in (host.list_model_dirs(kind) if folders else host.list_models(kind)):
                continue
            stand_in = demo.substitute(kind, value)
            if stand_in is not None:
                node["inputs"][name] = stand_in
                notes.append(f"node {nid}: '{value}' -> demo model '{stand_in}' (untrained)")
    return notes


def main(argv=None):
    """Command-line entry; returns the exit status (0 ok, 1 error)."""
    parser = argparse.ArgumentParser(
        prog="python nodes/runner.py",
        description="Run a ComfyUI workflow (API or UI format) made of Kinema nodes, without ComfyUI.")
    parser.add_argument("workflow", help="workflow JSON: API format, a POST /prompt body or UI format")
    parser.add_argument("--models-dir", metavar="DIR",
                        help="models folder (with checkpoints/, animatediff_models/, ...)")
    parser.add_argument("--output-dir", metavar="DIR", help="where output nodes write their files")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NODE.INPUT=VALUE",
                        help="override an input, e.g. --set 3.seed=5 (VALUE is JSON if it parses)")
    parser.add_argument("--print-api", action="store_true",
                        help="print the API prompt that would run (after conversion and --set) and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-node progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks on errors")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (argparse printed it)
        return 0 if e.code in (0, None) else 1

    try:
        host = None
        if args.models_dir or args.output_dir or not args.print_api:
            try:
                from . import host as host_module
                host = host_module
            except ImportError as e:
                if args.models_dir or args.output_dir:
                    raise KinemaError(f"cannot set folders: nodes/host.py failed to import: {e}") from e
        if args.models_dir:
            if not os.path.isdir(args.models_dir):
                raise KinemaError(f"--models-dir {args.models_dir}: not a directory")
            host.set_models_dir(os.path.abspath(args.models_dir))
        try:
            prompt, workflow = wf.load_workflow(args.workflow)
        except (OSError, ValueError) as e:
            raise KinemaError(f"cannot read {args.workflow}: {e}") from e
        if args.output_dir and not args.print_api:
            if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
                raise KinemaError(f"--output-dir {args.output_dir}: a file, not a directory")
            os.makedirs(args.output_dir, exist_ok=True)
            host.set_output_dir(os.path.abspath(args.output_dir))
        node_classes = _registry(None)
        if prompt is None:
            prompt = wf.api_from_ui(workflow, node_classes)
        for text in args.overrides:
            nid, name, value = _parse_override(text, prompt, node_classes)
            prompt[nid].setdefault("inputs", {})[name] = value
        if args.print_api:
            print(json.dumps(prompt, indent=2))
            return 0
        if host is not None and not args.models_dir and not os.environ.get("KINEMA_MODELS_DIR") \
                and not getattr(host, "IN_COMFYUI", False):
            for note in use_demo_models(prompt, node_classes, host):
                print(note, file=sys.stderr)

        results = run_prompt(prompt, node_classes, outputs_only=True,
                             progress=not args.quiet, workflow=workflow)
        files = output_files(results)
        if not files:
            print("done; the output nodes reported no files")
        for nid, key, item in files:
            kind = item.get("type") or "output"
            base = _host_dir(host, kind, args.output_dir if kind == "output" else None)
            rel = os.path.join(item.get("subfolder") or "", item["filename"])
            path = os.path.join(base, rel) if base else rel
            print(f"node {nid} ({prompt[nid]['class_type']}) wrote {key}: {path}")
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # every failure becomes a message and status 1
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_describe(e)}", file=sys.stderr)
        return 1
