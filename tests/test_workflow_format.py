"""UI <-> API workflow conversion on tiny fake node classes."""
import copy
import json

import pytest

from kinema.models.errors import KinemaError
from kinema.nodes.workflow_format import (_id_key, _is_link, api_from_ui, complete_api, input_specs, is_ui_format,
                                          load_workflow, strip_meta, ui_from_api, widget_specs)


class Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (["a.safetensors", "b.safetensors"],)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"


class Encode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"multiline": True, "default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"


class Sampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**64 - 1}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 100}),
                "cfg": ("FLOAT", {"default": 7.5}),
                "sampler_name": (["euler", "ddim"],),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
            },
            "optional": {
                "denoise": ("FLOAT", {"default": 1.0}),
                "context": ("CONTEXT",),
                "noise_seed": ("INT", {"default": 5, "control_after_generate": False}),
                "motion": (["linear", "sqrt"], {"control_after_generate": True}),
                "frame": ("INT", {"default": 0, "control_after_generate": "fixed"}),
                "count": ("INT", {"default": 1, "forceInput": True}),
                "weights": ("STRING", {"default": "[]"}),
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"


class Count:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 3})}}

    RETURN_TYPES = ("INT", "CONTEXT")
    RETURN_NAMES = ("count", "ctx")
    FUNCTION = "go"


class Save:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "filename_prefix": ("STRING", {"default": "kinema"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True


class LoadPicture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["x.png", "y.png"], {"image_upload": True}),
                             "frames": ("INT", {"default": 4})},
                "optional": {"strength": ("FLOAT", {"default": 0.5})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"


class Passthrough:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "amount": ("FLOAT", {"default": 0.0})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "go"


CLASSES = {c.__name__: c for c in (Loader, Encode, Sampler, Count, Save, LoadPicture, Passthrough)}
NAMES = {"Sampler": "Video Sampler (Kinema)"}


def full_api():
    """An API prompt as the frontend writes it (every widget value present)."""
    return {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}, "_meta": {"title": "Loader"}},
        "2": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": "a cat, walking"},
              "_meta": {"title": "Encode"}},
        "3": {"class_type": "Encode", "inputs": {"clip": ["1", 1], "text": ""}, "_meta": {"title": "Encode"}},
        "4": {"class_type": "Sampler", "inputs": {
            "model": ["1", 0], "seed": 123456789012, "steps": ["7", 0], "cfg": 6.5, "sampler_name": "ddim",
            "positive": ["2", 0], "negative": ["3", 0], "denoise": 0.75, "context": ["7", 1],
            "noise_seed": 9, "motion": "sqrt", "frame": 2, "count": ["7", 0],
            "weights": {"__value__": [1, 2]}}, "_meta": {"title": "my sampler"}},
        "5": {"class_type": "Save", "inputs": {"latent": ["4", 0], "filename_prefix": "clip"},
              "_meta": {"title": "Save"}},
        "7": {"class_type": "Count", "inputs": {"value": 12}, "_meta": {"title": "Count"}},
    }


def test_widget_order_and_controls():
    specs = input_specs(Sampler)
    order = [(s.name if s else "upload", extra) for s, extra in widget_specs(specs)]
    assert order == [("seed", 1), ("steps", 0), ("cfg", 0), ("sampler_name", 0), ("denoise", 0),
                     ("noise_seed", 0), ("motion", 2), ("frame", 1), ("weights", 0)]
    pic = [(s.name if s else "upload", extra) for s, extra in widget_specs(input_specs(LoadPicture))]
    assert pic == [("image", 0), ("frames", 0), ("upload", 0), ("strength", 0)]


def test_ui_from_api_node_contents():
    ui = ui_from_api(full_api(), CLASSES, display_names=NAMES)
    json.dumps(ui)  # serializable
    assert ui["version"] == 0.4 and is_ui_format(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert sorted(nodes) == [1, 2, 3, 4, 5, 7]
    s = nodes[4]
    assert s["type"] == "Sampler" and s["title"] == "my sampler"
    assert s["properties"] == {"Node name for S&R": "Sampler"}
    assert s["mode"] == 0 and s["flags"] == {}
    # seed + control, steps (linked: default kept), cfg, sampler, denoise, noise_seed (no control),
    # motion + control + filter, frame + its own control mode, weights
    assert s["widgets_values"] == [123456789012, "randomize", 20, 6.5, "ddim", 0.75, 9, "sqrt",
                                   "randomize", "", 2, "fixed", [1, 2]]
    # sockets first (spec order), then widget inputs driven by a link
    assert [(i["name"], i["type"], "widget" in i) for i in s["inputs"]] == [
        ("model", "MODEL", False), ("positive", "CONDITIONING", False), ("negative", "CONDITIONING", False),
        ("context", "CONTEXT", False), ("count", "INT", False), ("steps", "INT", True)]
    assert s["inputs"][3]["shape"] == 7 and "shape" not in s["inputs"][0]
    assert all(isinstance(i["link"], int) for i in s["inputs"])
    assert [o["name"] for o in nodes[7]["outputs"]] == ["count", "ctx"]
    assert nodes[1]["outputs"][1]["links"] and len(nodes[1]["outputs"][1]["links"]) == 2
    assert "title" not in nodes[1]  # same as the class name: no title
    assert nodes[5]["outputs"] == [] and nodes[5]["widgets_values"] == ["clip"]


def test_links_are_consistent():
    ui = ui_from_api(full_api(), CLASSES)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_link_id"] == len(ui["links"]) == 9
    assert ui["last_node_id"] == 7
    ids = set()
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        ids.add(link_id)
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[src]["outputs"][src_slot]["type"] == type_
    assert len(ids) == len(ui["links"])


def test_layout_left_to_right():
    ui = ui_from_api(full_api(), CLASSES, title="Kinema demo")
    nodes = {n["id"]: n for n in ui["nodes"]}
    x = {i: n["pos"][0] for i, n in nodes.items()}
    # by depth; a node without inputs sits just left of its first consumer
    assert x[1] < x[2] == x[3] == x[7] < x[4] < x[5]
    # nodes in a column do not overlap (title bar included)
    for a in nodes.values():
        for b in nodes.values():
            if a is not b and a["pos"][0] == b["pos"][0] and a["pos"][1] < b["pos"][1]:
                assert a["pos"][1] + a["size"][1] + 30 <= b["pos"][1]
    assert sorted(n["order"] for n in nodes.values()) == list(range(6))
    assert nodes[5]["order"] == 5 and nodes[4]["order"] == 4
    assert ui["groups"][0]["title"] == "Kinema demo"
    gx, gy, gw, gh = ui["groups"][0]["bounding"]
    assert all(gx <= n["pos"][0] and n["pos"][0] + n["size"][0] <= gx + gw for n in nodes.values())
    assert nodes[2]["size"][0] > nodes[1]["size"][0]  # multiline text gets a wider node
    assert nodes[2]["size"] == [400.0, 154.0]  # its text box counted once, not as a widget row too
    assert nodes[2]["pos"][1] < nodes[3]["pos"][1] < nodes[7]["pos"][1]  # a column in the order of its sources
    assert x[4] >= x[2] + nodes[2]["size"][0] + 90  # a column right of its widest node
    assert min(n["pos"][1] for n in nodes.values()) - gy == 30 + 50  # the group's margin above the title bars


def test_round_trip():
    api = full_api()
    back = api_from_ui(ui_from_api(api, CLASSES), CLASSES)
    assert strip_meta(back) == strip_meta(api)
    assert back["4"]["_meta"]["title"] == "my sampler"
    assert back["1"]["_meta"]["title"] == "Loader"


def test_round_trip_seed_control_choice():
    ui = ui_from_api(full_api(), CLASSES, seed_control="fixed")
    node = next(n for n in ui["nodes"] if n["id"] == 4)
    assert node["widgets_values"][:2] == [123456789012, "fixed"]
    assert strip_meta(api_from_ui(ui, CLASSES)) == strip_meta(full_api())


def test_complete_api_fills_defaults():
    api = full_api()
    sparse = copy.deepcopy(api)
    for name in ("denoise", "noise_seed", "motion", "frame", "weights"):
        del sparse["4"]["inputs"][name]
    done = complete_api(sparse, CLASSES)
    assert done["4"]["inputs"]["denoise"] == 1.0 and done["4"]["inputs"]["noise_seed"] == 5
    assert done["4"]["inputs"]["motion"] == "linear" and done["4"]["inputs"]["weights"] == "[]"
    assert strip_meta(api_from_ui(ui_from_api(sparse, CLASSES), CLASSES)) == strip_meta(done)
    assert "denoise" not in sparse["4"]["inputs"]  # input left untouched


# ----------------------------------------------------------------- frontend-written UI files
def frontend_ui():
    """A graph as the ComfyUI editor saves it, with a muted, a bypassed, a reroute, a primitive and a note."""
    return {
        "last_node_id": 14, "last_link_id": 20,
        "nodes": [
            {"id": 1, "type": "Loader", "pos": [0, 0], "size": [315, 98], "flags": {}, "order": 0, "mode": 0,
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1], "slot_index": 0},
                         {"name": "CLIP", "type": "CLIP", "links": [2, 3], "slot_index": 1},
                         {"name": "VAE", "type": "VAE", "links": None, "slot_index": 2}],
             "properties": {"Node name for S&R": "Loader"}, "widgets_values": ["a.safetensors"]},
            {"id": 2, "type": "Encode", "pos": [400, 0], "size": [400, 200], "flags": {}, "order": 1, "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 2}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
             "properties": {}, "widgets_values": ["a dog"]},
            {"id": 3, "type": "Encode", "pos": [400, 300], "size": [400, 200], "flags": {}, "order": 2, "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5]}],
             "properties": {}, "widgets_values": ["blurry"]},
            {"id": 10, "type": "Reroute", "pos": [800, 0], "size": [75, 26], "flags": {}, "order": 3, "mode": 0,
             "inputs": [{"name": "", "type": "*", "link": 4}],
             "outputs": [{"name": "", "type": "CONDITIONING", "links": [6]}],
             "properties": {"showOutputText": False, "horizontal": False}},
            {"id": 11, "type": "PrimitiveNode", "pos": [0, 400], "size": [210, 82], "flags": {}, "order": 4,
             "mode": 0, "outputs": [{"name": "INT", "type": "INT", "links": [7], "widget": {"name": "steps"}}],
             "properties": {"Run widget replace on values": False}, "widgets_values": [33, "fixed"]},
            {"id": 4, "type": "Sampler", "pos": [900, 0], "size": [315, 400], "flags": {}, "order": 6, "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                        {"name": "positive", "type": "CONDITIONING", "link": 6},
                        {"name": "negative", "type": "CONDITIONING", "link": 5},
                        {"name": "context", "type": "CONTEXT", "link": 12, "shape": 7},
                        {"name": "count", "type": "INT", "link": None, "shape": 7},
                        {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 7}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [8], "slot_index": 0}],
             "properties": {"Node name for S&R": "Sampler"},
             # an odd control value as found in some templates: it is skipped by position
             "widgets_values": [42, True, 33, 8, "euler", 1, 5, "linear", "increment", "", 0, "fixed", "[]"]},
            {"id": 12, "type": "Count", "pos": [500, 600], "size": [315, 58], "flags": {}, "order": 5, "mode": 2,
             "outputs": [{"name": "count", "type": "INT", "links": []},
                         {"name": "ctx", "type": "CONTEXT", "links": [12]}],
             "properties": {}, "widgets_values": [4]},
            {"id": 13, "type": "Passthrough", "pos": [1300, 0], "size": [315, 58], "flags": {}, "order": 7,
             "mode": 4, "inputs": [{"name": "latent", "type": "LATENT", "link": 8}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [9]}],
             "properties": {}, "widgets_values": [0.3]},
            {"id": 5, "type": "Save", "pos": [1700, 0], "size": [315, 58], "flags": {}, "order": 8, "mode": 0,
             "inputs": [{"name": "latent", "type": "LATENT", "link": 9}],
             "properties": {}, "widgets_values": ["vid"]},
            {"id": 14, "type": "Note", "pos": [0, 700], "size": [300, 100], "flags": {}, "order": 9, "mode": 0,
             "properties": {}, "widgets_values": ["remember to pick a checkpoint"]},
        ],
        "links": [[1, 1, 0, 4, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
                  [4, 2, 0, 10, 0, "*"], [5, 3, 0, 4, 2, "CONDITIONING"], [6, 10, 0, 4, 1, "CONDITIONING"],
                  [7, 11, 0, 4, 5, "INT"], [8, 4, 0, 13, 0, "LATENT"], [9, 13, 0, 5, 0, "LATENT"],
                  [12, 12, 1, 4, 3, "CONTEXT"]],
        "groups": [], "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }


def test_api_from_frontend_ui():
    api = api_from_ui(frontend_ui(), CLASSES, display_names=NAMES)
    assert set(api) == {"1", "2", "3", "4", "5"}  # reroute, primitive, note, muted and bypassed dropped
    sampler = api["4"]
    assert sampler["class_type"] == "Sampler"
    assert sampler["_meta"] == {"title": "Video Sampler (Kinema)"}
    assert sampler["inputs"] == {
        "model": ["1", 0],
        "positive": ["2", 0],   # through the reroute
        "negative": ["3", 0],
        # "context" linked to the muted node: removed
        "seed": 42, "steps": 33,  # steps from the primitive
        "cfg": 8, "sampler_name": "euler", "denoise": 1, "noise_seed": 5, "motion": "linear", "frame": 0,
        "weights": "[]",
    }
    assert api["5"]["inputs"] == {"latent": ["4", 0], "filename_prefix": "vid"}  # bypass wired through
    assert api["2"]["inputs"] == {"clip": ["1", 1], "text": "a dog"}


def test_api_from_ui_short_widgets_values_use_defaults():
    ui = ui_from_api(full_api(), CLASSES)
    node = next(n for n in ui["nodes"] if n["id"] == 4)
    node["widgets_values"] = node["widgets_values"][:5]  # an older save, before optional inputs existed
    api = api_from_ui(ui, CLASSES)
    assert api["4"]["inputs"]["denoise"] == 1.0 and api["4"]["inputs"]["frame"] == 0
    assert api["4"]["inputs"]["sampler_name"] == "ddim"


def test_upload_widget_value_is_skipped():
    api = {"1": {"class_type": "LoadPicture", "inputs": {"image": "y.png", "frames": 6, "strength": 0.25}},
           "2": {"class_type": "Save", "inputs": {"latent": ["1", 0], "filename_prefix": "k"}}}
    ui = ui_from_api(api, CLASSES)
    node = next(n for n in ui["nodes"] if n["id"] == 1)
    assert node["widgets_values"] == ["y.png", 6, "image", 0.25]
    assert strip_meta(api_from_ui(ui, CLASSES)) == api


def test_dict_links_and_dict_widget_values():
    ui = frontend_ui()
    ui["links"] = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3],
                    "target_slot": l[4], "type": l[5]} for l in ui["links"]]
    node = next(n for n in ui["nodes"] if n["id"] == 2)
    node["widgets_values"] = {"text": "a bird"}
    api = api_from_ui(ui, CLASSES)
    assert api["2"]["inputs"]["text"] == "a bird"
    assert api["4"]["inputs"]["positive"] == ["2", 0]


def test_errors():
    ui = frontend_ui()
    ui["nodes"][0]["type"] = "Mystery"
    with pytest.raises(KinemaError, match="node 1: unknown node type 'Mystery'"):
        api_from_ui(ui, CLASSES)
    with pytest.raises(KinemaError, match="subgraphs"):
        api_from_ui(dict(frontend_ui(), definitions={"subgraphs": [{"id": "x"}]}), CLASSES)
    with pytest.raises(KinemaError, match="not a UI-format"):
        api_from_ui({"1": {"class_type": "Save"}}, CLASSES)
    bad = full_api()
    bad["4"]["inputs"]["model"] = "a value"
    with pytest.raises(KinemaError, match="MODEL socket and needs a link"):
        ui_from_api(bad, CLASSES)
    cyclic = full_api()
    cyclic["7"]["inputs"]["value"] = ["5", 0]
    cyclic["5"]["inputs"]["filename_prefix"] = ["7", 0]
    with pytest.raises(KinemaError, match="cycle"):
        ui_from_api(cyclic, CLASSES)
    with pytest.raises(KinemaError, match="unknown class_type"):
        ui_from_api({"1": {"class_type": "Nope", "inputs": {}}}, CLASSES)


def test_load_workflow(tmp_path):
    api = full_api()
    p = tmp_path / "a.json"
    p.write_text(json.dumps(api))
    assert load_workflow(str(p)) == (api, None)
    ui = ui_from_api(api, CLASSES)
    p.write_text(json.dumps(ui))
    assert load_workflow(str(p)) == (None, ui)
    p.write_text(json.dumps({"prompt": api, "extra_data": {"extra_pnginfo": {"workflow": ui}}}))
    assert load_workflow(str(p)) == (api, ui)


# -- what the frontend does that a converter must do too --------------------------------------------------------

def _node(ui, node_id):
    return next(n for n in ui["nodes"] if n["id"] == node_id)


def test_a_bypassed_node_passes_on_its_input_of_the_output_type_not_the_first():
    """The frontend resolves a bypassed node's output to its input of the same type: here the second input."""
    ui = frontend_ui()
    _node(ui, 13)["inputs"] = [{"name": "extra", "type": "CONDITIONING", "link": 30},
                               {"name": "latent", "type": "LATENT", "link": 8}]
    ui["links"] = [[8, 4, 0, 13, 1, "LATENT"] if link[0] == 8 else link for link in ui["links"]]
    ui["links"].append([30, 2, 0, 13, 0, "CONDITIONING"])
    assert api_from_ui(ui, CLASSES)["5"]["inputs"]["latent"] == ["4", 0]


def test_a_primitives_value_wins_over_the_one_its_target_stored():
    ui = frontend_ui()
    _node(ui, 11)["widgets_values"] = [44, "fixed"]  # the target still stores its old value
    assert api_from_ui(ui, CLASSES)["4"]["inputs"]["steps"] == 44


def test_a_dict_of_widget_values_without_a_key_takes_the_default():
    ui = frontend_ui()
    _node(ui, 5)["widgets_values"] = {}
    assert api_from_ui(ui, CLASSES)["5"]["inputs"]["filename_prefix"] == "kinema"


def test_a_negative_output_index_is_refused_not_taken_from_the_end():
    api = copy.deepcopy(full_api())
    api["5"]["inputs"]["latent"] = ["4", -1]
    with pytest.raises(KinemaError, match="links to output -1"):
        ui_from_api(api, CLASSES)


def test_json_that_is_no_workflow_is_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(KinemaError, match="not a ComfyUI workflow"):
        load_workflow(str(path))


def test_seed_control_is_for_seeds_a_combos_control_stays_randomize():
    node = _node(ui_from_api(full_api(), CLASSES, seed_control="fixed"), 4)
    values = node["widgets_values"]
    assert values[1] == "fixed" and values[values.index("sqrt") + 1] == "randomize"


class Tags:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tags": (["a", "b", "c"], {"multi_select": True, "control_after_generate": True}),
                             "steps": ("INT", {"default": 20})}}

    RETURN_TYPES = ()
    FUNCTION = "go"


def test_a_multi_select_combo_has_no_control_widget():
    """The frontend makes a multi-select combo its own widget (``addMultiSelectWidget``), with no "control after
    generate" even when the option asks for one: the value after it is the next input's."""
    assert [(s.name, extra) for s, extra in widget_specs(input_specs(Tags))] == [("tags", 0), ("steps", 0)]
    ui = {"nodes": [{"id": 1, "type": "Tags", "mode": 0, "widgets_values": [["a", "c"], 30]}], "links": []}
    assert api_from_ui(ui, {"Tags": Tags})["1"]["inputs"] == {"tags": {"__value__": ["a", "c"]}, "steps": 30}


def _bypassed_graph(inputs, consumer_type="LATENT", output_type="LATENT"):
    """Loader-like sources 1 (LATENT) and 2 (IMAGE) into a bypassed node 3 whose output 0 feeds Save 4.
    ``inputs``: the bypassed node's input slots as (type, source node)."""
    links, slots = [[9, 3, 0, 4, 0, consumer_type]], []
    for i, (typ, src) in enumerate(inputs):
        links.append([10 + i, src, 0, 3, i, typ])
        slots.append({"name": f"in{i}", "type": typ, "link": 10 + i})
    nodes = [
        {"id": 1, "type": "Src", "mode": 0, "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}]},
        {"id": 2, "type": "Src", "mode": 0, "outputs": [{"name": "LATENT", "type": "LATENT", "links": []}]},
        {"id": 3, "type": "Any", "mode": 4, "inputs": slots,
         "outputs": [{"name": "out", "type": output_type, "links": [9]}]},
        {"id": 4, "type": "Save", "mode": 0, "inputs": [{"name": "latent", "type": consumer_type, "link": 9}],
         "widgets_values": ["v"]},
    ]
    return {"nodes": nodes, "links": links, "version": 0.4}


class Src:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "go"


class Any:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {f"in{i}": ("*",) for i in range(3)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "go"


@pytest.mark.parametrize("inputs, consumer_type, output_type, source", [
    ([("*", 1)], "LATENT", "LATENT", "1"),                       # a wildcard input connects to anything
    ([("IMAGE,LATENT", 1)], "LATENT", "LATENT", "1"),            # a type list connects to a member
    ([("latent", 1)], "LATENT", "LATENT", "1"),                  # without case
    ([("IMAGE", 2), ("LATENT", 1)], "LATENT", "LATENT", "1"),    # not the output's index: the exact type's
    ([("*", 2), ("LATENT", 1)], "LATENT", "LATENT", "2"),        # the output's index first when it connects
    ([("IMAGE", 2), ("*", 1)], "LATENT", "LATENT", "1"),         # else the first that connects
    ([("IMAGE", 2), ("MASK", 1)], "LATENT", "LATENT", None),     # none: the input is not sent
    ([("IMAGE", 2), ("LATENT", 1)], "*", "LATENT", "2"),         # a wildcard consumer takes the output's index
    ([("IMAGE", 2), ("LATENT", 1)], "", "LATENT", "2"),          # so does an untyped one
    ([("", 1)], "LATENT", "LATENT", "1"),                        # an untyped input connects to anything
    ([("IMAGE", 2), ("*", 2), ("LATENT", 1)], "LATENT", "LATENT", "1"),  # the exact type before a wildcard
    ([("LATENT", 1), ("IMAGE", 2)], "LATENT,IMAGE", "IMAGE", "2"),  # the output's index: its input fits the output
])
def test_a_bypassed_node_is_resolved_as_the_frontend_resolves_it(inputs, consumer_type, output_type, source):
    """The frontend's ``getBypassSlotIndex`` with LiteGraph's connection rule: the bypassed node's input of the
    output's index if it connects to the output's type and the consumer's, else the first of the consumer's exact
    type, else the first that connects to both; none, and the consumer's input is not sent."""
    classes = {"Src": Src, "Any": Any, "Save": Save}
    api = api_from_ui(_bypassed_graph(inputs, consumer_type, output_type), classes)
    assert api["4"]["inputs"].get("latent") == (None if source is None else [source, 0])


def test_dict_links_keep_their_origin_slot():
    """Links saved as objects (newer frontends) name the source output by ``origin_slot``: the clip comes from the
    loader's output 1, not its first output."""
    ui = frontend_ui()
    ui["links"] = [{"id": l[0], "origin_id": l[1], "origin_slot": l[2], "target_id": l[3],
                    "target_slot": l[4], "type": l[5]} for l in ui["links"]]
    api = api_from_ui(ui, CLASSES)
    assert api["2"]["inputs"]["clip"] == ["1", 1] and api["3"]["inputs"]["clip"] == ["1", 1]
    assert api["4"]["inputs"]["model"] == ["1", 0]


class NoiseSeed:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise_seed": ("INT", {"default": 0}), "steps": ("INT", {"default": 20})}}

    RETURN_TYPES = ()
    FUNCTION = "go"


def test_noise_seed_without_the_option_has_a_control_widget():
    """The frontend gives an INT named ``noise_seed`` (like ``seed``) a "control after generate" widget when the
    option is absent: the value after the seed is the control's, not the next input's."""
    assert [(s.name, extra) for s, extra in widget_specs(input_specs(NoiseSeed))] == [("noise_seed", 1), ("steps", 0)]
    ui = {"nodes": [{"id": 1, "type": "NoiseSeed", "mode": 0, "widgets_values": [5, "randomize", 7]}], "links": []}
    assert api_from_ui(ui, {"NoiseSeed": NoiseSeed})["1"]["inputs"] == {"noise_seed": 5, "steps": 7}


class LoadClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": (["a.mp4", "b.mp4"], {"video_upload": True})},
                "optional": {"fps": ("FLOAT", {"default": 8.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "go"


class MaybePicture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 1})},
                "optional": {"image": (["x.png", "y.png"], {"image_upload": True}),
                             "strength": ("FLOAT", {"default": 0.5})}}

    RETURN_TYPES = ()
    FUNCTION = "go"


@pytest.mark.parametrize("cls, values, widgets, inputs", [
    # a video upload combo gets the upload button after the required inputs, like an image one
    (LoadClip, ["b.mp4", "image", 12.0], ["video", "upload", "fps"], {"video": "b.mp4", "fps": 12.0}),
    # an optional upload combo gets none: the button is added for required ones only
    (MaybePicture, [2, "y.png", 0.7], ["frames", "image", "strength"], {"frames": 2, "image": "y.png",
                                                                        "strength": 0.7}),
])
def test_an_upload_button_follows_a_required_upload_combo_of_any_kind(cls, values, widgets, inputs):
    assert [s.name if s else "upload" for s, _ in widget_specs(input_specs(cls))] == widgets
    ui = {"nodes": [{"id": 1, "type": cls.__name__, "mode": 0, "widgets_values": values}], "links": []}
    assert api_from_ui(ui, {cls.__name__: cls})["1"]["inputs"] == inputs


def test_the_users_title_wins_over_the_display_name():
    """A node the user renamed is sent under its title; an unnamed one under the pack's display name."""
    ui = frontend_ui()
    _node(ui, 4)["title"] = "my sampler"
    assert api_from_ui(ui, CLASSES, display_names=NAMES)["4"]["_meta"] == {"title": "my sampler"}


def test_a_title_equal_to_the_display_name_is_not_written():
    """``ui_from_api`` writes a node's title only when it differs from what the editor shows anyway (the display
    name, else the class name); the round trip still sends the display name."""
    api = full_api()
    api["4"]["_meta"]["title"] = "Video Sampler (Kinema)"
    ui = ui_from_api(api, CLASSES, display_names=NAMES)
    assert "title" not in _node(ui, 4)
    assert api_from_ui(ui, CLASSES, display_names=NAMES)["4"]["_meta"] == {"title": "Video Sampler (Kinema)"}


def test_non_numeric_api_ids_get_fresh_ui_ids_past_the_numeric_ones():
    """Numeric API ids are kept as UI ids; others get new numbers above the largest, never one already taken."""
    api = {"1": {"class_type": "LoadPicture", "inputs": {"image": "x.png", "frames": 4, "strength": 0.5}},
           "3": {"class_type": "Passthrough", "inputs": {"latent": ["1", 0], "amount": 0.0}},
           "save": {"class_type": "Save", "inputs": {"latent": ["3", 0], "filename_prefix": "k"}}}
    ui = ui_from_api(api, CLASSES)
    assert sorted(n["id"] for n in ui["nodes"]) == [1, 3, 4] and ui["last_node_id"] == 4
    assert _node(ui, 4)["type"] == "Save"
    assert ui["links"] == [[1, 1, 0, 3, 0, "LATENT"], [2, 3, 0, 4, 0, "LATENT"]]


def test_check_value_refuses_a_bool_for_an_int_and_takes_the_bounds():
    """JSON ``true`` is no integer (Python's bool is an int); ``min`` and ``max`` are allowed values themselves."""
    from kinema.nodes.workflow_format import check_value

    spec = input_specs(Sampler)[2]
    assert (spec.name, spec.opts["min"], spec.opts["max"]) == ("steps", 1, 100)
    with pytest.raises(ValueError, match="expected an integer, got bool True"):
        check_value(spec, True, False)
    assert check_value(spec, 100, True) == 100 and check_value(spec, 100.0, True) == 100
    assert check_value(spec, 1, True) == 1


def test_an_unknown_seed_control_is_refused():
    with pytest.raises(KinemaError, match="seed_control must be one of .* not 'bogus'"):
        ui_from_api(full_api(), CLASSES, seed_control="bogus")


def test_a_primitives_list_value_is_sent_wrapped():
    """A list value is sent as ``{"__value__": [...]}`` (the server would read a bare list as a link), from a
    primitive node as from a widget."""
    ui = frontend_ui()
    _node(ui, 11)["widgets_values"] = [[1, 2], "fixed"]
    assert api_from_ui(ui, CLASSES)["4"]["inputs"]["steps"] == {"__value__": [1, 2]}


def test_a_pair_ending_in_a_bool_is_not_a_link():
    """``[id, true]`` is a value, not a link to output 1: given to a socket it is refused as a value."""
    api = full_api()
    api["2"]["inputs"]["clip"] = ["1", True]
    with pytest.raises(KinemaError, match="input 'clip' is a CLIP socket and needs a link, not a value"):
        ui_from_api(api, CLASSES)
    assert not _is_link(["1", 1, 0])  # three items: a value
    assert _id_key("-2") < _id_key("1")  # negative node ids (the frontend's virtual nodes) are numbers too


def test_a_linked_input_the_node_no_longer_has_is_dropped():
    """A saved graph can keep a linked input slot that the node class no longer declares: it is not sent."""
    ui = frontend_ui()
    _node(ui, 2)["inputs"].append({"name": "old_input", "type": "CLIP", "link": 3})
    assert api_from_ui(ui, CLASSES)["2"]["inputs"] == {"clip": ["1", 1], "text": "a dog"}


class LoadAnimation:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["a.webp", "b.gif"], {"animated_image_upload": True})},
                "optional": {"fps": ("FLOAT", {"default": 8.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "go"


def test_an_animated_image_upload_combo_gets_the_upload_button_too():
    """``animated_image_upload`` adds the upload button like ``image_upload``: its value is skipped, not read as
    the next input's."""
    assert [s.name if s else "upload" for s, _ in widget_specs(input_specs(LoadAnimation))] == ["image", "upload",
                                                                                               "fps"]
    ui = {"nodes": [{"id": 1, "type": "LoadAnimation", "mode": 0, "widgets_values": ["b.gif", "image", 12.0]}],
          "links": []}
    assert api_from_ui(ui, {"LoadAnimation": LoadAnimation})["1"]["inputs"] == {"image": "b.gif", "fps": 12.0}


SHARED_DEFAULT = [1, 2]


class ListDefault:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("FLOAT", {"default": SHARED_DEFAULT})}}

    RETURN_TYPES = ()
    FUNCTION = "go"


def test_a_list_default_is_sent_wrapped_and_copied():
    """A list default is filled in wrapped (a bare list would be read as a link), and editing it leaves the
    class's default (a list kept at module level) as it was."""
    api = complete_api({"1": {"class_type": "ListDefault", "inputs": {}}}, {"ListDefault": ListDefault})
    assert api["1"]["inputs"]["values"] == {"__value__": [1, 2]}
    api["1"]["inputs"]["values"]["__value__"].append(3)
    assert SHARED_DEFAULT == [1, 2]


def test_a_bypassed_output_past_the_inputs_falls_back_to_the_first_input_for_a_wildcard_consumer():
    """A wildcard consumer of a bypassed node's output 1 gets the node's input 0 when it has no input 1 (the
    frontend's ``getBypassSlotIndex``)."""
    ui = _bypassed_graph([("LATENT", 1)], consumer_type="*")
    ui["links"][0][2] = 1  # link 9 leaves node 3 from its output 1
    ui["nodes"][2]["outputs"] = [{"name": "a", "type": "LATENT", "links": []},
                                 {"name": "b", "type": "LATENT", "links": [9]}]
    api = api_from_ui(ui, {"Src": Src, "Any": Any, "Save": Save})
    assert api["4"]["inputs"]["latent"] == ["1", 0]


def test_a_wildcard_socket_may_hold_a_value():
    """A ``*`` input takes a literal (as the runner passes it on), so it is not refused as a socket without a
    link."""
    ui = ui_from_api({"1": {"class_type": "Any", "inputs": {"in0": 5}}}, {"Any": Any})
    assert [(i["name"], i["link"]) for i in ui["nodes"][0]["inputs"]] == [("in0", None), ("in1", None), ("in2", None)]


def test_dump_workflow_writes_utf8_with_a_trailing_newline(tmp_path):
    """As the frontend saves a file: indented by 2, non-ASCII text as it is, a newline at the end."""
    from kinema.nodes.workflow_format import dump_workflow

    path = tmp_path / "w.json"
    dump_workflow({"title": "café"}, str(path))
    assert path.read_bytes() == '{\n  "title": "café"\n}\n'.encode()


@pytest.mark.parametrize("damage,pattern", [
    (lambda ui: ui["nodes"].__setitem__(0, 5), r"nodes\[0\] of the workflow is not a node object with an 'id'"),
    (lambda ui: ui["nodes"][0].pop("id"), r"nodes\[0\] of the workflow is not a node object with an 'id'"),
    (lambda ui: ui["nodes"][1].__setitem__("inputs", ["clip"]), r"node 2: 'inputs' is not a list of slot objects"),
    (lambda ui: ui["nodes"][0].__setitem__("widgets_values", 5), r"node 1: 'widgets_values' is not a list"),
    (lambda ui: ui["links"].__setitem__(0, [1, 1]), r"links\[0\] of the workflow is not a link"),
    (lambda ui: ui["links"].__setitem__(0, {"id": 1, "origin_id": 1}), r"links\[0\] of the workflow is not a link"),
    (lambda ui: ui.__setitem__("links", {"1": [1, 1, 0, 2, 0, "CLIP"]}), r"'links' is not a list of links"),
])
def test_a_damaged_ui_workflow_is_a_kinema_error_naming_the_entry(damage, pattern):
    ui = frontend_ui()
    damage(ui)
    with pytest.raises(KinemaError, match=pattern + ".*save it again"):
        api_from_ui(ui, CLASSES)
