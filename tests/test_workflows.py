"""Bundled workflows: UI/API twins agree, and each runs headlessly on the demo models."""
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, load_pack

UI_FILES = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
API_FILES = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json")))


def _small(prompt):
    for node in prompt.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
    return prompt


def test_there_are_bundled_workflows():
    assert UI_FILES and API_FILES
    assert {os.path.basename(p) for p in UI_FILES} == {os.path.basename(p) for p in API_FILES}


@pytest.mark.parametrize("ui_path", UI_FILES, ids=os.path.basename)
def test_ui_workflow_matches_its_api_twin(ui_path):
    from kinema.nodes import workflow_format as wf

    classes = load_pack().NODE_CLASS_MAPPINGS
    ui = json.load(open(ui_path))
    api = json.load(open(os.path.join(ROOT, "workflows", "api", os.path.basename(ui_path))))
    assert wf.strip_meta(wf.api_from_ui(ui, classes)) == wf.strip_meta(wf.complete_api(api, classes))
    assert all(n["type"].startswith("Kinema") for n in ui["nodes"])  # only Kinema nodes: runs headless too
    # each file holds every widget value itself, as the frontend saves and exports it: an input added to a
    # node later must be added to the bundled files too (the frontend would shift an older file's values)
    assert wf.complete_api(api, classes) == api
    for node in ui["nodes"]:
        widgets = wf.widget_specs(wf.input_specs(classes[node["type"]]))
        assert len(node["widgets_values"]) == sum(1 + extra for _, extra in widgets), (node["id"], node["type"])


@pytest.mark.parametrize("api_path", API_FILES, ids=os.path.basename)
def test_api_workflow_runs_headless(api_path, host_dirs):
    from kinema.nodes import runner

    classes = load_pack().NODE_CLASS_MAPPINGS
    prompt = _small(json.load(open(api_path)))
    for nid, node in prompt.items():  # the demo models stand in for the real files the workflow names
        for name, kind in getattr(classes[node["class_type"]], "MODEL_INPUTS", {}).items():
            from kinema.models import demo

            node["inputs"][name] = demo.substitute(kind, node["inputs"][name]) or node["inputs"][name]
    results = runner.run_prompt(prompt, classes, progress=False)
    files = runner.output_files(results)
    assert files
    for _, _, item in files:
        path = os.path.join(host_dirs.get_output_directory(), item["subfolder"], item["filename"])
        assert os.path.getsize(path) > 0


def test_readme_command_runs_with_the_embedded_demo_models(tmp_path):
    """`python nodes/runner.py workflows/api/...` with no models configured: demo models, said plainly."""
    env = dict(os.environ, KINEMA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("KINEMA_MODELS_DIR", None)
    sets = []
    for node_id, node in json.load(open(API_FILES[0])).items():
        for name, value in SMALL.get(node["class_type"], {}).items():
            sets += ["--set", f"{node_id}.{name}={value}"]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "nodes", "runner.py"), API_FILES[0], "--output-dir", str(tmp_path / "out"),
         "-q", *sets],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "untrained" in out.stderr and "demo model" in out.stderr
    written = [line.rsplit(": ", 1)[1] for line in out.stdout.splitlines() if " wrote " in line]
    assert written and all(os.path.getsize(p) > 0 for p in written)
