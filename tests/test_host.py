"""nodes/host.py outside ComfyUI: model folders, output names, interrupts, progress, devices.

A small stand-in for ComfyUI's ``folder_paths`` also checks the hosted branch of
folder registration and model resolution.
"""
import logging
import os
import time
import types

import pytest
import torch

from kinema.models.errors import KinemaError
from kinema.nodes import host


@pytest.fixture(autouse=True)
def clean_host(tmp_path, monkeypatch):
    for var in ("KINEMA_MODELS_DIR", "KINEMA_OUTPUT_DIR", "KINEMA_INPUT_DIR", "KINEMA_TEMP_DIR",
                "KINEMA_ALLOW_SYMLINKS", "KINEMA_DEVICE", "KINEMA_DISABLE_METADATA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(host, "_extra_model_folders", {})
    host.set_models_dir(str(tmp_path / "models"))
    host.set_output_dir(str(tmp_path / "output"))
    host.request_interrupt(False)
    yield
    host.set_models_dir(None)
    host.set_output_dir(None)
    host.set_input_dir(None)
    host.set_temp_dir(None)
    host.request_interrupt(False)


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_plain_process_is_not_comfyui():
    assert host.IN_COMFYUI is False
    host.register_model_folders()  # idempotent no-op outside ComfyUI


# --- model folders ---------------------------------------------------------------------------
def test_list_models_subfolders_forward_slashes_and_extensions(tmp_path):
    root = tmp_path / "models" / "animatediff_models"
    for rel in ("mm_sd_v15_v2.ckpt", "v3/mm_v3.safetensors", "v3/deep/x.pth", "readme.txt",
                ".git/hidden.safetensors", "b.bin", "c.pt", "d.sft"):
        _touch(root / rel)
    names = host.list_models("animatediff_models")
    assert names == ["b.bin", "c.pt", "d.sft", "mm_sd_v15_v2.ckpt", "v3/deep/x.pth", "v3/mm_v3.safetensors"]
    assert host.list_models("depth_models") == []  # missing folder: empty, no error


def test_resolve_model_returns_absolute_path_inside_folder(tmp_path):
    f = _touch(tmp_path / "models" / "loras" / "sub" / "a.safetensors")
    got = host.resolve_model("loras", "sub/a.safetensors")
    assert os.path.isabs(got) and os.path.samefile(got, f)
    assert os.path.samefile(host.resolve_model("loras", "sub\\a.safetensors"), f)  # Windows-style name
    assert os.path.samefile(host.resolve_model("loras", "./sub//a.safetensors"), f)


def test_models_dir_from_environment(tmp_path, monkeypatch):
    host.set_models_dir(None)
    other = tmp_path / "elsewhere"
    f = _touch(other / "checkpoints" / "sd15.safetensors")
    monkeypatch.setenv("KINEMA_MODELS_DIR", str(other))
    assert host.list_models("checkpoints") == ["sd15.safetensors"]
    assert os.path.samefile(host.resolve_model("checkpoints", "sd15.safetensors"), f)
    host.set_models_dir(str(tmp_path / "models"))  # a folder set in code wins over the environment
    assert host.list_models("checkpoints") == []
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "env_out"))
    assert host.get_output_directory() == os.path.abspath(str(tmp_path / "output"))


def test_extra_model_folder_is_searched(tmp_path):
    _touch(tmp_path / "models" / "vae" / "a.safetensors")
    extra = tmp_path / "shared_vae"
    f = _touch(extra / "b.safetensors")
    host.add_model_folder("vae", str(extra))
    host.add_model_folder("vae", str(extra))  # no duplicate
    assert host.model_folders("vae") == [str(tmp_path / "models" / "vae"), str(extra)]
    assert host.list_models("vae") == ["a.safetensors", "b.safetensors"]
    assert os.path.samefile(host.resolve_model("vae", "b.safetensors"), f)


@pytest.mark.parametrize("name", ["../x.safetensors", "../models/loras/a.safetensors", "a/../../x.safetensors",
                                  "..\\x.safetensors", "/etc/passwd", "C:\\Windows\\x.ckpt", "c:/x.ckpt",
                                  "sub/..", "", "   ", ".", "a\x00b"])
def test_resolve_refuses_names_that_escape(tmp_path, name):
    _touch(tmp_path / "models" / "loras" / "a.safetensors")
    _touch(tmp_path / "models" / "x.safetensors")
    why = {"/etc/passwd": "is an absolute path", "C:\\Windows\\x.ckpt": "is an absolute path",
           "c:/x.ckpt": "is an absolute path", "../x.safetensors": "leaves the loras folder",
           "a/../../x.safetensors": "leaves the loras folder", "..\\x.safetensors": "leaves the loras folder"}
    with pytest.raises(KinemaError, match=why.get(name)):
        host.resolve_model("loras", name)


@pytest.mark.parametrize("kind", ["../loras", "..", ".", "a/b", ""])
def test_resolve_refuses_kind_that_escapes(kind):
    with pytest.raises(KinemaError, match="is not a model folder kind"):
        host.resolve_model(kind, "a.safetensors")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_a_link_into_a_sibling_folder_of_a_similar_name_is_outside(tmp_path):
    """models/loras_private is not inside models/loras, though its path starts with it."""
    secret = _touch(tmp_path / "models" / "loras_private" / "x.safetensors")
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    os.symlink(secret, folder / "x.safetensors")
    with pytest.raises(KinemaError, match="outside the loras folder"):
        host.resolve_model("loras", "x.safetensors")
    assert host.list_models("loras") == []


@pytest.mark.parametrize("name", ["../secret.mp4", "sub/../../secret.mp4", "/etc/passwd", "C:\\x.mp4", ".."])
def test_input_names_outside_the_input_folder_are_refused_existing_or_not(tmp_path, name):
    host.set_input_dir(str(tmp_path / "input"))
    with pytest.raises(KinemaError, match="points outside the input folder"):
        host.resolve_input(name)


def test_input_names_from_comfyuis_upload_list_drop_the_input_tag(tmp_path):
    host.set_input_dir(str(tmp_path / "input"))
    assert host.resolve_input("clip.mp4 [input]") == os.path.join(str(tmp_path / "input"), "clip.mp4")
    assert host.resolve_input("sub\\clip.mp4") == os.path.join(str(tmp_path / "input"), "sub", "clip.mp4")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlink_out_of_the_folder_is_refused_and_hidden(tmp_path, monkeypatch):
    secret = _touch(tmp_path / "secret" / "key.safetensors")
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    os.symlink(secret, folder / "link.safetensors")
    os.symlink(tmp_path / "secret", folder / "linkdir")
    inside = _touch(folder / "real.safetensors")
    os.symlink(inside, folder / "alias.safetensors")  # a link that stays inside is fine
    for name in ("link.safetensors", "linkdir/key.safetensors"):
        with pytest.raises(KinemaError, match="outside"):
            host.resolve_model("loras", name)
    assert host.list_models("loras") == ["alias.safetensors", "real.safetensors"]
    assert os.path.samefile(host.resolve_model("loras", "alias.safetensors"), inside)
    monkeypatch.setenv("KINEMA_ALLOW_SYMLINKS", "1")
    assert os.path.samefile(host.resolve_model("loras", "link.safetensors"), secret)
    assert "link.safetensors" in host.list_models("loras")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_input_links_out_of_the_input_folder_are_hidden(tmp_path, monkeypatch):
    """The Load Video / Load Image lists hide links resolving outside the input folder, as the model lists do
    (resolve_input refuses them)."""
    from kinema.nodes import video_input

    monkeypatch.setattr(video_input, "BUNDLED_INPUTS_DIR", str(tmp_path / "no_bundled"))
    secret = _touch(tmp_path / "private" / "holiday.mp4")
    secret_image = _touch(tmp_path / "private" / "photo.jpg")
    folder = tmp_path / "input"
    inside = _touch(folder / "clip.mp4")
    os.symlink(secret, folder / "link.mp4")
    os.symlink(secret_image, folder / "link.jpg")
    os.symlink(inside, folder / "alias.mp4")  # a link that stays inside is fine
    host.set_input_dir(str(folder))
    assert video_input.list_videos() == ["alias.mp4", "clip.mp4"]
    assert "link.jpg" not in video_input.list_images()
    with pytest.raises(KinemaError, match="outside the input folder"):
        video_input.resolve_video("link.mp4")
    monkeypatch.setenv("KINEMA_ALLOW_SYMLINKS", "1")
    assert "link.mp4" in video_input.list_videos()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinked_folder_itself_is_fine(tmp_path):
    real = tmp_path / "big_disk" / "checkpoints"
    f = _touch(real / "sd15.safetensors")
    (tmp_path / "models").mkdir()
    os.symlink(real, tmp_path / "models" / "checkpoints")
    assert host.list_models("checkpoints") == ["sd15.safetensors"]
    assert os.path.samefile(host.resolve_model("checkpoints", "sd15.safetensors"), f)


def test_missing_model_message_names_folders_and_fix(tmp_path):
    _touch(tmp_path / "models" / "animatediff_models" / "mm_sd_v15_v2.ckpt")
    with pytest.raises(KinemaError) as e:
        host.resolve_model("animatediff_models", "mm_v3.ckpt")
    msg = str(e.value)
    assert "mm_v3.ckpt" in msg and "not found" in msg
    assert str(tmp_path / "models" / "animatediff_models") in msg
    assert "KINEMA_MODELS_DIR" in msg and "mm_sd_v15_v2.ckpt" in msg  # the fix and what is there


def test_missing_directory_is_refused_as_model_file(tmp_path):
    (tmp_path / "models" / "loras" / "adir").mkdir(parents=True)
    with pytest.raises(KinemaError, match="not found"):
        host.resolve_model("loras", "adir")


def test_model_dirs_for_transformers_folders(tmp_path):
    root = tmp_path / "models" / "depth_models"
    _touch(root / "depth-anything-small" / "config.json", b"{}")
    _touch(root / "depth-anything-small" / "model.safetensors")
    _touch(root / "org" / "dpt-hybrid" / "config.json", b"{}")
    (root / "empty").mkdir()
    assert host.list_model_dirs("depth_models") == ["depth-anything-small", "org/dpt-hybrid"]
    got = host.resolve_model_dir("depth_models", "org/dpt-hybrid")
    assert os.path.samefile(got, root / "org" / "dpt-hybrid")
    with pytest.raises(KinemaError):
        host.resolve_model_dir("depth_models", "../depth_models/org")
    with pytest.raises(KinemaError, match="not found"):
        host.resolve_model_dir("depth_models", "nope")


# --- the hosted branch, against a stand-in for ComfyUI's folder_paths --------------------------
def _fake_folder_paths(models_dir):
    fp = types.SimpleNamespace()
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {
        "checkpoints": ([os.path.join(fp.models_dir, "checkpoints")], {".safetensors"}),
        # as extra_model_paths.yaml leaves a kind ComfyUI did not know: no extension filter
        "animatediff_models": (["/data/custom_motion"], set()),
    }
    fp.filename_list_cache = {"animatediff_models": "stale"}

    def get_folder_paths(kind):
        return list(fp.folder_names_and_paths[kind][0])

    def get_full_path(kind, filename):  # like ComfyUI: normalises the name, no escape error
        if kind not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in fp.folder_names_and_paths[kind][0]:
            full = os.path.join(folder, filename)
            if os.path.isfile(full):
                return full
        return None

    def get_filename_list(kind):
        out = set()
        folders, exts = fp.folder_names_and_paths[kind]
        for folder in folders:
            for dirpath, _, files in os.walk(folder, followlinks=True):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        out.add(os.path.relpath(os.path.join(dirpath, f), folder))
        return sorted(out)

    fp.get_folder_paths = get_folder_paths
    fp.get_full_path = get_full_path
    fp.get_filename_list = get_filename_list
    return fp


def test_register_model_folders_keeps_existing_and_is_idempotent(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path / "models")
    monkeypatch.setattr(host, "_folder_paths", fp)
    host.register_model_folders()
    host.register_model_folders()
    paths, exts = fp.folder_names_and_paths["animatediff_models"]
    assert paths == ["/data/custom_motion", os.path.join(fp.models_dir, "animatediff_models")]
    assert {".safetensors", ".ckpt", ".pt", ".pth", ".bin"} <= set(exts)
    assert "animatediff_models" not in fp.filename_list_cache
    for kind in ("animatediff_motion_lora", "depth_models"):
        assert fp.folder_names_and_paths[kind][0] == [os.path.join(fp.models_dir, kind)]
    assert fp.folder_names_and_paths["checkpoints"] == (
        [os.path.join(fp.models_dir, "checkpoints")], {".safetensors"})


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_hosted_resolve_still_checks_escapes(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path / "models")
    monkeypatch.setattr(host, "_folder_paths", fp)
    folder = tmp_path / "models" / "checkpoints"
    f = _touch(folder / "sd15.safetensors")
    _touch(tmp_path / "models" / "sd15.safetensors")
    secret = _touch(tmp_path / "secret.safetensors")
    os.symlink(secret, folder / "link.safetensors")
    assert os.path.samefile(host.resolve_model("checkpoints", "sd15.safetensors"), f)
    with pytest.raises(KinemaError):  # ComfyUI would quietly map this to checkpoints/sd15.safetensors
        host.resolve_model("checkpoints", "../sd15.safetensors")
    with pytest.raises(KinemaError, match="outside"):
        host.resolve_model("checkpoints", "link.safetensors")
    assert host.list_models("checkpoints") == ["sd15.safetensors"]
    with pytest.raises(KinemaError, match="not found.*extra_model_paths.yaml"):
        host.resolve_model("checkpoints", "missing.safetensors")
    with pytest.raises(KinemaError, match="no model folder kind"):
        host.resolve_model("not_a_kind", "x.safetensors")


# --- output names ---------------------------------------------------------------------------
def test_save_path_counter_convention(tmp_path):
    out = tmp_path / "output"
    full, sub, name = host.save_path("Kinema/video", "webp", 64, 48)
    assert (sub, name) == ("Kinema", "video_00001_.webp")
    assert full == str(out / "Kinema" / "video_00001_.webp") and os.path.isdir(out / "Kinema")
    _touch(full)
    assert host.save_path("Kinema/video", "webp")[2] == "video_00002_.webp"
    _touch(out / "Kinema" / "video_00007_.png")  # the counter is shared by every extension
    _touch(out / "Kinema" / "videofoo_00099_.gif")  # another prefix
    _touch(out / "Kinema" / "video_notanumber_.gif")
    assert host.save_path("Kinema/video", ".gif")[2] == "video_00008_.gif"
    full, sub, name = host.save_path("plain", "mp4")
    assert (sub, name) == ("", "plain_00001_.mp4") and full == str(out / "plain_00001_.mp4")


def test_save_path_never_returns_an_existing_name(tmp_path, monkeypatch):
    out = tmp_path / "output"
    _touch(out / "v_00001_.gif")
    _touch(out / "v_00002_.gif")
    monkeypatch.setattr(host, "_next_counter", lambda folder, name: 1)  # e.g. a race with another writer
    full, _, name = host.save_path("v", "gif")
    assert name == "v_00003_.gif" and not os.path.exists(full)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_save_path_skips_a_dangling_link_of_its_name(tmp_path, monkeypatch):
    """A link named like the next file, pointing out of the output folder, is not written through."""
    out = tmp_path / "output"
    out.mkdir()
    os.symlink(tmp_path / "elsewhere" / "target.gif", out / "v_00001_.gif")
    monkeypatch.setattr(host, "_next_counter", lambda folder, name: 1)
    assert host.save_path("v", "gif")[2] == "v_00002_.gif"


def test_save_path_takes_backslashes_as_folders():
    full, sub, name = host.save_path("Kinema\\video", "mp4")
    assert (sub, name) == ("Kinema", "video_00001_.mp4") and os.path.dirname(full).endswith("Kinema")


def test_save_path_expands_size_variables():
    _, sub, name = host.save_path("runs/%width%x%height%/clip", "gif", 512, 320)
    assert sub == "runs/512x320" and name == "clip_00001_.gif"


@pytest.mark.parametrize("prefix", ["../escape", "a/../../escape", "/tmp/abs", "", "  ", "..", "x\x00y"])
def test_save_path_refuses_prefix_outside_output(prefix):
    with pytest.raises(KinemaError):
        host.save_path(prefix, "webp")


@pytest.mark.parametrize("ext", ["we/bp", "m p4", "a.b", "..\\x", ""])
def test_save_path_refuses_bad_extension(ext):
    with pytest.raises(KinemaError, match="is not a file extension"):
        host.save_path("ok", ext)


def test_directories_fallbacks(tmp_path, monkeypatch):
    assert host.get_output_directory() == str(tmp_path / "output")
    host.set_output_dir(None)
    monkeypatch.setenv("KINEMA_OUTPUT_DIR", str(tmp_path / "env_out"))
    assert host.get_output_directory() == str(tmp_path / "env_out")
    monkeypatch.delenv("KINEMA_OUTPUT_DIR")
    monkeypatch.chdir(tmp_path)
    assert host.get_output_directory() == str(tmp_path / "output")
    assert host.get_input_directory() == str(tmp_path / "input")
    assert host.get_temp_directory() == str(tmp_path / "temp")
    host.set_input_dir(str(tmp_path / "in2"))
    assert host.get_input_directory() == str(tmp_path / "in2")


# --- interrupts and progress -----------------------------------------------------------------
def test_interrupt_flag_raises_once():
    host.check_interrupt()  # nothing requested
    host.request_interrupt()
    with pytest.raises(host.KinemaInterrupted) as e:
        host.check_interrupt()
    assert isinstance(e.value, InterruptedError)
    host.check_interrupt()  # cleared


def test_progress_bar_checks_interrupt_and_logs(caplog):
    caplog.set_level(logging.INFO, logger="kinema")
    bar = host.ProgressBar(4, desc="sampling")
    bar.update()
    bar.update(2)
    assert bar.current == 3
    bar.update_absolute(10)  # clamped
    assert bar.current == 4
    assert any("sampling: 4/4" in r.getMessage() for r in caplog.records)
    bar.update_absolute(1, total=8)
    assert (bar.current, bar.total) == (1, 8)
    host.request_interrupt()
    with pytest.raises(host.KinemaInterrupted):
        bar.update()


def test_devices(monkeypatch):
    assert isinstance(host.compute_device(), torch.device)
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    assert host.compute_device() == torch.device("cpu")
    assert host.offload_device() == torch.device("cpu")
    host.soft_empty_cache()


def test_metadata_switch(monkeypatch):
    assert host.metadata_enabled() is True
    monkeypatch.setenv("KINEMA_DISABLE_METADATA", "1")
    assert host.metadata_enabled() is False
    monkeypatch.delenv("KINEMA_DISABLE_METADATA")
    monkeypatch.setattr(host, "_comfy_args", types.SimpleNamespace(disable_metadata=True))  # --disable-metadata
    assert host.metadata_enabled() is False
    monkeypatch.setattr(host, "_comfy_args", types.SimpleNamespace(disable_metadata=False))
    assert host.metadata_enabled() is True


# -- precision under ComfyUI's command line ---------------------------------------------------------------------------

def _comfy(monkeypatch, flags=(), device="cuda", fp16_ok=True, bf16_ok=True, cpu_vae=False, reserve=0):
    """Stand-ins for ComfyUI's parsed ``args`` and ``model_management`` (a GPU that is not there: nothing runs)."""
    args = types.SimpleNamespace(**dict.fromkeys(flags, True))
    mm = types.SimpleNamespace(
        get_torch_device=lambda: torch.device(device),
        vae_device=lambda: torch.device("cpu") if cpu_vae else torch.device(device),
        should_use_fp16=lambda dev=None, **_: fp16_ok,
        should_use_bf16=lambda dev=None, **_: bf16_ok,
        extra_reserved_memory=lambda: reserve,
        interrupt_current_processing=lambda value=True: None)
    monkeypatch.setattr(host, "_comfy_args", args)
    monkeypatch.setattr(host, "_comfy_mm", mm)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("flags, device, fp16_ok, want", [
    ((), "cuda", True, (F16, F16, F16)),                           # the pack's rule: fp16 on a GPU
    ((), "cpu", True, (F32, F32, F32)),                            # fp32 on the CPU
    (("force_fp32",), "cuda", True, (F32, F32, F32)),              # --force-fp32: everything
    (("fp16_unet",), "cpu", True, (F16, F32, F32)),                # --force-fp16 on the CPU: the UNet's flag only
    (("bf16_unet",), "cuda", True, (BF16, F16, F16)),
    (("fp32_vae",), "cuda", True, (F16, F32, F16)),                # --fp32-vae: the VAE only
    (("bf16_vae", "fp32_text_enc"), "cuda", True, (F16, BF16, F32)),
    (("force_fp32", "bf16_unet"), "cuda", True, (BF16, F32, F32)),  # a part's own flag before --force-fp32
    ((), "cuda", False, (BF16, BF16, BF16)),                       # a GPU ComfyUI finds fp16 broken on: bf16
])
def test_auto_precision_follows_comfyuis_command_line(monkeypatch, flags, device, fp16_ok, want):
    _comfy(monkeypatch, flags, device, fp16_ok)
    got = host.load_dtypes("auto")
    assert (got.weights, got.vae, got.encoders) == want
    assert host.load_dtypes("fp32") == host.LoadDtypes(F32, F32, F32)  # a precision chosen on the node wins


def test_auto_precision_without_fp16_or_bf16_is_fp32(monkeypatch):
    _comfy(monkeypatch, fp16_ok=False, bf16_ok=False)
    assert host.load_dtypes("auto").weights == F32


def test_cpu_vae_keeps_the_vae_on_the_cpu_in_fp32(monkeypatch):
    _comfy(monkeypatch, device="cuda", cpu_vae=True)
    assert host.vae_device() == torch.device("cpu")
    assert host.load_dtypes("auto") == host.LoadDtypes(F16, F32, F16)
    vae = torch.nn.Linear(2, 2)
    placed = host.placed_vae(vae)
    from kinema.models import placement

    assert placement.placement_of(placed).device == "cpu" and not placement.placement_of(placed).offload


def test_loaders_make_their_parts_in_the_dtypes_comfyui_asks_for(monkeypatch, host_dirs, demo_models_dir):
    """--bf16-unet, --fp16-vae and --fp32-text-enc on a CPU run: each part of Load Checkpoint in its own."""
    from conftest import load_pack
    from kinema.models.demo import write_demo_models

    name = os.path.basename(write_demo_models(demo_models_dir)["checkpoint"])
    _comfy(monkeypatch, ("bf16_unet", "fp16_vae", "fp32_text_enc"), device="cpu")
    model, clip, vae = load_pack().NODE_CLASS_MAPPINGS["KinemaCheckpointLoader"]().load(name, "auto")
    assert next(model.unet.parameters()).dtype == BF16
    assert next(vae.parameters()).dtype == F16
    assert next(clip.model.parameters()).dtype == F32


def test_free_vram_leaves_comfyuis_reserve(monkeypatch):
    from kinema.models import memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 8 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 512 << 20)
    _comfy(monkeypatch, reserve=1 << 30)
    assert memory.available_bytes("cuda") == (3 << 30) + (512 << 20) - (1 << 30)
    _comfy(monkeypatch, reserve=0)
    assert memory.available_bytes("cuda") == (3 << 30) + (512 << 20)


def test_save_path_gives_comfyui_the_prefix_it_read(monkeypatch, tmp_path):
    """Inside ComfyUI the file is numbered by its ``get_save_image_path``, which splits a prefix at the system's
    separator only: it gets the prefix as the pack read it (backslashes as folders, variables expanded), so a
    workflow's prefix names the same file on every system and outside ComfyUI."""
    seen, out = [], str(tmp_path / "output")

    def get_save_image_path(prefix, output_dir, width=0, height=0):  # ComfyUI's split and counter, in short
        seen.append(prefix)
        sub, name = os.path.split(os.path.normpath(prefix))
        return os.path.join(output_dir, sub), name, 1, sub, prefix

    monkeypatch.setattr(host, "_folder_paths", types.SimpleNamespace(
        get_output_directory=lambda: out, get_save_image_path=get_save_image_path))
    full, sub, name = host.save_path("Kinema\\%width%x%height%\\video", "mp4", 64, 48)
    assert seen == [os.path.join("Kinema", "64x48", "video")]
    assert (sub, name) == ("Kinema/64x48", "video_00001_.mp4") and full == os.path.join(out, "Kinema", "64x48", name)


# --- mutation audit of nodes/host.py: behaviour the tests above left open ----------------------------------------
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_an_embedding_linking_out_of_the_embeddings_folder_is_refused(tmp_path):
    """find_embedding applies the same link check as resolve_model: a file in models/embeddings that links
    outside every embeddings folder is never returned (a name that stays inside is found, with its extension)."""
    secret = _touch(tmp_path / "secret" / "fox.safetensors")
    folder = tmp_path / "models" / "embeddings"
    inside = _touch(folder / "cat.pt")
    os.symlink(secret, folder / "fox.safetensors")
    assert os.path.samefile(host.find_embedding("cat"), inside)
    with pytest.raises(KinemaError, match="outside the embeddings folder"):
        host.find_embedding("fox")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_a_folder_link_looping_back_is_walked_once(tmp_path):
    """A link to a parent folder inside the models folder does not make list_models loop or list the same
    file again under loop/loop/...: each real folder is walked once."""
    root = tmp_path / "models" / "loras"
    _touch(root / "sub" / "a.safetensors")
    os.symlink(root, root / "sub" / "loop")
    assert host.list_models("loras") == ["sub/a.safetensors"]


def test_a_name_in_several_folders_is_listed_once_and_the_first_folder_wins(tmp_path):
    """The same file name in the default folder and an added folder: list_models shows it once, and
    resolve_model takes the default folder's file (search order, as ComfyUI does)."""
    first = _touch(tmp_path / "models" / "vae" / "same.safetensors", b"first")
    extra = tmp_path / "shared_vae"
    _touch(extra / "same.safetensors", b"second")
    host.add_model_folder("vae", str(extra))
    assert host.list_models("vae") == ["same.safetensors"]
    assert os.path.samefile(host.resolve_model("vae", "same.safetensors"), first)


def test_model_extensions_are_matched_in_any_case(tmp_path):
    """Files saved with upper-case extensions (Windows downloads: MODEL.SAFETENSORS) are listed too."""
    _touch(tmp_path / "models" / "loras" / "STYLE.SAFETENSORS")
    _touch(tmp_path / "models" / "loras" / "Old.Ckpt")
    assert host.list_models("loras") == ["Old.Ckpt", "STYLE.SAFETENSORS"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_allow_symlinks_lets_an_input_link_out_and_takes_true_or_yes(tmp_path, monkeypatch):
    """resolve_input refuses an input that links out of the input folder unless KINEMA_ALLOW_SYMLINKS is set;
    the switch takes 1, true or yes, in any case, for inputs and models alike."""
    secret = _touch(tmp_path / "private" / "holiday.mp4")
    folder = tmp_path / "input"
    folder.mkdir()
    os.symlink(secret, folder / "link.mp4")
    host.set_input_dir(str(folder))
    with pytest.raises(KinemaError, match="outside the input folder"):
        host.resolve_input("link.mp4")
    for value in ("true", "Yes"):
        monkeypatch.setenv("KINEMA_ALLOW_SYMLINKS", value)
        assert host.resolve_input("link.mp4") == str(folder / "link.mp4")
        assert host.stays_inside(str(folder / "link.mp4"), [str(folder)])


def test_save_path_counter_ignores_longer_names_that_start_with_the_prefix(tmp_path):
    """The counter of prefix 'v' reads only v_<n>_ files: v2024_00001_.gif (another prefix) does not push it
    to 2025."""
    _touch(tmp_path / "output" / "v2024_00001_.gif")
    _touch(tmp_path / "output" / "v_00003_.gif")
    assert host.save_path("v", "gif")[2] == "v_00004_.gif"
    assert host.save_path("w", "gif")[2] == "w_00001_.gif"


def test_save_path_refuses_names_too_long_in_bytes(tmp_path):
    """A file or folder name of the prefix longer than 255 bytes (counted in UTF-8, not in characters) is a
    KinemaError naming the limit, before anything is made; a name just under it is fine."""
    with pytest.raises(KinemaError, match="too long for the file system.*at most 255"):
        host.save_path("\u00e9" * 125, "webp")  # 125 characters, 250 bytes, +12 for the counter
    with pytest.raises(KinemaError, match="too long for the file system"):
        host.save_path("\u00e9" * 150 + "/clip", "webp")  # a 300-byte folder name
    assert not os.path.exists(tmp_path / "output" / ("\u00e9" * 150))
    assert host.save_path("a" * 243, "webp")[2] == "a" * 243 + "_00001_.webp"


def test_a_model_name_holding_a_nul_character_is_a_clear_error(tmp_path):
    _touch(tmp_path / "models" / "loras" / "a.safetensors")
    with pytest.raises(KinemaError, match="NUL character"):
        host.resolve_model("loras", "a\x00.safetensors")


def test_a_file_where_a_model_folder_is_asked_for_is_not_found(tmp_path):
    _touch(tmp_path / "models" / "depth_models" / "model.safetensors")
    with pytest.raises(KinemaError, match="model folder 'model.safetensors' not found"):
        host.resolve_model_dir("depth_models", "model.safetensors")


def test_folders_given_relative_are_kept_absolute(tmp_path, monkeypatch):
    """A relative folder is taken from the working directory at the call, not at each later use."""
    monkeypatch.chdir(tmp_path)
    host.add_model_folder("vae", "extra_vae")
    host.set_temp_dir("tmp_previews")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert host.model_folders("vae")[1] == str(tmp_path / "extra_vae")
    assert host.get_temp_directory() == str(tmp_path / "tmp_previews")


def test_date_variables_of_a_save_prefix_have_two_digits(monkeypatch):
    stamp = time.struct_time((2026, 3, 4, 5, 6, 7, 2, 63, 0))
    monkeypatch.setattr(host.time, "localtime", lambda *a: stamp)
    _, sub, name = host.save_path("%year%-%month%-%day%/%hour%%minute%%second%", "webp")
    assert (sub, name) == ("2026-03-04", "050607_00001_.webp")


def test_a_progress_bar_of_a_negative_total_counts_from_zero():
    bar = host.ProgressBar(-3)
    assert bar.total == 0
    bar.update_absolute(2, total=-1)
    assert (bar.current, bar.total) == (2, 0)


def test_a_progress_log_outside_a_terminal_says_a_line_at_most_every_five_seconds(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(host.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="kinema")
    bar = host.ProgressBar(10, desc="steps")
    for at in (0.0, 4.5, 6.0, 10.0):  # seconds after the start
        clock[0] = 100.0 + at
        bar.update()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("steps:")]
    assert [line.split()[1] for line in lines] == ["2/10", "4/10"]
