"""Model offload: sub-models on the compute device only while they run, the video model for a sampling run, the
defaults by VRAM state, and the Memory Policy node. Moves are instrumented; the CPU plays both sides ("cpu" computes,
"cpu:1" marks storage: torch keeps CPU tensors in one memory anyway)."""
import logging

import pytest
import torch
from conftest import load_pack
from fixtures import motion_model, vae
from kinema.models import memory, offload, pipelines, placement
from kinema.models.errors import KinemaError, KinemaOutOfMemoryError
from kinema.models.offload import OffloadOptions
from kinema.models.placement import Placement
from kinema.models.vae import decode_frames

HW = 16


class Moves:
    """Where each watched module is after every move: ``cpu`` is the compute side, ``cpu:1`` storage."""

    def __init__(self):
        self.log: list[tuple[int, str]] = []

    def __call__(self, module, device):
        self.log.append((id(module), str(device)))

    def where(self, module) -> str | None:
        return next((d for m, d in reversed(self.log) if m == id(module)), None)

    def count(self, module) -> int:
        return sum(1 for m, _ in self.log if m == id(module))


def _sub(watch) -> Placement:
    return Placement(device="cpu", offload=True, storage="cpu:1", on_move=watch)


def _video_opts(mode, watch, **kw) -> OffloadOptions:
    return OffloadOptions(mode=mode, device="cpu", storage="cpu:1", on_move=watch, **kw)


def _sample(model, frames=4):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg, torch.zeros(frames, 4, HW, HW),
                                      pipelines.SampleOptions(seed=7, steps=2, cfg=5.0))


def test_an_offloaded_model_is_on_the_device_only_inside_the_call_and_nested_uses_move_it_once():
    watch = Moves()
    net = placement.place(torch.nn.Linear(3, 3), _sub(watch))
    assert watch.where(net) == "cpu:1"  # placed at rest in storage
    with placement.on_device(net, None):
        assert watch.where(net) == "cpu"
        with placement.on_device(net):
            pass
        assert watch.where(net) == "cpu" and watch.count(net) == 2  # the inner use moved nothing
    assert watch.where(net) == "cpu:1" and watch.count(net) == 3
    with pytest.raises(ValueError), placement.on_device(net):
        raise ValueError("a failing call")
    assert watch.where(net) == "cpu:1"  # back in storage also after a failure


def test_a_resident_placement_lives_on_the_device_and_is_never_moved_by_a_call():
    watch = Moves()
    net = placement.place(torch.nn.Linear(3, 3), Placement(device="cpu", storage="cpu:1", on_move=watch))
    assert watch.log == [(id(net), "cpu")]
    with placement.on_device(net):
        pass
    assert len(watch.log) == 1


def test_an_encoder_wrapper_moves_its_model():
    class Wrapper:
        def __init__(self):
            self.model = torch.nn.Linear(2, 2)

    watch = Moves()
    wrapper = placement.place(Wrapper(), _sub(watch))
    with placement.on_device(wrapper):
        assert watch.where(wrapper.model) == "cpu"
    assert watch.where(wrapper.model) == "cpu:1"


def test_vae_decode_with_model_offload_is_the_same_and_leaves_the_vae_in_storage():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = decode_frames(vae(), z)
    watch = Moves()
    offloaded = placement.place(vae(), _sub(watch))
    try:
        out = decode_frames(offloaded, z)
    finally:
        delattr(offloaded, placement.ATTR)  # the fixture VAE is shared by other tests
    assert torch.equal(out, plain)
    assert [d for _, d in watch.log] == ["cpu:1", "cpu", "cpu:1"]


def test_model_offload_brings_the_unet_and_motion_module_for_the_sampling_run_only():
    plain = _sample(motion_model("v2"))
    watch = Moves()
    model = motion_model("v2").with_options(offload=_video_opts("model", watch))
    out = _sample(model)
    assert float((out - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    for m in (model.unet, model.motion):  # in once for the whole run (not per step), back to storage after
        assert [d for i, d in watch.log if i == id(m)] == ["cpu", "cpu:1"]
    assert model.compute_device == torch.device("cpu")


@pytest.mark.parametrize("addon", ["controlnet", "ip_adapter"])
def test_block_offload_brings_the_addons_for_the_run(addon):
    from kinema.models.addons import ControlHint, ImageContent

    # after the run each goes back where its own placement keeps it (an unplaced one: the video model's storage):
    # one kept on the device (--highvram) must be there for a later run that moves nothing
    for own, after in [(None, "cpu:1"), (placement.Placement(device="cpu"), "cpu"),
                       (placement.Placement(device="cpu:2", storage="cpu:1"), "cpu:2"),  # kept on its device
                       (placement.Placement(device="cpu", offload=True, storage="cpu:1"), "cpu:1")]:
        net = torch.nn.Linear(1, 1)  # not run: only placed
        if own is not None:
            setattr(net, placement.ATTR, own)
        if addon == "controlnet":
            extra = {"controls": (ControlHint(controlnet=net, hints=torch.zeros(1, 3, 8, 8)),)}
        else:
            extra = {"contents": (ImageContent(net, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)),)}
        watch = Moves()
        model = motion_model("v2").with_options(**extra, offload=_video_opts("block", watch))
        with placement.video_model_on_device(model):
            assert watch.where(net) == "cpu" and watch.where(model.unet) is None  # the UNet is streamed per block
        assert watch.where(net) == after, own


def test_defaults_by_vram_state():
    video, sub = memory.default_policy("cpu", "cpu")
    assert video.mode == "none" and not sub.offload and video.device == "cpu"
    video, sub = memory.default_policy("high", "cuda")
    assert video.mode == "none" and video.device == "cuda" and not sub.offload and sub.device == "cuda"
    video, sub = memory.default_policy("normal", "cuda")
    assert video.mode == "model" and sub.offload and (sub.device, sub.storage) == ("cuda", "cpu")
    video, _ = memory.default_policy("low", "cuda")
    assert (video.mode, video.resident, video.batch_cond) == ("block", 2, True)
    video, _ = memory.default_policy("none", "cuda")
    assert (video.mode, video.resident, video.batch_cond) == ("block", 1, False)
    video, _ = memory.default_policy("normal", "cpu")  # no accelerator: nothing to offload to
    assert video.mode == "none"
    with pytest.raises(KinemaError, match="VRAM state"):
        memory.default_policy("huge", "cuda")


def test_where_the_video_model_rests_between_runs():
    """none: on its device (--highvram: loaded there once, not moved in at every run); model and block offload:
    in storage."""
    assert placement.resting_device(OffloadOptions(mode="none", device="cuda:0")) == torch.device("cuda:0")
    assert placement.resting_device(OffloadOptions(mode="none")) == torch.device("cpu")
    for mode in ("model", "block"):
        opts = OffloadOptions(mode=mode, device="cuda:0", storage="cpu")
        assert placement.resting_device(opts) == torch.device("cpu")


def test_the_host_asks_comfyui_to_make_room_before_a_model_comes_in(monkeypatch):
    host = load_pack().nodes.host
    asked = []

    class FakeComfy:
        @staticmethod
        def free_memory(size, device):
            asked.append((size, device))

    monkeypatch.setattr(host, "_comfy_mm", FakeComfy)
    moved = []
    monkeypatch.setattr(placement, "bring", lambda m, d: moved.append(str(d)) or [])
    monkeypatch.setattr(placement, "return_to", lambda m, stash, d: moved.append(str(d)))
    net = torch.nn.Linear(4, 4)  # 20 floats
    net.kinema_placement = Placement(device="cuda", offload=True)
    with placement.on_device(net):
        pass
    assert moved == ["cuda", "cpu"]
    assert asked == [(80 + (256 << 20), torch.device("cuda"))]


def test_a_models_size_counts_its_buffers_and_the_cpu_needs_no_room(monkeypatch):
    """What the host is asked to free for a model is its parameters and its buffers (a motion module's positional
    tables); the CPU is never asked for (ComfyUI frees the accelerator)."""
    net = torch.nn.Linear(4, 4)  # 20 floats
    net.register_buffer("table", torch.zeros(1 << 18))  # 1 MiB
    assert placement.module_bytes(net) == 80 + (1 << 20)
    asked = []
    monkeypatch.setattr(placement, "_make_room", lambda size, device: asked.append((size, device)))
    placement.make_room(1 << 20, torch.device("cpu"))
    assert asked == []
    placement.make_room(1 << 20, torch.device("cuda"))
    assert asked == [(1 << 20, torch.device("cuda"))]
    asked.clear()  # after an out-of-memory error on the CPU: ComfyUI is not asked to unload its models either
    placement.make_room_all(torch.device("cpu"))
    assert asked == []
    placement.make_room_all(torch.device("cuda", 0))
    assert asked == [(placement.ALL_BYTES, torch.device("cuda", 0))]


def test_errors_other_than_out_of_memory_pass_unchanged(monkeypatch):
    """Only the allocator's errors become the pack's out-of-memory error or a retry: a bug (ValueError) is not
    reported as memory, neither at the first run nor at the retry."""
    monkeypatch.setattr(memory, "release_cached_memory", lambda: None)
    bug = ValueError("a bug, not memory")
    with pytest.raises(ValueError) as caught, memory.remedy_for_out_of_memory("decoding", "lower it"):
        raise bug
    assert caught.value is bug

    def run(setting):
        if setting == "big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise bug

    with pytest.raises(ValueError) as caught:
        memory.run_with_oom_retry(run, "big", lambda s: "small", "decoding", "lower it")
    assert caught.value is bug

def test_after_an_out_of_memory_error_the_host_is_asked_to_unload_its_idle_models(monkeypatch):
    """ComfyUI keeps its own models loaded between prompts: before an out-of-memory retry it is asked to free all it
    can (``placement.make_room_all``), then the cached blocks go back; a failing host does not stop the retry."""
    host = load_pack().nodes.host
    asked, emptied = [], []

    class FakeComfy:
        @staticmethod
        def free_memory(size, device):
            asked.append((size, device))

    monkeypatch.setattr(host, "_comfy_mm", FakeComfy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    memory.release_cached_memory()
    assert asked == [(placement.ALL_BYTES + (256 << 20), torch.device("cuda", 0))] and emptied == [True]

    class BrokenComfy:
        @staticmethod
        def free_memory(size, device):
            raise RuntimeError("ComfyUI's API moved")

    monkeypatch.setattr(host, "_comfy_mm", BrokenComfy)  # the host's hook swallows it: the retry goes on
    memory.release_cached_memory()
    assert emptied == [True, True]

    calls = []
    monkeypatch.setattr(memory, "release_cached_memory", lambda: calls.append("released"))

    def run(setting):
        calls.append(setting)
        if setting == "big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    assert memory.run_with_oom_retry(run, "big", lambda s: "small", "decoding", "lower it") == ("done", "small")
    assert calls == ["big", "released", "small"]


def test_an_out_of_memory_retry_that_fails_names_the_remedy_for_the_last_setting_tried(monkeypatch, caplog):
    """The retry is said in the log; a second out-of-memory error names the remedy of the smaller setting, and one
    with nothing smaller to try that of the first."""
    calls = []
    monkeypatch.setattr(memory, "release_cached_memory", lambda: calls.append("released"))

    def run(setting):
        calls.append(setting)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with caplog.at_level(logging.WARNING, logger="kinema"), pytest.raises(KinemaOutOfMemoryError) as caught:
        memory.run_with_oom_retry(run, "big", lambda s: "small", "decoding", lambda s: f"make {s} smaller")
    assert calls == ["big", "released", "small", "released"]
    assert str(caught.value) == "decoding ran out of memory, also with small: make small smaller"
    assert "decoding ran out of memory with big; retrying once with small" in caplog.text
    calls.clear()
    with pytest.raises(KinemaOutOfMemoryError) as caught:
        memory.run_with_oom_retry(run, "big", lambda s: None, "decoding", lambda s: f"make {s} smaller")
    assert calls == ["big", "released"]
    assert str(caught.value).endswith("nothing smaller to retry with: make big smaller")


def test_auto_precision_is_fp16_on_cuda_and_fp32_elsewhere():
    assert memory.pick_dtype("auto", "cuda") == memory.pick_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert memory.pick_dtype("auto", "cpu") == memory.pick_dtype("auto", "mps") == torch.float32
    assert [memory.pick_dtype(p, "cuda") for p in ("fp32", "fp16", "bf16")] == [torch.float32, torch.float16,
                                                                                 torch.bfloat16]
    with pytest.raises(KinemaError, match="unknown precision 'fp8'"):
        memory.pick_dtype("fp8", "cpu")


def test_the_host_is_asked_for_the_faster_ways_memory_but_only_the_needed_memory_is_required(monkeypatch):
    """``check_fits(needed, wanted=...)``: where the free memory is short of what batching cond and uncond wants,
    the host is asked to free that much; the work goes on when what it needs at the least is free."""
    asked = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: 3 << 29)  # 1.5 GiB, the host frees nothing
    monkeypatch.setattr(placement, "_make_room", lambda nbytes, device: asked.append((nbytes, device.type)))
    memory.check_fits(1 << 30, "cuda", "sampling", "lower it", wanted=2 << 30)
    assert asked == [(2 << 30, "cuda")]
    asked.clear()
    memory.check_fits(1 << 30, "cuda", "sampling", "lower it", wanted=1 << 29)  # both fit: nothing asked
    assert asked == []
    with pytest.raises(KinemaOutOfMemoryError, match="sampling needs about 2.00 GiB but cuda has 1.50 GiB free"):
        memory.check_fits(2 << 30, "cuda", "sampling", "lower it", wanted=4 << 30)
    assert asked == [(4 << 30, "cuda")]


def test_the_cpus_available_memory_is_read_in_bytes_from_meminfo(monkeypatch):
    import io

    meminfo = "MemTotal:       16384 kB\nMemFree:         1024 kB\nMemAvailable:    4096 kB\n"
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert memory.available_bytes("cpu") == 4096 * 1024

    def unreadable(path):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", unreadable, raising=False)
    assert memory.available_bytes("cpu") is None


def test_a_precision_cast_leaves_integer_parameters_and_returns_a_module_with_nothing_to_cast():
    net = torch.nn.Linear(2, 2).half()
    net.steps = torch.nn.Parameter(torch.arange(3), requires_grad=False)  # an integer parameter: not a weight
    assert memory.cast_weights(net, torch.float16) is net
    full = memory.cast_weights(net, torch.float32)
    assert full.weight.dtype == torch.float32 and full.steps.dtype == torch.int64
    assert net.weight.dtype == torch.float16  # the input is never changed


def test_a_move_that_runs_out_of_memory_half_way_leaves_nothing_on_the_device(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    before = [t.data_ptr() for t in net.parameters()]
    real, calls = torch.Tensor.to, []

    def to(self, *args, **kwargs):  # a copy elsewhere, the third runs out of memory
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(self, *args, **kwargs).clone()

    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(torch.OutOfMemoryError):
        offload.bring(net, torch.device("cpu", 1))
    assert len(calls) == 3 and [t.data_ptr() for t in net.parameters()] == before  # the two moved are put back


def test_a_model_that_does_not_fit_is_tried_once_more_after_the_host_frees_memory(monkeypatch, caplog):
    """Bringing a model in runs out of memory: the host is asked to free all it holds and the move tried once more
    (said in the log); a second failure is the pack's out-of-memory error with the size and what to change, and the
    model stays in storage."""
    asked, tries, moved = [], [], []
    monkeypatch.setattr(placement, "_make_room", lambda size, device: asked.append(size))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(placement, "return_to", lambda m, stash, d: moved.append(str(d)))

    def bring(module, device, fail=1):  # as on a GPU, without moving anything
        tries.append(str(device))
        if len(tries) <= fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        moved.append(str(device))
        return []

    monkeypatch.setattr(placement, "bring", bring)
    net = torch.nn.Linear(4, 4)
    net.kinema_placement = Placement(device="cuda", offload=True)
    with caplog.at_level(logging.WARNING, logger="kinema"), placement.on_device(net):
        pass
    assert tries == ["cuda", "cuda"] and moved == ["cuda", "cpu"] and "trying once more" in caplog.text
    assert asked[-1] == placement.ALL_BYTES  # after room for its size: everything the host holds

    tries.clear(), moved.clear()
    monkeypatch.setattr(placement, "bring", lambda m, d: bring(m, d, fail=2))
    with pytest.raises(KinemaOutOfMemoryError, match=r"Linear \(0.00 GiB of weights\).*offload block"), \
            placement.on_device(net):
        pass
    assert len(tries) == 2 and moved == [] and not placement._users  # never entered, nothing to send back


def test_the_host_reads_comfyuis_vram_state(monkeypatch):
    host = load_pack().nodes.host

    class State:
        name = "LOW_VRAM"

    class FakeComfy:
        vram_state = State

        @staticmethod
        def get_torch_device():
            return torch.device("cuda")

    monkeypatch.setattr(host, "_comfy_mm", FakeComfy)
    assert host.vram_state() == "low"
    assert host.memory_defaults()[0].mode == "block"
    State.name = "HIGH_VRAM"
    assert host.vram_state() == "high"
    monkeypatch.setattr(host, "_comfy_mm", None)
    monkeypatch.setenv("KINEMA_DEVICE", "cpu")
    assert host.vram_state() == "cpu"
    monkeypatch.delenv("KINEMA_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("KINEMA_VRAM", "cpu")  # everything on the CPU, a GPU or not
    assert host.compute_device() == torch.device("cpu") and host.vram_state() == "cpu"
    assert host.memory_defaults()[0].device == "cpu"
    monkeypatch.setenv("KINEMA_VRAM", "hi")
    with pytest.raises(KinemaError, match="KINEMA_VRAM='hi' is not a VRAM mode: set it to one of cpu, high"):
        host.vram_state()
    monkeypatch.delenv("KINEMA_VRAM")
    monkeypatch.setenv("KINEMA_DEVICE", "gpu0")
    with pytest.raises(KinemaError, match="KINEMA_DEVICE='gpu0' is not a torch device"):
        host.compute_device()


@pytest.mark.parametrize("env,comfy", [(None, None), ("cuda", None), (None, "cuda"), ("cuda:1", None)],
                         ids=["default", "KINEMA_DEVICE=cuda", "ComfyUI's bare cuda", "KINEMA_DEVICE=cuda:1"])
def test_the_compute_device_names_its_cuda_index(monkeypatch, env, comfy):
    """A bare ``cuda`` never equals a tensor's ``cuda:0``: the weights already there would count as elsewhere on
    every run. The compute device carries the current device's index (an index given stays)."""
    from kinema.nodes import host

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("KINEMA_VRAM", raising=False)
    if env is None:
        monkeypatch.delenv("KINEMA_DEVICE", raising=False)
    else:
        monkeypatch.setenv("KINEMA_DEVICE", env)
    fake = None if comfy is None else type("FakeComfy", (), {"get_torch_device": staticmethod(
        lambda: torch.device(comfy))})
    monkeypatch.setattr(host, "_comfy_mm", fake)
    assert host.compute_device() == torch.device("cuda:1" if env == "cuda:1" else "cuda:0")


def test_none_moves_a_model_whose_shared_buffers_another_policy_moved(monkeypatch):
    """A Memory Policy precision copy shares the motion module's positional tables (buffers) with the loaded
    model; when another policy moved them away, a run under none brings the model back whole."""
    node = load_pack().nodes.memory.KinemaMemoryPolicy()
    loaded = motion_model("v2")
    (copy,) = node.apply(loaded, "none", 2, 0, True, "bf16")
    shared = {id(b) for b in loaded.motion.buffers()} & {id(b) for b in copy.motion.buffers()}
    assert shared  # the tables are the same tensors
    owner, name = next((m, n) for m in copy.motion.modules() for n, b in m.named_buffers(recurse=False)
                       if id(b) in shared)
    moved = []
    monkeypatch.setattr(placement, "_move", lambda m, device, on_move: moved.append((m, device)))
    model = copy.with_options(offload=OffloadOptions(mode="none", device="cpu"))
    with placement.video_model_on_device(model):
        assert moved == []  # everything where it should be: nothing moves
    table = getattr(owner, name)
    setattr(owner, name, table.to("meta"))  # stands in for a table left on another device
    try:
        with placement.video_model_on_device(model):
            assert [m for m, _ in moved] == [model.motion]
    finally:
        setattr(owner, name, table)  # the fixture's modules are shared with other tests


def test_memory_policy_node_modes_and_precision():
    node = load_pack().nodes.memory.KinemaMemoryPolicy()
    (auto,) = node.apply(motion_model("v2"))
    assert auto.offload.mode == "none"  # no accelerator here
    (model,) = node.apply(motion_model("v2"), "model")
    assert model.offload.mode == "model" and model.offload.device is not None
    source = motion_model("v2")
    (half,) = node.apply(source, "none", precision="bf16")
    assert half.unet.dtype == torch.bfloat16 and next(half.motion.parameters()).dtype == torch.bfloat16
    assert source.unet.dtype == torch.float32 and next(source.motion.parameters()).dtype == torch.float32
    plain, out = _sample(source), _sample(half)
    assert float((out - plain).abs().max()) <= 0.1 * float(plain.abs().max())  # bf16: close, not equal
    (same,) = node.apply(source, "none", precision="fp32")
    assert same.unet is source.unet  # nothing to convert: no copy
    assert node.apply(half, "none", precision="fp32")[0].unet.dtype == torch.float32  # bf16 back to fp32


def test_weights_are_not_copied_back_from_the_device(monkeypatch):
    from kinema.models.offload import bring, send_back

    net = torch.nn.Linear(3, 3)
    net.register_buffer("table", torch.arange(3.0))
    before = [(t.data, t.data.clone()) for t in (*net.parameters(), *net.buffers())]
    # a CPU-only stand-in for a device copy: "cpu:1" tensors are clones (torch keeps them on the CPU)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self.clone())
    stash = bring(net, torch.device("cpu", 1))
    on_device = [t.data for t in (*net.parameters(), *net.buffers())]
    assert all(d.data_ptr() != s.data_ptr() for d, (s, _) in zip(on_device, before))
    for d in on_device:
        d.fill_(7.0)  # what happens on the device never comes back
    send_back(stash)
    after = [t.data for t in (*net.parameters(), *net.buffers())]
    assert all(a.data_ptr() == s.data_ptr() and torch.equal(a, v) for a, (s, v) in zip(after, before))


def _txt2vid_by_nodes(nodes):
    model, clip, vae = nodes["KinemaCheckpointLoader"]().load("kinema_demo_sd15.safetensors", "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load("kinema_demo_mm_v3.safetensors", "fp32")
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "a fox")
    (neg,) = nodes["KinemaTextEncode"]().encode(clip, "")
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(4, 64, 64)
    (out,) = nodes["KinemaVideoSampler"]().sample(video, pos, neg, latent, 7, 2, 7.5, "euler", "normal", 1.0)
    (images,) = nodes["KinemaVAEDecodeFrames"]().decode(vae, out, 4)
    return images, (video.unet, video.motion, clip.model, vae)


def test_the_default_model_offload_gives_the_same_video_and_every_model_rests_in_storage(host_dirs, monkeypatch):
    nodes = load_pack().NODE_CLASS_MAPPINGS
    plain, _ = _txt2vid_by_nodes(nodes)
    watch = Moves()
    video_policy, sub = memory.default_policy("normal", "cuda")  # as on a GPU, with the CPU playing the GPU
    monkeypatch.setattr(host_dirs, "memory_defaults", lambda: (
        OffloadOptions(mode=video_policy.mode, device="cpu", storage="cpu:1", on_move=watch),
        Placement(device="cpu", offload=sub.offload, storage="cpu:1", on_move=watch)))
    offloaded, models = _txt2vid_by_nodes(nodes)
    # pixels in [0, 1]: fp32 rounding (fresh tensors may take other kernel paths), far below one 8-bit level
    assert torch.allclose(offloaded, plain, atol=1e-4)
    for k, m in enumerate(models):  # each one came in for its work (the UNet once for the run) and went back
        trail = [d for i, d in watch.log if i == id(placement.weights_of(m))]
        assert trail[-2:] == ["cpu", "cpu:1"] and (k > 1 or trail.count("cpu") == 1)


def test_a_move_that_fails_for_another_reason_is_not_retried_nor_reported_as_memory(monkeypatch, caplog):
    """Only out-of-memory errors are retried: a bug (ValueError) while bringing a model in passes unchanged after
    one try, with no retry in the log; one at the retry (after an out-of-memory error) passes unchanged too."""
    tries, asked = [], []
    monkeypatch.setattr(placement, "_make_room", lambda size, device: asked.append(size))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    bug = ValueError("a bug, not memory")

    def bring(module, device, oom=0):  # as on a GPU, without moving anything
        tries.append(str(device))
        if len(tries) <= oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise bug

    monkeypatch.setattr(placement, "bring", bring)
    net = torch.nn.Linear(4, 4)
    net.kinema_placement = Placement(device="cuda", offload=True)
    with caplog.at_level(logging.WARNING, logger="kinema"), pytest.raises(ValueError) as caught, \
            placement.on_device(net):
        pass
    assert caught.value is bug and tries == ["cuda"] and "trying once more" not in caplog.text
    assert placement.ALL_BYTES not in asked and not placement._users

    tries.clear()
    monkeypatch.setattr(placement, "bring", lambda m, d: bring(m, d, oom=1))
    with caplog.at_level(logging.WARNING, logger="kinema"), pytest.raises(ValueError) as caught, \
            placement.on_device(net):
        pass
    assert caught.value is bug and not isinstance(caught.value, KinemaOutOfMemoryError)
    assert tries == ["cuda", "cuda"] and "trying once more" in caplog.text and not placement._users


def test_placing_a_model_a_call_is_using_waits_for_the_call():
    """``place`` while a call uses the model (a node re-placing it mid-run) attaches the placement but moves
    nothing: the running call keeps its weights on the device; they go back to storage when it ends, and a later
    ``place`` moves them again."""
    watch = Moves()
    net = placement.place(torch.nn.Linear(3, 3), _sub(watch))
    with placement.on_device(net):
        assert watch.where(net) == "cpu"
        again = Placement(device="cpu", offload=True, storage="cpu:2", on_move=watch)
        assert placement.place(net, again) is net and placement.placement_of(net) is again
        assert watch.where(net) == "cpu" and watch.count(net) == 2  # not moved mid-call
    assert watch.where(net) == "cpu:1" and watch.count(net) == 3
    placement.place(net, again)
    assert watch.where(net) == "cpu:2" and watch.count(net) == 4


def test_resting_a_video_model_that_is_sampling_waits_for_the_run():
    """``rest`` (the loaders, the Memory Policy node) leaves the UNet and motion module of a running sampling call
    where they are; the run itself sends them back to storage after, and a later ``rest`` moves them."""
    watch = Moves()
    model = motion_model("v2").with_options(offload=_video_opts("model", watch))
    with placement.video_model_on_device(model):
        placement.rest(model, model.offload)
        for m in (model.unet, model.motion):
            assert [d for i, d in watch.log if i == id(m)] == ["cpu"]  # still on the device, moved once
    for m in (model.unet, model.motion):
        assert [d for i, d in watch.log if i == id(m)] == ["cpu", "cpu:1"]
    placement.rest(model, model.offload)
    for m in (model.unet, model.motion):
        assert [d for i, d in watch.log if i == id(m)] == ["cpu", "cpu:1", "cpu:1"]


def test_resting_under_none_with_a_device_moves_the_video_model_there():
    """Under none a named device is where the UNet and motion module live (--highvram: loaded there once), so
    ``rest`` moves them there; with no device they stay where they are."""
    watch = Moves()
    model = motion_model("v2")
    placement.rest(model, OffloadOptions(mode="none", on_move=watch))
    assert watch.log == []
    placement.rest(model, OffloadOptions(mode="none", device="cpu", on_move=watch))
    assert [d for i, d in watch.log if i == id(model.unet)] == ["cpu"]
    assert [d for i, d in watch.log if i == id(model.motion)] == ["cpu"]


def test_a_run_under_none_leaves_the_weights_a_running_call_is_using_where_they_are(monkeypatch):
    """A model whose UNet and motion module another call (model offload) is using is not moved by a nested run of
    the same weights under none on another device: the outer call computes with them; they go back after it."""
    watch, moved = Moves(), []
    outer = motion_model("v2").with_options(offload=_video_opts("model", watch))
    inner = outer.with_options(offload=OffloadOptions(mode="none", device="cuda:0"))
    with placement.video_model_on_device(outer):
        monkeypatch.setattr(placement, "_move", lambda m, device, on_move: moved.append((m, device)))
        with placement.video_model_on_device(inner):
            assert moved == []
    for m in (outer.unet, outer.motion):
        assert [d for i, d in watch.log if i == id(m)] == ["cpu", "cpu:1"]
