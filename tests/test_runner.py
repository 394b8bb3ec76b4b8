"""The headless runner on tiny fake node classes (no ComfyUI, no real nodes needed)."""
import json
import os
import subprocess
import sys
import types

import pytest

import kinema.nodes
from kinema.models.errors import KinemaError
from kinema.nodes import runner
from kinema.nodes.runner import run_prompt, validate_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = []


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 1, "min": 0, "max": 100})}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "make"

    def make(self, value):
        CALLS.append(("Number", value))
        return (value,)


class Add:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("NUMBER",), "b": ("NUMBER",)},
                "optional": {"scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("NUMBER", "STRING")
    RETURN_NAMES = ("sum", "text")
    FUNCTION = "add"

    def add(self, a, b, scale=1.0):
        CALLS.append(("Add", a, b))
        return (a * scale + b, f"{a}+{b}")


class Options:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",), "mode": (["sum", "max"],), "flag": ("BOOLEAN", {"default": True}),
                             "label": ("STRING", {"default": ""}),
                             "frames": ("INT", {"default": 8, "min": 1, "max": 64})}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "go"

    def go(self, x, mode, flag, label, frames):
        CALLS.append(("Options", mode, flag, label, frames))
        return (x,)


class Sink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",), "prefix": ("STRING", {"default": "out"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    seen = []

    def save(self, x, prefix, prompt=None, extra_pnginfo="unset", unique_id=None):
        CALLS.append(("Sink", x))
        Sink.seen.append({"prompt": prompt, "extra_pnginfo": extra_pnginfo, "unique_id": unique_id})
        return {"ui": {"images": [{"filename": f"{prefix}_{x}.png", "subfolder": "sub", "type": "output"}]}}


class AnySink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"anything": ("*",)}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "take"
    OUTPUT_NODE = True

    def take(self, anything):
        return (anything,)


class Boom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("NUMBER",), "kind": (["value", "kinema"],)}}

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "explode"

    def explode(self, x, kind):
        if kind == "kinema":
            raise KinemaError("the motion module does not fit this checkpoint")
        raise ValueError("bad value")


class Picky:
    """A class with its own VALIDATE_INPUTS, which takes over the range check of `value` and the list of `mode`
    (as Load Video (Kinema) for a file uploaded after the list was read)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10}), "src": ("NUMBER",)},
                "optional": {"mode": (["up", "down"],)}}

    @classmethod
    def VALIDATE_INPUTS(cls, value, src, mode="up"):
        Picky.validated = (value, src)
        return True if value != 13 else "13 is unlucky"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "go"

    def go(self, value, src, mode="up"):
        return (value + src,)


CLASSES = {c.__name__: c for c in (Number, Add, Options, Sink, AnySink, Boom, Picky)}


def base_prompt():
    return {
        "1": {"class_type": "Number", "inputs": {"value": 2}, "_meta": {"title": "two"}},
        "2": {"class_type": "Number", "inputs": {"value": 3}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": ["1", 0], "scale": 2}},
        "5": {"class_type": "Sink", "inputs": {"x": ["4", 0], "prefix": "clip"}},
        # not feeding an output: must not run
        "6": {"class_type": "Number", "inputs": {"value": 99}},
        "7": {"class_type": "Add", "inputs": {"a": ["6", 0], "b": ["6", 0]}},
    }


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    Sink.seen.clear()
    yield


def run(prompt, **kw):
    kw.setdefault("progress", False)
    return run_prompt(prompt, CLASSES, **kw)


# ----------------------------------------------------------------- execution
def test_runs_outputs_and_dependencies_once_in_order():
    out = run(base_prompt())
    assert set(out) == {"5"}
    assert out["5"]["result"] == ()
    assert out["5"]["ui"]["images"][0]["filename"] == "clip_12.0.png"  # (2+3)*2 + 2
    names = [c[0] for c in CALLS]
    assert names.count("Number") == 2 and ("Number", 99) not in CALLS  # node 6/7 never run
    assert names.count("Add") == 2 and names[-1] == "Sink"
    assert names.index("Add") > max(i for i, n in enumerate(names) if n == "Number")


def test_outputs_only_false_returns_every_executed_node():
    out = run(base_prompt(), outputs_only=False)
    assert set(out) == {"1", "2", "3", "4", "5"}
    assert out["3"]["result"] == (5, "2+3")
    assert out["1"]["ui"] is None


def test_shared_source_runs_once():
    p = {"1": {"class_type": "Number", "inputs": {"value": 4}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
         "3": {"class_type": "Sink", "inputs": {"x": ["2", 0], "prefix": "a"}},
         "4": {"class_type": "Sink", "inputs": {"x": ["1", 0], "prefix": "b"}}}
    out = run(p)
    assert set(out) == {"3", "4"}
    assert CALLS.count(("Number", 4)) == 1
    assert [c[0] for c in CALLS].count("Sink") == 2


def test_hidden_inputs():
    p = base_prompt()
    run(p)
    seen = Sink.seen[0]
    assert seen["prompt"] is p and seen["unique_id"] == "5" and seen["extra_pnginfo"] is None
    wf = {"nodes": [], "links": []}
    run(p, workflow=wf)
    assert Sink.seen[1]["extra_pnginfo"] == {"workflow": wf}


def test_unknown_inputs_are_ignored_and_optional_may_be_missing():
    p = base_prompt()
    p["3"]["inputs"]["not_an_input"] = 123
    out = run(p)
    assert "5" in out


def test_values_are_converted_like_comfyui():
    p = {"1": {"class_type": "Number", "inputs": {"value": 3.0}},
         "2": {"class_type": "Options", "inputs": {"x": ["1", 0], "mode": "max", "flag": False,
                                                    "label": "hi", "frames": {"__value__": 16}}},
         "3": {"class_type": "Sink", "inputs": {"x": ["2", 0], "prefix": "p"}}}
    run(p)
    assert ("Number", 3) in CALLS and isinstance(CALLS[0][1], int)
    assert ("Options", "max", False, "hi", 16) in CALLS


def test_star_input_accepts_any_type():
    p = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},
         "2": {"class_type": "Number", "inputs": {"value": 1}},
         "3": {"class_type": "AnySink", "inputs": {"anything": ["1", 1]}}}
    assert run(p)["3"]["result"] == ("1+1",)


def test_validate_inputs_and_is_changed_need_nothing_special():
    p = {"1": {"class_type": "Number", "inputs": {"value": 1}},
         "2": {"class_type": "Picky", "inputs": {"value": 50, "src": ["1", 0]}},  # 50 > max: Picky decides
         "3": {"class_type": "Sink", "inputs": {"x": ["2", 0], "prefix": "p"}}}
    assert run(p)["3"]["ui"]["images"][0]["filename"] == "p_51.png"
    assert Picky.validated == (50, None)
    p["2"]["inputs"]["mode"] = "sideways"  # not in the list: Picky decides
    assert run(p)["3"]["ui"]["images"][0]["filename"] == "p_51.png"
    p["2"]["inputs"]["value"] = 13
    with pytest.raises(KinemaError, match=r"node 2 \(Picky\).*13 is unlucky"):
        run(p)


# ----------------------------------------------------------------- validation
def expect_error(prompt, pattern):
    with pytest.raises(KinemaError, match=pattern):
        run(prompt)
    assert not CALLS, "nothing may run when validation fails"


def test_unknown_class():
    p = base_prompt()
    p["3"]["class_type"] = "Nope"
    expect_error(p, r"node 3 \(Nope\): unknown class_type 'Nope'")


def test_missing_required_input():
    p = base_prompt()
    del p["3"]["inputs"]["b"]
    expect_error(p, r"node 3 \(Add\): input 'b': required input is missing")


def test_link_to_missing_node():
    p = base_prompt()
    p["3"]["inputs"]["b"] = ["42", 0]
    expect_error(p, r"node 3 \(Add\): input 'b': links to node 42, which is not in the prompt")


def test_link_output_index_out_of_range():
    p = base_prompt()
    p["4"]["inputs"]["a"] = ["3", 2]
    expect_error(p, r"node 4 \(Add\): input 'a': links to output 2 of node 3 \(Add\), which has 2 outputs")


def test_link_type_mismatch():
    p = base_prompt()
    p["4"]["inputs"]["a"] = ["3", 1]  # STRING into NUMBER
    expect_error(p, r"node 4 \(Add\): input 'a': expects NUMBER, but output 1 of node 3 \(Add\) is STRING")


def test_bad_link_shape():
    p = base_prompt()
    p["4"]["inputs"]["a"] = ["3", 0, 1]
    expect_error(p, r"node 4 \(Add\): input 'a': a link must be")


def test_value_for_a_socket_input():
    p = base_prompt()
    p["4"]["inputs"]["a"] = 5
    expect_error(p, r"node 4 \(Add\): input 'a': expects a link from a NUMBER output")


@pytest.mark.parametrize("name,value,pattern", [
    ("mode", "median", r"input 'mode': 'median' is not one of \['sum', 'max'\]"),
    ("frames", 0, r"input 'frames': 0 is smaller than the minimum 1"),
    ("frames", 65, r"input 'frames': 65 is bigger than the maximum 64"),
    ("frames", 2.5, r"input 'frames': expected an integer, got 2.5"),
    ("frames", "8", r"input 'frames': expected an integer, got str"),
    ("flag", "true", r"input 'flag': expected true or false"),
    ("label", 5, r"input 'label': expected a string, got int"),
])
def test_widget_values_are_checked(name, value, pattern):
    p = {"1": {"class_type": "Number", "inputs": {"value": 1}},
         "2": {"class_type": "Options", "inputs": {"x": ["1", 0], "mode": "sum", "flag": True,
                                                    "label": "", "frames": 8}},
         "3": {"class_type": "Sink", "inputs": {"x": ["2", 0], "prefix": "p"}}}
    p["2"]["inputs"][name] = value
    expect_error(p, r"node 2 \(Options\): " + pattern)


def test_float_range_and_type():
    p = base_prompt()
    p["4"]["inputs"]["scale"] = 11
    expect_error(p, r"node 4 \(Add\): input 'scale': 11.0 is bigger than the maximum 10.0")
    p["4"]["inputs"]["scale"] = True
    expect_error(p, r"node 4 \(Add\): input 'scale': expected a number")


def test_nodes_outside_the_outputs_are_validated_too():
    p = base_prompt()
    p["6"]["inputs"]["value"] = 1000
    expect_error(p, r"node 6 \(Number\): input 'value': 1000 is bigger than the maximum 100")


def test_cycle():
    p = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
         "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["3", 0]}},
         "3": {"class_type": "Number", "inputs": {"value": 1}},
         "4": {"class_type": "Sink", "inputs": {"x": ["2", 0], "prefix": "p"}}}
    expect_error(p, r"cycle: 1 \(Add\) -> 2 \(Add\) -> 1 \(Add\)")


def test_no_output_node():
    p = base_prompt()
    del p["5"]
    expect_error(p, r"no output node")


def test_not_a_prompt():
    with pytest.raises(KinemaError, match="no class_type"):
        run({"1": {"inputs": {}}})
    with pytest.raises(KinemaError, match="empty"):
        run({})


def test_validate_prompt_returns_plan():
    plan = validate_prompt(base_prompt(), CLASSES)
    assert plan["4"].links == {"a": ("3", 0), "b": ("1", 0)}
    assert plan["4"].literals == {"scale": 2.0}


# ----------------------------------------------------------------- errors inside nodes
@pytest.mark.parametrize("kind,message", [
    ("value", "node 3 (Boom): ValueError: bad value"),
    ("kinema", "node 3 (Boom): the motion module does not fit this checkpoint"),
])
def test_errors_inside_nodes_are_wrapped(kind, message):
    p = {"1": {"class_type": "Number", "inputs": {"value": 1}},
         "3": {"class_type": "Boom", "inputs": {"x": ["1", 0], "kind": kind}},
         "4": {"class_type": "Sink", "inputs": {"x": ["3", 0], "prefix": "p"}}}
    with pytest.raises(KinemaError) as info:
        run(p)
    assert str(info.value) == message
    assert isinstance(info.value.__cause__, ValueError if kind == "value" else KinemaError)
    assert ("Sink", 1) not in CALLS


def test_progress_goes_to_stderr(capsys):
    run(base_prompt(), progress=True)
    err = capsys.readouterr().err
    assert "node 5 (Sink)" in err and "1/5" in err


# ----------------------------------------------------------------- command line
@pytest.fixture
def cli(monkeypatch, tmp_path):
    """main() with the fake classes and a fake host adapter."""
    host = types.SimpleNamespace(calls=[])
    host.set_models_dir = lambda p: host.calls.append(("models", p))
    host.set_output_dir = lambda p: host.calls.append(("output", p))
    host.get_output_dir = lambda: str(tmp_path / "default_out")
    monkeypatch.setitem(sys.modules, "kinema.nodes.host", host)
    monkeypatch.setattr(kinema.nodes, "host", host, raising=False)
    monkeypatch.setattr(runner, "_registry", lambda classes: CLASSES if classes is None else classes)
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(base_prompt()))
    return host, path


def test_main_runs_and_prints_files(cli, tmp_path, capsys):
    host, path = cli
    models = tmp_path / "models"
    models.mkdir()
    out_dir = tmp_path / "out"
    rc = runner.main([str(path), "--models-dir", str(models), "--output-dir", str(out_dir), "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert host.calls == [("models", str(models)), ("output", str(out_dir))]
    assert os.path.join(str(out_dir), "sub", "clip_12.0.png") in captured.out
    assert captured.err == ""


def test_main_default_output_dir_and_set(cli, tmp_path, capsys):
    host, path = cli
    rc = runner.main([str(path), "--set", "1.value=5", "--set", "5.prefix=7", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # (5+3)*2 + 5 = 21; "7" stays a string for a STRING input
    assert os.path.join(str(tmp_path / "default_out"), "sub", "7_21.0.png") in captured.out


def test_main_ui_format_workflow(cli, tmp_path, capsys):
    from kinema.nodes.workflow_format import ui_from_api
    host, _ = cli
    ui = ui_from_api(base_prompt(), CLASSES)
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui))
    rc = runner.main([str(path), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert Sink.seen[0]["extra_pnginfo"]["workflow"]["nodes"]


def test_main_print_api(cli, capsys):
    _, path = cli
    assert runner.main([str(path), "--print-api", "--set", "2.value=9"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["2"]["inputs"]["value"] == 9
    assert not CALLS


@pytest.mark.parametrize("args,pattern", [
    (["--set", "9.value=1"], "no node 9"),
    (["--set", "1.nope=1"], "has no input 'nope'"),
    (["--set", "1value"], "expected NODE_ID.INPUT=VALUE"),
    (["--set", "1.value=1000"], r"node 1 \(Number\): input 'value': 1000 is bigger"),
])
def test_main_errors_exit_1_without_traceback(cli, capsys, args, pattern):
    import re
    _, path = cli
    rc = runner.main([str(path), "-q"] + args)
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert "Traceback" not in err


def test_main_ctrl_c_exits_1(cli, capsys, monkeypatch):
    _, path = cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_prompt", interrupted)
    assert runner.main([str(path), "-q"]) == 1
    assert "error: interrupted" in capsys.readouterr().err


def test_output_types_match_any_of_a_comma_list():
    assert runner._types_match("IMAGE,MASK", "MASK") and runner._types_match("MASK", "IMAGE, MASK")
    assert not runner._types_match("INT", "FLOAT") and not runner._types_match("IMAGE,MASK", "LATENT")


def test_main_verbose_prints_traceback(cli, capsys):
    _, path = cli
    assert runner.main([str(path), "-q", "-v", "--set", "1.value=1000"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_main_missing_file(cli, tmp_path, capsys):
    assert runner.main([str(tmp_path / "missing.json")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_script_entry_bootstraps_the_package(tmp_path):
    """`python nodes/runner.py ...` works from any directory without installing the pack."""
    script = os.path.join(ROOT, "nodes", "runner.py")
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--models-dir" in r.stdout and "--set" in r.stdout
    r = subprocess.run([sys.executable, script, str(tmp_path / "missing.json")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_model_names_the_folders_searched(host_dirs):
    from conftest import load_pack

    prompt = {"1": {"class_type": "KinemaCheckpointLoader",
                    "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors", "precision": "auto"}}}
    with pytest.raises(KinemaError, match=r"node 1 \(KinemaCheckpointLoader\): input 'ckpt_name': checkpoints model "
                                          r"'v1-5-pruned-emaonly.safetensors' not found. Searched: .*Put the file"):
        validate_prompt(prompt, load_pack().NODE_CLASS_MAPPINGS)


def test_demo_models_leave_malformed_entries_to_validation(host_dirs, capsys):
    from conftest import load_pack

    classes = load_pack().NODE_CLASS_MAPPINGS
    for prompt in ({"1": {"class_type": "KinemaCheckpointLoader", "inputs": None}}, {"foo": 1}):
        assert runner.use_demo_models(prompt, classes, host_dirs) == []
        with pytest.raises(KinemaError, match="required input is missing|no class_type"):
            validate_prompt(prompt, classes)


def test_the_output_folder_is_made_only_for_a_workflow_that_reads(cli, tmp_path, capsys):
    out = tmp_path / "made"
    assert runner.main([str(tmp_path / "missing.json"), "--output-dir", str(out), "-q"]) == 1
    assert "cannot read" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("x")
    assert runner.main([str(cli[1]), "--output-dir", str(tmp_path / "file"), "-q"]) == 1
    assert "a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("kind, name, stand_in", [
    ("checkpoints", "svd_xt.safetensors", "svd_xt"),
    ("checkpoints", "SVD/svd_xt_1_1.safetensors", "svd_xt"),
    ("checkpoints", "stableVideoDiffusion_img2vidXt11.safetensors", "svd_xt"),
    ("checkpoints", "svd.safetensors", "svd"),
    ("checkpoints", "svd_image_decoder.safetensors", "svd"),
    ("checkpoints", "v1-5-pruned-emaonly.safetensors", "sd15"),
    ("animatediff_models", "v3_sd15_mm.ckpt", "v3"),
    ("animatediff_models", "mm_sd_v15_v2.ckpt", "v2"),
    ("animatediff_models", "mm_sd_v15.ckpt", "v1"),
    ("animatediff_models", "mm_sd_v14.ckpt", "v1"),
    ("animatediff_models", "animatediff_v1.5.ckpt", "v1"),
    ("animatediff_models", "some_finetune.safetensors", "v2"),
    ("clip_vision", "(none)", None),
    ("clip_vision", "clip_vision_h.safetensors", "clip_vision"),
    ("upscale_models", "4x.pth", None),
])
def test_demo_stand_ins_keep_the_model_kind_and_version(kind, name, stand_in):
    """The headless runner's demo models: an SVD checkpoint gets the demo SVD of the variant its name gives (the
    loader reads the variant from the name), a motion module the demo module of its version, a clip_vision choice
    "(none)" stays unset."""
    from kinema.models import demo

    files = {"svd_xt": demo.DEMO_SVD["svd_xt"], "svd": demo.DEMO_SVD["svd"], "sd15": demo.DEMO_CHECKPOINT,
             "clip_vision": demo.DEMO_CLIP_VISION, **{v: demo.DEMO_MOTION[v] for v in ("v1", "v2", "v3")}, None: None}
    assert demo.substitute(kind, name) == files[stand_in]


def test_main_set_keeps_text_after_the_first_equals_sign_and_combo_values_as_text(cli, tmp_path, capsys):
    """--set splits at the FIRST '=' (a value may itself hold '='), and a list (combo) input keeps the text as
    given even when it parses as JSON (``null``, ``5``), as a STRING input does."""
    _, path = cli
    prompt = base_prompt()
    prompt["8"] = {"class_type": "Options", "inputs": {"x": ["1", 0], "mode": "sum", "flag": True, "label": "",
                                                       "frames": 8}}
    path.write_text(json.dumps(prompt))
    rc = runner.main([str(path), "--print-api", "--set", "5.prefix=a=b", "--set", "8.mode=null",
                      "--set", "8.label=5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    printed = json.loads(captured.out)
    assert printed["5"]["inputs"]["prefix"] == "a=b"
    assert printed["8"]["inputs"]["mode"] == "null"
    assert printed["8"]["inputs"]["label"] == "5"


def test_main_usage_errors_exit_1(cli, capsys):
    """An unknown option or a missing workflow argument is a usage error: status 1 (argparse's message on
    stderr), while --help is status 0."""
    assert runner.main(["--no-such-option"]) == 1
    assert runner.main([]) == 1
    assert "usage:" in capsys.readouterr().err


def test_main_models_dir_that_is_not_a_folder_is_refused_before_anything_runs(cli, tmp_path, capsys):
    """--models-dir naming no folder: status 1, a message naming the option and the path, the host untouched
    and no node run."""
    host, path = cli
    missing = tmp_path / "no_models"
    assert runner.main([str(path), "--models-dir", str(missing), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --models-dir ") and str(missing) in err and "not a directory" in err
    assert host.calls == [] and not CALLS


def test_main_print_api_neither_makes_nor_sets_the_output_folder(cli, tmp_path, capsys):
    """--print-api only prints the prompt: an --output-dir given with it is not created nor handed to the host."""
    host, path = cli
    out = tmp_path / "not_made"
    assert runner.main([str(path), "--print-api", "--output-dir", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["5"]["class_type"] == "Sink"
    assert not out.exists() and ("output", str(out)) not in host.calls
    assert runner.main([str(path), "--output-dir", str(out), "-q"]) == 0  # a run makes it and hands it on
    assert out.is_dir() and ("output", str(out)) in host.calls


def test_main_falls_back_to_demo_models_only_when_no_models_folder_is_configured(cli, tmp_path, capsys,
                                                                                 monkeypatch):
    """The demo-model fallback runs (its notes on stderr, not stdout) only with no --models-dir, no
    KINEMA_MODELS_DIR and outside ComfyUI; any of those configured and the prompt is run as written."""
    host, path = cli
    models = tmp_path / "models"
    models.mkdir()
    seen = []

    def fake_demo(prompt, node_classes, h):
        seen.append(h)
        return ["demo note"]

    monkeypatch.setattr(runner, "use_demo_models", fake_demo)
    monkeypatch.delenv("KINEMA_MODELS_DIR", raising=False)
    assert runner.main([str(path), "-q"]) == 0
    captured = capsys.readouterr()
    assert seen == [host] and "demo note" in captured.err and "demo note" not in captured.out
    seen.clear()
    assert runner.main([str(path), "-q", "--models-dir", str(models)]) == 0
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(models))
    assert runner.main([str(path), "-q"]) == 0
    monkeypatch.delenv("KINEMA_MODELS_DIR")
    host.IN_COMFYUI = True
    assert runner.main([str(path), "-q"]) == 0
    assert seen == []


def test_main_prints_temp_files_under_the_hosts_temp_folder_not_the_output_dir(cli, tmp_path, capsys,
                                                                                monkeypatch):
    """A file an output node reports with type "temp" (a preview) is printed under the host's temp folder, not
    under --output-dir, which holds only the "output" files; an output node reporting no files says so."""
    host, path = cli

    class TempSink:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("NUMBER",)}}

        RETURN_TYPES = ()
        FUNCTION = "show"
        OUTPUT_NODE = True

        def show(self, x):
            return {"ui": {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}}

    monkeypatch.setattr(runner, "_registry", lambda classes: {**CLASSES, "TempSink": TempSink})
    host.get_temp_directory = lambda: str(tmp_path / "temp")
    path.write_text(json.dumps({"1": {"class_type": "Number", "inputs": {"value": 2}},
                                "2": {"class_type": "TempSink", "inputs": {"x": ["1", 0]}}}))
    out_dir = tmp_path / "out"
    assert runner.main([str(path), "--output-dir", str(out_dir), "-q"]) == 0
    printed = capsys.readouterr().out
    assert os.path.join(str(tmp_path / "temp"), "preview.png") in printed
    assert str(out_dir) not in printed
    path.write_text(json.dumps({"1": {"class_type": "Number", "inputs": {"value": 2}},
                                "2": {"class_type": "AnySink", "inputs": {"anything": ["1", 0]}}}))
    assert runner.main([str(path), "-q"]) == 0
    assert "reported no files" in capsys.readouterr().out


def test_main_a_workflow_that_is_not_json_names_the_file(cli, tmp_path, capsys):
    """A workflow file that does not parse: status 1 and a message naming the file (a JSON parser's message
    alone, "Expecting value: line 1 column 1", does not say which file)."""
    bad = tmp_path / "broken_wf.json"
    bad.write_text("{not json")
    assert runner.main([str(bad), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {bad}")


def test_main_set_errors_list_the_nodes_and_inputs_to_choose_from(cli, capsys):
    """A --set naming no node lists the prompt's node ids; one naming no input of the node lists its inputs
    (the fix), and a hidden input (PROMPT, UNIQUE_ID, ...) is not one that can be set."""
    _, path = cli
    assert runner.main([str(path), "-q", "--set", "9.value=1"]) == 1
    assert "(nodes: 1, 2, 3, 4, 5, 6, 7)" in capsys.readouterr().err
    assert runner.main([str(path), "-q", "--set", "5.nope=1"]) == 1
    assert "(inputs: x, prefix)" in capsys.readouterr().err
    assert runner.main([str(path), "-q", "--set", "5.unique_id=3"]) == 1
    assert "has no input 'unique_id'" in capsys.readouterr().err


def test_demo_models_point_the_host_at_the_demo_folder(host_dirs, demo_models_dir, tmp_path, monkeypatch):
    """The demo-model fallback swaps in a demo file AND points the host's models folder at the folder the demo
    models were written to (else the loader looks for the stand-in where it is not)."""
    from conftest import load_pack
    from kinema.models import demo

    monkeypatch.setattr(demo, "default_cache_dir", lambda: demo_models_dir)
    host_dirs.set_models_dir(str(tmp_path / "elsewhere"))
    prompt = {"1": {"class_type": "KinemaCheckpointLoader",
                    "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors", "precision": "auto"}}}
    notes = runner.use_demo_models(prompt, load_pack().NODE_CLASS_MAPPINGS, host_dirs)
    assert os.path.samefile(host_dirs.get_models_dir(), demo_models_dir)
    assert prompt["1"]["inputs"]["ckpt_name"] == demo.DEMO_CHECKPOINT and len(notes) == 2


def test_default_cache_dir_is_kinema_cache_dir_or_the_users_cache(monkeypatch, tmp_path):
    """``KINEMA_CACHE_DIR`` (when set and not empty) holds the demo models in its ``demo_models`` folder, else
    ~/.cache/kinema does."""
    from kinema.models import demo

    monkeypatch.setenv("KINEMA_CACHE_DIR", str(tmp_path / "cache"))
    assert demo.default_cache_dir() == os.path.join(str(tmp_path / "cache"), "demo_models")
    monkeypatch.setenv("KINEMA_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "kinema", "demo_models")


def test_demo_files_carry_their_seed_and_dtype_and_are_rewritten_when_they_differ(demo_models_dir, tmp_path):
    """The written files' metadata names the demo version, seed and dtype: a file with other metadata, or one that
    cannot be read, is not current (it is written again)."""
    import torch
    from kinema.models import demo
    from safetensors import safe_open

    with safe_open(os.path.join(demo_models_dir, "checkpoints", demo.DEMO_CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"kinema_demo": demo.DEMO_VERSION, "seed": "0", "dtype": "torch.float32",
                    "note": demo.UNTRAINED_NOTE}
    path = str(tmp_path / "x.safetensors")
    demo._save({"w": torch.zeros(2)}, path, meta)
    assert demo._is_current(path, meta)
    assert not demo._is_current(path, {**meta, "seed": "1"})
    assert not demo._is_current(path, {**meta, "dtype": "torch.float16"})
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    assert not demo._is_current(path, meta)


#: what the demo files of each DEMO_VERSION hold: per file, a hash of its tensors' names, shapes and dtypes, and a sum
#: of each tensor's mean and RMS weighted by its name (``_demo_fingerprint``)
DEMO_FINGERPRINTS = {"4": {
    "animatediff_models/kinema_demo_mm_v1.safetensors": ("8dbb6ce11b681cfe", 362.94810576575156),
    "animatediff_models/kinema_demo_mm_v2.safetensors": ("a302174c3ea2e9bf", 381.4646278895505),
    "animatediff_models/kinema_demo_mm_v3.safetensors": ("3074d252729025a7", 361.48259168345845),
    "animatediff_motion_lora/kinema_demo_motion_lora_v2.safetensors": ("0c24bb67e910c299", 46.80074101817469),
    "checkpoints/kinema_demo_sd15.safetensors": ("0d666b84a31c9555", 561.3066635624709),
    "checkpoints/kinema_demo_svd.safetensors": ("b1e852c0ff14f878", 1130.8872373244722),
    "checkpoints/kinema_demo_svd_xt.safetensors": ("b1e852c0ff14f878", 1130.8872373244722),
    "clip_vision/kinema_demo_clip_vision.safetensors": ("296aafbb281c0432", 20.285737283258815),
    "controlnet/kinema_demo_controlnet_depth.safetensors": ("8e9cefbebe614df2", 169.45993507156453),
    "depth_models/kinema_demo_dpt/model.safetensors": ("1f0dfbe697c0f1df", 41.81233999184825),
    "ipadapter/kinema_demo_ip_adapter_sd15.safetensors": ("a369b4d8ad2cee5b", 9.831700941962172),
    "loras/kinema_demo_lora_sd15.safetensors": ("aed92ac4831ffaa9", 1545.6941934122303),
    "loras/kinema_demo_v3_adapter.safetensors": ("06386bc548e1c705", 35.334440997276175),
}}


def _demo_fingerprint(path: str) -> tuple[str, float]:
    import hashlib
    import zlib

    from safetensors import safe_open

    names, value = [], 0.0
    with safe_open(path, framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).double()
            names.append(f"{key}:{tuple(t.shape)}:{f.get_slice(key).get_dtype()}")
            weight = 1 + (zlib.crc32(key.encode()) % 1000) / 1000
            value += weight * (t.mean().item() + t.square().mean().sqrt().item())
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16], value


def test_demo_tensors_change_only_with_the_demo_version(demo_models_dir):
    """Users keep the demo files of a DEMO_VERSION cached and only rewrite them when it changes: a change to what the
    demo files hold (names, shapes, values, the depth model's folder) must come with a new DEMO_VERSION. On a
    failure, bump ``models.demo.DEMO_VERSION`` and record the new fingerprints here."""
    from kinema.models import demo

    assert demo.DEMO_VERSION in DEMO_FINGERPRINTS, f"record the fingerprints of DEMO_VERSION {demo.DEMO_VERSION}"
    expected = DEMO_FINGERPRINTS[demo.DEMO_VERSION]
    found = {}
    for folder, _, files in os.walk(demo_models_dir):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, demo_models_dir).replace(os.sep, "/")] = _demo_fingerprint(path)
    assert sorted(found) == sorted(expected)
    for name, (names_hash, value) in expected.items():
        assert found[name][0] == names_hash, name
        assert found[name][1] == pytest.approx(value, rel=1e-6), name  # ulps of randn differ between CPUs
    folder = os.path.join(demo_models_dir, "depth_models", demo.DEMO_DEPTH)
    with open(os.path.join(folder, "preprocessor_config.json"), encoding="utf-8") as f:
        assert json.load(f) == {
            "do_normalize": True, "do_rescale": True, "do_resize": True, "ensure_multiple_of": 1,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "DPTImageProcessor", "image_std": [0.5, 0.5, 0.5],
            "keep_aspect_ratio": False, "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 64, "width": 64},
        }
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "image_size", "patch_size", "backbone_out_indices", "neck_hidden_sizes",
                                   "fusion_hidden_size", "architectures")} == {
        "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 64, "patch_size": 16, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [8, 16, 32, 32],
        "fusion_hidden_size": 16, "architectures": ["DPTForDepthEstimation"]}
