"""The pack inside a real ComfyUI server: node registration, bundled workflows, interrupt.

Skipped unless a ComfyUI checkout is at ``$COMFYUI_DIR`` (default ``/tmp/ComfyUI``)
with its venv python at ``$COMFYUI_PYTHON`` (default ``/tmp/comfyvenv/bin/python``),
and the shared host scripts are at ``<repo>/../shared/comfyui``. See
``shared/comfyui-host.md`` for how to set that up (a few minutes, CPU only).

One server is started for the module with the pack linked into ``custom_nodes``
and a models folder holding the pack's demo models; it is stopped at the end.
"""
import base64
import glob
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from conftest import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "comfyui")
COMFY_DIR = os.environ.get("COMFYUI_DIR", "/tmp/ComfyUI")
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON", "/tmp/comfyvenv/bin/python")
START = os.path.join(SHARED, "start.sh")
QUEUE = os.path.join(SHARED, "queue_prompt.py")
PACK_NAME = os.path.basename(os.path.realpath(ROOT))  # start.sh links the pack under this name

API_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json")))
UI_WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))

if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
    pytest.skip(f"no ComfyUI checkout at {COMFY_DIR} (set COMFYUI_DIR)", allow_module_level=True)
if not os.access(COMFY_PYTHON, os.X_OK):
    pytest.skip(f"no ComfyUI venv python at {COMFY_PYTHON} (set COMFYUI_PYTHON)", allow_module_level=True)
if not (os.path.isfile(START) and os.path.isfile(QUEUE)):
    pytest.skip(f"host scripts not found under {SHARED}", allow_module_level=True)

WORKFLOW_TIMEOUT = 150      # seconds per queued workflow
INTERRUPT_LATENCY = 20.0    # seconds from POST /interrupt to the interrupted message


# ----------------------------------------------------------------- small HTTP / websocket clients
def http(url, data=None, timeout=30.0):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw


class WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's status messages (standard library only)."""

    def __init__(self, host, port, path, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        self.binary = []  # the binary messages skipped by recv_json (ComfyUI's step previews)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"websocket handshake refused: {status!r}")

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload=b""):
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def recv_json(self, timeout):
        """The next text message as JSON (binary messages, pings and pongs are skipped)."""
        self.sock.settimeout(timeout)
        message, kind = b"", None
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x9:
                self._send(0xA, payload[:125])
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                kind = opcode
            message += payload
            if b0 & 0x80:
                if kind == 0x1:
                    return json.loads(message.decode("utf-8"))
                self.binary.append(message)
                message, kind = b"", None

    def close(self):
        try:
            self._send(0x8)
        except OSError:
            pass
        self.sock.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- the server
class Server:
    def __init__(self, port, run_dir, env):
        self.port, self.run_dir, self.env = port, run_dir, env
        self.url = f"http://127.0.0.1:{port}"

    def log(self, tail=60):
        try:
            with open(os.path.join(self.run_dir, "comfyui.log"), encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-tail:])
        except OSError:
            return "(no log)"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    try:
        from kinema.models.demo import write_demo_models
    except (ImportError, AttributeError) as e:
        pytest.skip(f"kinema.models.demo.write_demo_models is not available yet: {e}")
    path = tmp_path_factory.mktemp("kinema_models")
    write_demo_models(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    port = free_port()
    run_dir = str(tmp_path_factory.mktemp("comfy_run"))
    env = dict(os.environ, PORT=str(port), RUN_DIR=run_dir, MODELS_DIR=models_dir, COMFY_DIR=COMFY_DIR,
               VENV=os.path.dirname(os.path.dirname(COMFY_PYTHON)), STARTUP_TIMEOUT="150", FRESH="1",
               COMFY_EXTRA_ARGS="--cache-none --disable-api-nodes --preview-method latent2rgb")
    srv = Server(port, run_dir, env)
    try:
        r = subprocess.run(["bash", START, ROOT], env=env, capture_output=True, text=True, timeout=200)
        if r.returncode != 0:
            pytest.fail(f"ComfyUI did not start:\n{r.stdout}\n{r.stderr}\n{srv.log()}")
        yield srv
    finally:
        subprocess.run(["bash", START, "--stop"], env=env, capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------- tests
def test_pack_imports_and_registers_every_node(server):
    from kinema.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # the pack's registry
    log = server.log(tail=400)
    failed = [line for line in log.splitlines()
              if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK_NAME in line]
    assert not failed, "the pack failed to import in ComfyUI:\n" + log
    if not NODE_CLASS_MAPPINGS:
        pytest.skip("the pack registers no nodes yet")
    info = http(server.url + "/object_info", timeout=60)
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}\n{log}"
    for name, display in NODE_DISPLAY_NAME_MAPPINGS.items():
        if name in info:
            assert info[name]["display_name"] == display


@pytest.fixture(scope="module")
def object_info(server):
    return http(server.url + "/object_info", timeout=60)


def _combo_options(spec):
    if not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return (spec[1] or {}).get("options")
    return None


def _demo_choice(kind, value, options):
    """The demo model that stands in for the model file ``value`` (None if the server lacks it)."""
    from kinema.models.demo import substitute

    stand_in = substitute(kind, value)
    return stand_in if stand_in in options else None




def _set_ui_widget(node, name, value):
    """Set widget ``name`` of a UI-format node, in the frontend's widget order."""
    from kinema.nodes import NODE_CLASS_MAPPINGS
    from kinema.nodes.workflow_format import input_specs, widget_specs

    index = 0
    for spec, extra in widget_specs(input_specs(NODE_CLASS_MAPPINGS[node["type"]])):
        if spec is not None and spec.name == name:
            node["widgets_values"][index] = value
            return
        index += 1 + extra
    raise KeyError(name)


def _object_info_classes(info):
    """Stand-in V1 classes built from /object_info (for converting UI files like the server sees them)."""
    classes = {}
    for name, node in info.items():
        def input_types(cls, node=node):
            order = node.get("input_order") or {}
            out = {}
            for cat in ("required", "optional", "hidden"):
                specs = (node.get("input") or {}).get(cat) or {}
                keys = [k for k in order.get(cat, []) if k in specs] + [k for k in specs if k not in order.get(cat, [])]
                out[cat] = {k: specs[k] for k in keys}
            return out
        classes[name] = type(name, (), {"INPUT_TYPES": classmethod(input_types),
                                        "RETURN_TYPES": tuple(node.get("output") or ())})
    return classes


def _pack_class(name):
    from kinema.nodes import NODE_CLASS_MAPPINGS

    return NODE_CLASS_MAPPINGS.get(name)


def _demo_changes(api, info):
    """``(node id, input, old, new)`` for every model name the server lacks and a demo model replaces."""
    changes = []
    for nid, node in api.items():
        inputs = (info.get(node.get("class_type")) or {}).get("input") or {}
        for name, value in (node.get("inputs") or {}).items():
            spec = (inputs.get("required") or {}).get(name) or (inputs.get("optional") or {}).get(name)
            options = _combo_options(spec)
            kind = getattr(_pack_class(node.get("class_type")), "MODEL_INPUTS", {}).get(name)
            if isinstance(value, str) and options is not None and value not in options and kind:
                demo = _demo_choice(kind, value, options)
                if demo is not None:
                    changes.append((nid, name, value, demo))
    return changes


def _prepared_workflow(path, info, tmp_path):
    """``path``, or a copy whose model names that the server does not have are replaced by demo models.

    Bundled workflows name the real models artists use (e.g. ``v1-5-pruned-emaonly.safetensors``);
    the test's models folder only holds the pack's tiny demo models.
    """
    from kinema.nodes.workflow_format import api_from_ui, is_ui_format

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    ui = data if is_ui_format(data) else None
    api = api_from_ui(ui, _object_info_classes(info)) if ui else data.get("prompt", data)
    changes = _demo_changes(api, info)
    for nid, node in api.items():
        for name, value in SMALL.get(node.get("class_type"), {}).items():
            changes.append((nid, name, None, value))
    for nid, name, old, new in changes:
        if ui is None:
            api[nid]["inputs"][name] = new
        else:
            node = next(n for n in ui["nodes"] if str(n["id"]) == nid)
            if isinstance(node.get("widgets_values"), dict):
                node["widgets_values"][name] = new
            else:
                _set_ui_widget(node, name, new)
    out = tmp_path / ("demo_" + os.path.basename(path))
    out.write_text(json.dumps(data), encoding="utf-8")
    return str(out)


def _queue_file(server, path, tmp_path, info):
    return _queue_prepared(server, _prepared_workflow(path, info, tmp_path), os.path.relpath(path, ROOT), tmp_path)


def _queue_prepared(server, path, name, tmp_path):
    """Queue the workflow file ``path`` with the pack's client; assert it succeeds with output files."""
    out = tmp_path / "download"
    r = subprocess.run([sys.executable, QUEUE, path, "--server", server.url, "--download", str(out),
                        "--timeout", str(WORKFLOW_TIMEOUT)],
                       capture_output=True, text=True, timeout=WORKFLOW_TIMEOUT + 60)
    report = f"{name}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.returncode == 0, report + "\n--- server log:\n" + server.log()
    files = re.findall(r"downloaded -> (.+) \((\d+) bytes\)", r.stdout)
    assert files, "the workflow reported no output files\n" + report
    for dst, size in files:
        assert os.path.isfile(dst) and os.path.getsize(dst) > 0 and int(size) > 0, report
    return files


@pytest.mark.parametrize("path", API_WORKFLOWS or [None],
                         ids=[os.path.basename(p) for p in API_WORKFLOWS] or ["none"])
def test_api_workflow_runs(server, object_info, path, tmp_path):
    if path is None:
        pytest.skip("no workflows/api/*.json yet")
    _queue_file(server, path, tmp_path, object_info)


@pytest.mark.parametrize("path", UI_WORKFLOWS or [None],
                         ids=[os.path.basename(p) for p in UI_WORKFLOWS] or ["none"])
def test_ui_workflow_runs(server, object_info, path, tmp_path):
    if path is None:
        pytest.skip("no workflows/*.json yet")
    _queue_file(server, path, tmp_path, object_info)


def test_workflow_templates_are_listed(server):
    if not UI_WORKFLOWS:
        pytest.skip("no workflows/*.json yet")
    listed = http(server.url + "/workflow_templates")
    ours = set(listed.get(PACK_NAME, []))
    expected = {os.path.splitext(os.path.basename(p))[0] for p in UI_WORKFLOWS}
    assert expected <= ours, f"/workflow_templates lists {sorted(ours)} for {PACK_NAME}"
    name = sorted(expected)[0]
    served = http(f"{server.url}/api/workflow_templates/{PACK_NAME}/{name}.json")
    with open(os.path.join(ROOT, "workflows", name + ".json"), encoding="utf-8") as f:
        assert served == json.load(f)


def _demo_api_prompt(path, info):
    """The API workflow at ``path`` with the demo models and the small sizes of ``SMALL``."""
    with open(path, encoding="utf-8") as f:
        prompt = json.load(f)
    prompt = prompt.get("prompt", prompt)
    for cid, cname, _, new in _demo_changes(prompt, info):
        prompt[cid]["inputs"][cname] = new
    for node in prompt.values():
        node["inputs"].update(SMALL.get(node.get("class_type"), {}))
    return prompt


def _long_prompt(info):
    """An API workflow with a `steps` input turned up, or None."""
    for path in API_WORKFLOWS:
        prompt = _demo_api_prompt(path, info)
        for nid, node in prompt.items():
            steps = node.get("inputs", {}).get("steps")
            if isinstance(steps, int) and not isinstance(steps, bool):
                spec = (info.get(node["class_type"], {}).get("input", {}).get("required", {}).get("steps")
                        or info.get(node["class_type"], {}).get("input", {}).get("optional", {}).get("steps"))
                hi = (spec[1] if spec and len(spec) > 1 else {}).get("max", 10000)
                node["inputs"]["steps"] = min(hi, 400)
                for key in ("seed", "noise_seed"):
                    if isinstance(node["inputs"].get(key), int):
                        node["inputs"][key] += 7919
                return os.path.basename(path), nid, prompt
    return None


def test_interrupt_stops_a_long_run(server, object_info):
    found = _long_prompt(object_info)
    if found is None:
        pytest.skip("no API workflow with a `steps` input")
    name, sampler_id, prompt = found
    client_id = str(uuid.uuid4())
    ws = WebSocket("127.0.0.1", server.port, f"/ws?clientId={client_id}")
    try:
        res = http(server.url + "/prompt", {"prompt": prompt, "client_id": client_id})
        prompt_id = res["prompt_id"]
        deadline = time.time() + WORKFLOW_TIMEOUT
        last_progress = None
        while time.time() < deadline:
            msg = ws.recv_json(timeout=max(1.0, deadline - time.time()))
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] == "progress":
                last_progress = data
                break
            assert msg["type"] not in ("execution_error", "execution_success"), \
                f"{name} ended before any progress: {msg}\n{server.log()}"
        assert last_progress is not None, f"no progress message from {name} within {WORKFLOW_TIMEOUT}s"
        t0 = time.time()
        http(server.url + "/interrupt", {"prompt_id": prompt_id})
        ended = None
        while time.time() - t0 < INTERRUPT_LATENCY + 5:
            msg = ws.recv_json(timeout=INTERRUPT_LATENCY + 5)
            data = msg.get("data") or {}
            if msg["type"] == "progress" and data.get("prompt_id") in (None, prompt_id):
                last_progress = data
            if msg["type"] in ("execution_interrupted", "execution_success", "execution_error") \
                    and data.get("prompt_id") == prompt_id:
                ended = msg
                break
        latency = time.time() - t0
        assert ended is not None, f"{name}: still running {latency:.1f}s after POST /interrupt"
        assert ended["type"] == "execution_interrupted", f"{name}: {ended}\n{server.log()}"
        assert latency < INTERRUPT_LATENCY, f"{name}: interrupt took {latency:.1f}s"
        assert last_progress["value"] < last_progress["max"], "the run finished all its steps"
    finally:
        ws.close()


def test_a_diffusers_motion_adapter_with_the_lcm_sampler(server, object_info, models_dir, tmp_path):
    """A MotionAdapter file as diffusers writes it, dropped into models/animatediff_models, is listed and loaded
    by ComfyUI; the text-to-video workflow samples with it and the lcm sampler."""
    pytest.importorskip("diffusers", exc_type=ImportError)
    from fixtures import motion_adapter

    motion_adapter("v3").save_pretrained(str(tmp_path / "adapter"))
    name = "kinema_test_diffusers_adapter.safetensors"
    shutil.copyfile(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors",
                    os.path.join(models_dir, "animatediff_models", name))
    info = http(server.url + "/object_info/KinemaMotionModuleLoader")["KinemaMotionModuleLoader"]
    assert name in _combo_options(info["input"]["required"]["model_name"])
    prompt = _demo_api_prompt(os.path.join(ROOT, "workflows", "api", "animatediff_txt2vid.json"), object_info)
    for node in prompt.values():
        if node["class_type"] == "KinemaMotionModuleLoader":
            node["inputs"]["model_name"] = name
        if node["class_type"] == "KinemaVideoSampler":
            node["inputs"].update(sampler_name="lcm", scheduler="sgm_uniform", cfg=1.5)
    path = tmp_path / "diffusers_adapter_lcm.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    _queue_prepared(server, str(path), "txt2vid with a diffusers MotionAdapter and lcm", tmp_path)


@pytest.mark.parametrize("offload", ["none", "block"])
def test_the_compile_node_runs_in_comfyui(server, object_info, tmp_path, offload):
    """Compile Model (Kinema) between the model and the Video Sampler of the text-to-video workflow, backend eager
    (dynamo's capture in ComfyUI's prompt worker thread; inductor's code generation takes minutes on a CPU); after
    a Memory Policy with block offload, the UNet compiled block by block."""
    prompt = _demo_api_prompt(os.path.join(ROOT, "workflows", "api", "animatediff_txt2vid.json"), object_info)
    (sampler,) = [node for node in prompt.values() if node["class_type"] == "KinemaVideoSampler"]
    model = sampler["inputs"]["model"]
    if offload != "none":
        prompt["kinema_memory"] = {"class_type": "KinemaMemoryPolicy", "inputs": {
            "model": model, "offload": offload, "resident_blocks": 2, "attention_chunk": 0, "batch_cond": True,
            "precision": "keep"}}
        model = ["kinema_memory", 0]
    prompt["kinema_compile"] = {"class_type": "KinemaCompileModel",
                                "inputs": {"model": model, "backend": "eager", "mode": "default"}}
    sampler["inputs"]["model"] = ["kinema_compile", 0]
    path = tmp_path / f"txt2vid_compiled_{offload}.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    _queue_prepared(server, str(path), f"txt2vid with Compile Model, offload {offload}", tmp_path)
    said = "Kinema: torch.compile (eager) of the UNetModel" + (" block by block (block offload)"
                                                               if offload == "block" else "")
    assert said + " for inputs" in server.log()  # why the first step waits


def test_the_compile_vae_node_runs_in_comfyui(server, object_info, tmp_path):
    """Compile VAE (Kinema) between the SVD loader's VAE and VAE Decode Frames in the image-to-video workflow,
    backend eager: the temporal decoder compiled in ComfyUI's prompt worker thread."""
    prompt = _demo_api_prompt(os.path.join(ROOT, "workflows", "api", "svd_img2vid.json"), object_info)
    (decode,) = [node for node in prompt.values() if node["class_type"] == "KinemaVAEDecodeFrames"]
    prompt["kinema_compile_vae"] = {"class_type": "KinemaCompileVAE",
                                    "inputs": {"vae": decode["inputs"]["vae"], "backend": "eager", "mode": "default"}}
    decode["inputs"]["vae"] = ["kinema_compile_vae", 0]
    path = tmp_path / "svd_img2vid_compiled_vae.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    _queue_prepared(server, str(path), "img2vid with Compile VAE", tmp_path)
    assert "Kinema: torch.compile (eager) of the TemporalAutoencoder decoder for inputs" in server.log()


def _queue_and_wait(server, prompt):
    """Queue the API ``prompt`` and follow it on the websocket: (the message that ended it, or None at the
    timeout; the binary messages it sent meanwhile)."""
    client_id = str(uuid.uuid4())
    ws = WebSocket("127.0.0.1", server.port, f"/ws?clientId={client_id}")
    try:
        prompt_id = http(server.url + "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        deadline, ended = time.time() + WORKFLOW_TIMEOUT, None
        while ended is None and time.time() < deadline:
            msg = ws.recv_json(timeout=max(1.0, deadline - time.time()))
            data = msg.get("data") or {}
            if msg["type"] in ("execution_error", "execution_success", "execution_interrupted") \
                    and data.get("prompt_id") == prompt_id:
                ended = msg
    finally:
        ws.close()
    return ended, ws.binary


def test_the_sampler_sends_a_step_preview_to_the_ui(server, object_info):
    """With ComfyUI's previews on (``--preview-method latent2rgb``), the Video Sampler's node shows a JPEG
    preview each step, as KSampler does (ComfyUI's binary PREVIEW_IMAGE messages, event 1, or 4 with
    metadata)."""
    prompt = _demo_api_prompt(os.path.join(ROOT, "workflows", "api", "animatediff_txt2vid.json"), object_info)
    steps = next(n["inputs"]["steps"] for n in prompt.values() if n["class_type"] == "KinemaVideoSampler")
    ended, binary = _queue_and_wait(server, prompt)
    assert ended is not None and ended["type"] == "execution_success", f"{ended}\n{server.log()}"
    previews = [m for m in binary if struct.unpack(">I", m[:4])[0] in (1, 4) and b"\xff\xd8\xff" in m[:4096]]
    assert len(previews) >= steps, f"{len(previews)} previews for {steps} steps ({len(binary)} binary messages)"


def _bad_checkpoint(kind, models_dir):
    """Write a broken file of ``kind`` into the checkpoints folder; return its name."""
    import pickle

    from kinema.models.demo import DEMO_CHECKPOINT, DEMO_MOTION

    folder = os.path.join(models_dir, "checkpoints")
    if kind == "truncated":
        name = "kinema_test_truncated.safetensors"
        with open(os.path.join(folder, DEMO_CHECKPOINT), "rb") as f:
            data = f.read()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "pickle":  # a pickle that names a Python object, as a malicious one would
        name = "kinema_test_pickle.ckpt"
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"state_dict": {}, "hook": os.getcwd}, f, protocol=2)
    else:  # a motion module where a checkpoint belongs
        name = "kinema_test_motion_module.safetensors"
        with open(os.path.join(models_dir, "animatediff_models", DEMO_MOTION["v2"]), "rb") as src, \
                open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    return name


@pytest.mark.parametrize("kind, words", [("truncated", "truncated"), ("pickle", "will not unpickle"),
                                         ("wrong_type", "motion module")])
def test_a_broken_checkpoint_fails_with_the_packs_error(server, object_info, models_dir, kind, words):
    """ComfyUI shows the pack's own error, naming the file and what is wrong; no output file is written."""
    name = _bad_checkpoint(kind, models_dir)
    prompt = _demo_api_prompt(os.path.join(ROOT, "workflows", "api", "animatediff_txt2vid.json"), object_info)
    loader = next(nid for nid, node in prompt.items() if node["class_type"] == "KinemaCheckpointLoader")
    prompt[loader]["inputs"]["ckpt_name"] = name
    output = os.path.join(server.run_dir, "output")
    before = sorted(os.listdir(output)) if os.path.isdir(output) else []
    ended, _ = _queue_and_wait(server, prompt)
    assert ended is not None and ended["type"] == "execution_error", f"{kind}: {ended}\n{server.log()}"
    data = ended["data"]
    assert data["node_id"] == loader and data["exception_type"].endswith("KinemaError"), data
    assert name in data["exception_message"] and words in data["exception_message"], data["exception_message"]
    after = sorted(os.listdir(output)) if os.path.isdir(output) else []
    assert after == before, f"files written by a failed run: {sorted(set(after) - set(before))}"
