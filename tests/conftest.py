"""Load the repository root as the package ``kinema``, the way ComfyUI loads a pack.

The checkout's folder name never matters: the root is registered under one
fixed name with the root as its package path. The root ``__init__.py`` (which
imports every node) is executed on first use of ``kinema.NODE_CLASS_MAPPINGS``
through ``load_pack()``, so engine tests do not depend on the node modules.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inputs that shrink a bundled workflow so a run takes seconds on the tiny demo models (the graph stays
# the bundled one): used by the headless and the real-ComfyUI workflow tests.
SMALL = {"KinemaEmptyVideoLatent": {"width": 64, "height": 64, "frames": 8}, "KinemaVideoSampler": {"steps": 2},
         "KinemaLoadVideo": {"frame_load_cap": 8, "custom_width": 64},
         "KinemaContextOptions": {"context_length": 4, "context_overlap": 1},
         "KinemaSVDConditioning": {"width": 64, "height": 64, "video_frames": 6}}

NET_TOL = 1e-5  # network parity with a reference on identical weights: relative to max(1, max |reference|)


def assert_net_close(ours, ref, what: str, tol: float = NET_TOL) -> float:
    """Assert two network outputs agree within ``tol * max(1, max |ref|)`` (max abs difference); return it."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff = float((ours - ref).abs().max())
    scale = max(1.0, float(ref.abs().max()))
    print(f"{what}: max |diff| {diff:.3g}, max |value| {float(ref.abs().max()):.3g}")  # shown with -s
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol:g} * {scale:.3g}"
    return diff


_spec = importlib.util.spec_from_file_location(
    "kinema", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
)
if "kinema" not in sys.modules:
    sys.modules["kinema"] = importlib.util.module_from_spec(_spec)


def load_pack():
    """Execute the pack's root __init__ (what ComfyUI does) and return the package."""
    module = sys.modules["kinema"]
    if not hasattr(module, "NODE_CLASS_MAPPINGS"):
        _spec.loader.exec_module(module)
    return module


import pytest  # noqa: E402


def _share_the_cores() -> None:
    """Under pytest-xdist (``-n``), each worker takes its share of the cores for torch's threads: every worker
    with all of them would oversubscribe the cores (the CI machine has two, and runs two workers)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


_share_the_cores()


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory):
    """The pack's demo models (tiny, real layouts) written once per session, ComfyUI folder names."""
    from kinema.models.demo import write_demo_models

    root = tmp_path_factory.mktemp("models")
    write_demo_models(str(root))
    return str(root)


@pytest.fixture()
def output_dir(tmp_path, monkeypatch):
    """A fresh output folder for saving nodes, with the workflow metadata on; restored afterwards."""
    from kinema.nodes import host

    monkeypatch.delenv("KINEMA_DISABLE_METADATA", raising=False)
    host.set_output_dir(str(tmp_path / "output"))
    yield tmp_path / "output"
    host.set_output_dir(None)


@pytest.fixture()
def host_dirs(demo_models_dir, tmp_path):
    """Point the host adapter at the demo models and a fresh output folder; restore afterwards."""
    from kinema.nodes import host

    host.set_models_dir(demo_models_dir)
    host.set_output_dir(str(tmp_path / "output"))
    yield host
    host.set_models_dir(None)
    host.set_output_dir(None)


class Recorder:
    """Stands in for ComfyUI's previewer: records the latents it is given and returns a token per call."""

    def __init__(self):
        self.latents = []

    def __call__(self, latent):
        self.latents.append(latent.clone())
        return ("JPEG", len(self.latents), 512)


@pytest.fixture()
def previews(monkeypatch):
    """The sampler node's previewer and the previews its progress bar gets."""
    from kinema.nodes import host

    recorder, shown = Recorder(), []
    monkeypatch.setattr(host, "latent_previewer", lambda: recorder)
    update = host.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        shown.append(preview)
        update(self, value, total, preview)

    monkeypatch.setattr(host.ProgressBar, "update_absolute", record)
    return recorder, shown
