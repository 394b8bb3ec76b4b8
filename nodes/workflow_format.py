"""Convert between ComfyUI's two workflow formats.

* **UI format**: the litegraph JSON the frontend saves (``version`` 0.4, ``nodes``
  with ``widgets_values``, ``links`` as ``[id, from_node, from_slot, to_node,
  to_slot, type]``). It is what ``workflows/*.json`` hold and what the template
  browser opens.
* **API format**: what "Save (API)" writes and what ``POST /prompt`` takes:
  ``{"<id>": {"class_type": ..., "inputs": {name: value | ["<src id>", slot]}}}``.

``api_from_ui`` follows what the frontend does when it queues a graph:

* widget values are matched to the widget inputs in ``INPUT_TYPES`` order
  (required, then optional; socket-only inputs have no widget);
* an INT input named ``seed``/``noise_seed``, or any INT/COMBO input whose options
  set ``control_after_generate``, is followed by the value of its "control after
  generate" widget (``"randomize"``, ``"fixed"``, ...). A COMBO's control also
  brings a filter-list string. These values are never sent to the server;
* a required COMBO with ``image_upload``/``video_upload``/``animated_image_upload``
  gets an extra ``upload`` button widget after all required inputs (value
  ``"image"``), also never sent;
* a link into an input replaces the widget value of the same name;
* muted nodes (mode 2) are dropped and inputs linked to them removed; bypassed
  nodes (mode 4) are skipped by wiring their consumer to one of the bypassed
  node's inputs, picked as the frontend picks it: the input of the same index if
  its type connects to the output's and the consumer's, else the first of the
  consumer's exact type, else the first that connects to both (LiteGraph's rule:
  ``*`` connects to anything, ``A,B`` to A or B, case aside); ``Reroute`` is followed, a ``PrimitiveNode``
  passes its value; ``Note``/``MarkdownNote`` are ignored;
* list values are sent wrapped as ``{"__value__": [...]}``.

``ui_from_api`` lays the graph out left to right by topological depth. The
round trip ``api_from_ui(ui_from_api(api)) == api`` holds (``_meta`` aside) for a
prompt with numeric node ids that carries every widget value, as the frontend
writes it; :func:`complete_api` fills missing widget values with their defaults
so a hand-written prompt can be compared with its UI twin.

Not handled: subgraphs and group nodes, dynamic prompts (``{a|b}`` in a STRING with
``dynamicPrompts``, which the frontend expands when it queues), and FLOAT inputs
with ``control_after_generate`` (only the newest frontends give them a control).
"""
import copy
import json
import math

from ..models.errors import KinemaError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize", "increment-wrap")
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
VIRTUAL_TYPES = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
MODE_MUTED = 2
MODE_BYPASSED = 4

# litegraph metrics used for node sizes (the editor grows a node that is too small)
_SLOT_H = 20
_WIDGET_H = 24
_MULTILINE_H = 120
_NODE_W = 315
_WIDE_NODE_W = 400
_TITLE_H = 30
_COL_GAP = 90
_ROW_GAP = 40 + _TITLE_H
_ORIGIN = (50.0, 80.0)


# ----------------------------------------------------------------- input specs
class InputSpec:
    """One entry of ``INPUT_TYPES()``: its name, type, options and category."""

    __slots__ = ("name", "type", "opts", "category")

    def __init__(self, name, type_, opts, category):
        self.name, self.type, self.opts, self.category = name, type_, opts, category

    @property
    def is_combo(self):
        return isinstance(self.type, (list, tuple)) or self.type == "COMBO"

    @property
    def combo_options(self):
        if isinstance(self.type, (list, tuple)):
            return list(self.type)
        return list(self.opts.get("options") or [])

    @property
    def socket_type(self):
        """The type string a socket for this input carries."""
        return "COMBO" if self.is_combo else self.type

    @property
    def is_widget(self):
        if self.opts.get("forceInput"):
            return False
        return self.is_combo or self.type in WIDGET_TYPES

    @property
    def control_count(self):
        """How many frontend-only widgets follow this one in ``widgets_values``."""
        if not self.is_widget:
            return 0
        cag = self.opts.get("control_after_generate")
        if self.type == "INT":
            if cag is None:  # the frontend's `??`: only an absent/null option falls back
                cag = self.name in SEED_NAMES
            return 1 if cag else 0
        if self.is_combo and cag and not self.opts.get("multi_select"):
            return 2  # control + filter list
        return 0  # a multi-select combo is its own widget, without a control

    def control_default(self):
        cag = self.opts.get("control_after_generate")
        if isinstance(cag, str):
            return cag
        return "randomize"

    @property
    def is_upload(self):
        return self.is_combo and any(self.opts.get(f) for f in UPLOAD_FLAGS)

    def default(self):
        if "default" in self.opts:
            return copy.deepcopy(self.opts["default"])
        if self.is_combo:
            options = self.combo_options
            return options[0] if options else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.type)

    def __repr__(self):
        return f"InputSpec({self.name!r}, {self.type!r}, {self.category})"


def check_value(spec, value, check_range):
    """A widget value converted (a whole float for an INT) and checked against ``spec`` (its type, and with
    ``check_range`` its min/max or list); returns the value or raises ValueError(reason)."""
    t = spec.type
    if spec.is_combo:
        if check_range and value not in spec.combo_options:
            options = spec.combo_options
            shown = options if len(options) <= 20 else f"a list of {len(options)} values"
            raise ValueError(f"{value!r} is not one of {shown}")
        return value
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(value)
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int past float's range (JSON numbers are unbounded)
            raise ValueError(f"expected a finite number, got one of {len(str(abs(value)))} digits") from None
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    elif t == "STRING":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    else:
        return value
    if check_range:
        lo, hi = spec.opts.get("min"), spec.opts.get("max")
        if lo is not None and value < lo:
            raise ValueError(f"{value} is smaller than the minimum {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{value} is bigger than the maximum {hi}")
    return value


def input_specs(cls):
    """``INPUT_TYPES()`` of a V1 class as a list of :class:`InputSpec`, in order.

    Required inputs come first, then optional, then hidden (hidden inputs carry
    their kind, e.g. ``"PROMPT"``, as ``type``).
    """
    types = cls.INPUT_TYPES()
    specs = []
    for category in ("required", "optional"):
        for name, spec in (types.get(category) or {}).items():
            if isinstance(spec, (list, tuple)) and spec:
                type_ = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            else:
                type_, opts = spec, {}
            specs.append(InputSpec(name, type_, opts, category))
    for name, kind in (types.get("hidden") or {}).items():
        if isinstance(kind, (list, tuple)):
            kind = kind[0] if kind else None
        specs.append(InputSpec(name, kind, {}, "hidden"))
    return specs


def widget_specs(specs):
    """The widgets of a node in frontend order, as ``(spec_or_None, n_extra)``.

    ``None`` stands for the upload button the frontend adds after the required
    inputs of a node with an upload combo.
    """
    out = []
    required = [s for s in specs if s.category == "required"]
    optional = [s for s in specs if s.category == "optional"]
    for s in required:
        if s.is_widget:
            out.append((s, s.control_count))
    if any(s.is_upload for s in required):
        out.append((None, 0))
    for s in optional:
        if s.is_widget:
            out.append((s, s.control_count))
    return out


def return_types(cls):
    return tuple(getattr(cls, "RETURN_TYPES", ()) or ())


def output_type_name(t):
    return "COMBO" if isinstance(t, (list, tuple)) else t


def _default_registry(node_classes, display_names):
    if node_classes is None or display_names is None:
        from . import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # the pack's registry
        if node_classes is None:
            node_classes = NODE_CLASS_MAPPINGS
        if display_names is None:
            display_names = NODE_DISPLAY_NAME_MAPPINGS
    return node_classes, display_names or {}


def is_ui_format(data):
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
        and not isinstance(value[1], bool) and isinstance(value[0], (str, int))


def _id_key(node_id):
    s = str(node_id)
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


# ----------------------------------------------------------------- UI -> API
def _connectable(a, b) -> bool:
    """LiteGraph's ``isValidConnection``: an empty, missing or ``*`` type connects to any; ``A,B`` lists connect
    when a member does; names compare without case."""
    if a in (None, "", "*", 0) or b in (None, "", "*", 0) or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_connectable(x, y) for x in a.split(",") for y in b.split(","))


def _bypass_slot(node: dict, slot: int, want) -> int:
    """The input of a bypassed ``node`` that stands in for its output ``slot`` to a consumer wanting type ``want``,
    as the frontend's ``getBypassSlotIndex`` picks it; -1 for none (the consumer's input is then not sent)."""
    ins, outs = node.get("inputs") or [], node.get("outputs") or []
    out_type = outs[slot].get("type") if 0 <= slot < len(outs) else None
    if want in ("*", ""):
        return slot if len(ins) > slot else 0

    def fits(i: int) -> bool:
        return _connectable(ins[i].get("type"), out_type) and _connectable(ins[i].get("type"), want)

    if 0 <= slot < len(ins) and fits(slot):
        return slot
    exact = [i for i, s in enumerate(ins) if s.get("type") == want]
    return exact[0] if exact else next((i for i in range(len(ins)) if fits(i)), -1)


def _slot_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ui_entries(ui) -> None:
    """KinemaError naming the first node, input slot or link of ``ui`` that is not shaped as the frontend saves it
    (a hand-edited or damaged file), before the conversion trips over it."""
    fix = "open the workflow in ComfyUI and save it again, or export it with Save (API)"
    for k, n in enumerate(ui["nodes"]):
        if not isinstance(n, dict) or not (_slot_number(n.get("id")) or isinstance(n.get("id"), str)):
            raise KinemaError(f"nodes[{k}] of the workflow is not a node object with an 'id': {fix}")
        for key in ("inputs", "outputs"):
            slots = n.get(key)
            if slots is not None and not (isinstance(slots, list) and all(isinstance(x, dict) for x in slots)):
                raise KinemaError(f"node {n['id']}: '{key}' is not a list of slot objects: {fix}")
        if not isinstance(n.get("widgets_values"), (list, dict, type(None))):
            raise KinemaError(f"node {n['id']}: 'widgets_values' is not a list of values: {fix}")
    links = ui.get("links")
    if not isinstance(links, (list, type(None))):
        raise KinemaError(f"the workflow's 'links' is not a list of links: {fix}")
    for k, link in enumerate(links or []):
        if isinstance(link, dict):
            ok = "id" in link and "origin_id" in link and _slot_number(link.get("origin_slot"))
        else:
            ok = isinstance(link, list) and len(link) >= 3 and _slot_number(link[2])
        if not ok:
            raise KinemaError(f"links[{k}] of the workflow is not a link [id, origin node, origin slot, target node, "
                              f"target slot, type]: {fix}")


def api_from_ui(ui, node_classes=None, display_names=None):
    """The API prompt the frontend would queue for the UI workflow ``ui``."""
    if not is_ui_format(ui):
        raise KinemaError("not a UI-format workflow: expected a JSON object with 'nodes' and 'links'")
    _check_ui_entries(ui)
    node_classes, display_names = _default_registry(node_classes, display_names)
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise KinemaError("the workflow uses subgraphs, which Kinema cannot convert; "
                          "unpack them in the editor or export the API format from ComfyUI")

    nodes = {}
    for n in ui["nodes"]:
        nodes[n["id"]] = n
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])

    def link_of(input_slot):
        lid = input_slot.get("link") if input_slot else None
        return links.get(lid) if lid is not None else None

    def is_virtual(node):
        return node.get("type") in VIRTUAL_TYPES

    api = {}
    order = sorted(nodes.values(), key=lambda n: (n.get("order", 0), _id_key(n["id"])))
    for n in order:
        ntype = n.get("type")
        if n.get("mode") in (MODE_MUTED, MODE_BYPASSED) or is_virtual(n):
            continue
        cls = node_classes.get(ntype)
        if cls is None:
            raise KinemaError(f"node {n['id']}: unknown node type {ntype!r} "
                              "(not registered in this node set)")
        specs = input_specs(cls)
        by_name = {s.name: s for s in specs if s.category != "hidden"}
        inputs = {}

        # 1. widget values, in widget order
        wv = n.get("widgets_values")
        if isinstance(wv, dict):  # Vue/V3 widgets may store a name -> value map
            for s, _ in widget_specs(specs):
                if s is not None:
                    inputs[s.name] = copy.deepcopy(wv[s.name]) if s.name in wv else s.default()
        else:
            wv = list(wv or [])
            i = 0
            for s, extra in widget_specs(specs):
                if s is not None:
                    inputs[s.name] = copy.deepcopy(wv[i]) if i < len(wv) else s.default()
                i += 1 + extra
        for name, value in list(inputs.items()):
            if isinstance(value, list):
                inputs[name] = {"__value__": value}

        # 2. links replace widget values
        for slot in n.get("inputs") or []:
            if slot.get("link") is None:
                continue
            name = slot.get("name")
            if name not in by_name:
                continue
            src = link_of(slot)
            if src is None:
                continue
            parent = nodes.get(src[0])
            link, want = src, slot.get("type")
            primitive_value = _MISSING
            while parent is not None and (parent.get("mode") == MODE_BYPASSED or is_virtual(parent)):
                found = False
                if is_virtual(parent):
                    if parent.get("type") == "PrimitiveNode":
                        pv = parent.get("widgets_values") or []
                        if pv:
                            primitive_value = copy.deepcopy(pv[0])
                    ins = parent.get("inputs") or []
                    link = link_of(ins[link[1]]) if link[1] < len(ins) else None
                    if link is not None:
                        parent = nodes.get(link[0])
                        found = parent is not None
                elif link is not None:
                    ins = parent.get("inputs") or []
                    c = _bypass_slot(parent, link[1], want)
                    if 0 <= c < len(ins):
                        want, link = ins[c].get("type"), link_of(ins[c])
                        if link is not None:
                            parent = nodes.get(link[0])
                        found = True
                if not found:
                    break
            if link is not None:
                inputs[name] = [str(link[0]), int(link[1])]
            elif primitive_value is not _MISSING:
                inputs[name] = ({"__value__": primitive_value}
                                if isinstance(primitive_value, list) else primitive_value)

        title = n.get("title") or display_names.get(ntype) or ntype
        api[str(n["id"])] = {"inputs": inputs, "class_type": ntype, "_meta": {"title": title}}

    # 3. inputs linked to nodes that are not sent (muted, missing) are removed
    for entry in api.values():
        for name, value in list(entry["inputs"].items()):
            if _is_link(value) and str(value[0]) not in api:
                del entry["inputs"][name]
    return api


_MISSING = object()


def complete_api(api, node_classes=None):
    """A copy of ``api`` with every missing widget value set to its default.

    The frontend always sends every widget value; use this to compare a
    hand-written API prompt with ``api_from_ui`` of its UI twin.
    """
    node_classes, _ = _default_registry(node_classes, {})
    out = copy.deepcopy(api)
    for nid, entry in out.items():
        cls = node_classes.get(entry.get("class_type"))
        if cls is None:
            raise KinemaError(f"node {nid}: unknown class_type {entry.get('class_type')!r}")
        inputs = entry.setdefault("inputs", {})
        for s, _ in widget_specs(input_specs(cls)):
            if s is not None and s.name not in inputs:
                value = s.default()
                inputs[s.name] = {"__value__": value} if isinstance(value, list) else value
    return out


def strip_meta(api):
    """``api`` without the ``_meta`` entries (for comparisons)."""
    return {nid: {k: v for k, v in entry.items() if k != "_meta"} for nid, entry in api.items()}


# ----------------------------------------------------------------- API -> UI
def _topo_depths(api):
    """Depth of every node (longest path from a source) and a topological order."""
    deps = {}
    for nid, entry in api.items():
        deps[nid] = sorted({str(v[0]) for v in (entry.get("inputs") or {}).values()
                            if _is_link(v) and str(v[0]) in api}, key=_id_key)
    depth, state, order = {}, {}, []

    def visit(nid, stack):
        if state.get(nid) == 2:
            return depth[nid]
        if state.get(nid) == 1:
            cycle = stack[stack.index(nid):] + [nid]
            raise KinemaError("the prompt has a cycle: " + " -> ".join(cycle))
        state[nid] = 1
        d = 0
        for src in deps[nid]:
            d = max(d, visit(src, stack + [nid]) + 1)
        state[nid] = 2
        depth[nid] = d
        order.append(nid)
        return d

    for nid in sorted(api, key=_id_key):
        visit(nid, [])
    # a node without inputs (a loader, an empty latent) sits just left of its first consumer
    consumers = {}
    for nid, srcs in deps.items():
        for src in srcs:
            consumers.setdefault(src, []).append(nid)
    for nid in order:
        if not deps[nid] and nid in consumers:
            depth[nid] = min(depth[c] for c in consumers[nid]) - 1
    return depth, order, deps


def ui_from_api(api, node_classes=None, title=None, seed_control="randomize", display_names=None):
    """A UI-format workflow for the API prompt ``api``, laid out left to right.

    ``seed_control`` is the value given to each seed's "control after generate"
    widget (the frontend's default for a new node is ``"randomize"``); an input
    whose ``control_after_generate`` option names a mode keeps that mode.
    ``title`` adds a group of that name around the graph.
    """
    node_classes, display_names = _default_registry(node_classes, display_names)
    if seed_control not in CONTROL_VALUES:
        raise KinemaError(f"seed_control must be one of {CONTROL_VALUES}, not {seed_control!r}")
    for nid, entry in api.items():
        if not isinstance(entry, dict) or "class_type" not in entry:
            raise KinemaError(f"node {nid}: not an API-format node (no class_type)")
        if entry["class_type"] not in node_classes:
            raise KinemaError(f"node {nid}: unknown class_type {entry['class_type']!r}")

    depth, order, _ = _topo_depths(api)

    # UI ids: numeric API ids are kept, others get fresh numbers
    used = {int(k) for k in api if str(k).lstrip("-").isdigit()}
    next_id = max(used, default=0) + 1
    ui_id = {}
    for nid in sorted(api, key=_id_key):
        if str(nid).lstrip("-").isdigit():
            ui_id[nid] = int(nid)
        else:
            ui_id[nid] = next_id
            next_id += 1

    # per node: inputs slots and widgets
    built = {}
    for nid in order:
        entry = api[nid]
        cls = node_classes[entry["class_type"]]
        specs = [s for s in input_specs(cls) if s.category != "hidden"]
        given = entry.get("inputs") or {}
        slots = []
        for s in specs:  # socket inputs first
            if not s.is_widget:
                slot = {"name": s.name, "type": s.socket_type, "link": None}
                if s.category == "optional":
                    slot["shape"] = 7
                slots.append((slot, given.get(s.name)))
        for s in specs:  # then widget inputs that are driven by a link
            if s.is_widget and _is_link(given.get(s.name)):
                slot = {"name": s.name, "type": s.socket_type, "widget": {"name": s.name}, "link": None}
                if s.category == "optional":
                    slot["shape"] = 7
                slots.append((slot, given[s.name]))
        for s in specs:
            value = given.get(s.name)
            if not s.is_widget and value is not None and not _is_link(value) and s.type != "*":
                raise KinemaError(f"node {nid} ({entry['class_type']}): input {s.name!r} is a "
                                  f"{s.socket_type} socket and needs a link, not a value")
        widgets = []
        multiline = 0
        n_widgets = 0
        for s, extra in widget_specs(specs):
            n_widgets += 1 + extra
            if s is None:
                widgets.append("image")
                continue
            value = given.get(s.name, _MISSING)
            if value is _MISSING or _is_link(value):
                value = s.default()
            elif isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            widgets.append(copy.deepcopy(value))
            if extra:
                cag = s.opts.get("control_after_generate")
                widgets.append(cag if isinstance(cag, str) else
                               (seed_control if s.type == "INT" else "randomize"))
                if extra > 1:
                    widgets.append("")
            if s.type == "STRING" and s.opts.get("multiline"):
                multiline += 1
        rtypes = return_types(cls)
        names = tuple(getattr(cls, "RETURN_NAMES", ()) or ())
        outputs = []
        for i, t in enumerate(rtypes):
            outputs.append({"name": names[i] if i < len(names) else output_type_name(t),
                            "type": output_type_name(t), "links": [], "slot_index": i})
        width = _WIDE_NODE_W if multiline else _NODE_W
        height = (_SLOT_H * max(len(slots), len(outputs)) + _WIDGET_H * (n_widgets - multiline)
                  + _MULTILINE_H * multiline + 14)
        built[nid] = {"slots": slots, "widgets": widgets, "outputs": outputs,
                      "size": [float(width), float(max(height, 46))], "cls": cls}

    # links
    links = []
    for nid in order:
        for index, (slot, value) in enumerate(built[nid]["slots"]):
            if not _is_link(value):
                continue
            src = str(value[0])
            if src not in api:
                raise KinemaError(f"node {nid}: input {slot['name']!r} links to missing node {src}")
            outs = built[src]["outputs"]
            if not 0 <= value[1] < len(outs):
                raise KinemaError(f"node {nid}: input {slot['name']!r} links to output {value[1]} "
                                  f"of node {src}, which has {len(outs)} outputs")
            link_id = len(links) + 1
            links.append([link_id, ui_id[src], value[1], ui_id[nid], index, outs[value[1]]["type"]])
            slot["link"] = link_id
            outs[value[1]]["links"].append(link_id)

    # layout: columns by depth, rows ordered by where their sources sit
    columns = {}
    for nid in order:
        columns.setdefault(depth[nid], []).append(nid)
    pos, row_rank = {}, {}
    x = _ORIGIN[0]
    for d in sorted(columns):
        col = columns[d]

        def rank(nid):
            srcs = [row_rank[str(v[0])] for v in (api[nid].get("inputs") or {}).values()
                    if _is_link(v) and str(v[0]) in row_rank]
            return (sum(srcs) / len(srcs) if srcs else float("inf"), _id_key(nid))
        col.sort(key=rank)
        y = _ORIGIN[1]
        for nid in col:
            pos[nid] = [float(x), float(y)]
            row_rank[nid] = y
            y += built[nid]["size"][1] + _ROW_GAP
        x += max(built[nid]["size"][0] for nid in col) + _COL_GAP

    ui_nodes = []
    for k, nid in enumerate(order):
        entry = api[nid]
        b = built[nid]
        node = {
            "id": ui_id[nid],
            "type": entry["class_type"],
            "pos": pos[nid],
            "size": b["size"],
            "flags": {},
            "order": k,
            "mode": 0,
            "inputs": [slot for slot, _ in b["slots"]],
            "outputs": b["outputs"],
            "properties": {"Node name for S&R": entry["class_type"]},
            "widgets_values": b["widgets"],
        }
        meta_title = (entry.get("_meta") or {}).get("title")
        if meta_title and meta_title != display_names.get(entry["class_type"], entry["class_type"]):
            node["title"] = meta_title
        ui_nodes.append(node)
    ui_nodes.sort(key=lambda n: n["id"])

    groups = []
    if title and ui_nodes:
        x0 = min(n["pos"][0] for n in ui_nodes) - 20
        y0 = min(n["pos"][1] for n in ui_nodes) - _TITLE_H - 50
        x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes) + 20
        y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes) + 20
        groups.append({"id": 1, "title": str(title), "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": "#3f789e", "font_size": 24, "flags": {}})

    return {
        "last_node_id": max((n["id"] for n in ui_nodes), default=0),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0.0, 0.0]}},
        "version": 0.4,
    }


# ----------------------------------------------------------------- files
def load_workflow(path):
    """Read a workflow file: returns ``(api_prompt_or_None, ui_or_None)`` as found.

    A POST body (``{"prompt": {...}}``) counts as an API prompt.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if is_ui_format(data):
        return None, data
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        workflow = ((data.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow")
        return data["prompt"], workflow
    if isinstance(data, dict):
        return data, None
    raise KinemaError(f"{path}: not a ComfyUI workflow (expected a JSON object)")


def dump_workflow(data, path):
    """Write a workflow as the frontend does (indented JSON, UTF-8, trailing newline)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
