"""Block offload: the same video, at most the configured number of blocks on the compute device, everything back
in storage after each call (moves instrumented; works with the CPU as the compute device)."""
import contextlib

import pytest
import torch
from conftest import load_pack
from fixtures import motion_model
from fixtures_offload import HW, Residency, cpu_block_offload, sample_small
from kinema.models import offload, pipelines
from kinema.models.errors import KinemaError
from kinema.models.offload import BlockStreamer, OffloadOptions, stream_blocks


@pytest.mark.parametrize("resident", [1, 2, 3])
def test_block_offload_gives_the_same_video_with_at_most_n_blocks_resident(resident):
    watch = Residency()
    plain = sample_small(motion_model("v2"))
    streamed = sample_small(motion_model("v2").with_options(offload=cpu_block_offload(resident, watch)))
    assert float((streamed - plain).abs().max()) <= 1e-5 * float(plain.abs().max())
    unet_blocks = len(motion_model("v2").unet.input_blocks) + 1 + len(motion_model("v2").unet.output_blocks)
    assert watch.most == resident and watch.moves >= 2 * unet_blocks * 2  # in and out, every block, each step
    assert not watch.on  # all back in storage after the call


def test_each_streamed_block_brings_its_motion_modules():
    """A block and the temporal modules of its slot move as one unit: on a GPU a motion module left in storage
    would meet the block's activations on another device (on the CPU the test sees the moves, not a crash)."""
    from kinema.models.motion import MotionModule

    watch, brought = Residency(), set()

    def on_move(module, device):
        watch(module, device)
        if watch.on_compute(device):
            brought.update(id(m) for m in module.modules())

    model = motion_model("v2").with_options(offload=OffloadOptions(mode="block", device="cpu", storage="cpu:1",
                                                                   resident=2, on_move=on_move))
    sample_small(model)
    motion_modules = [m for m in model.motion.modules() if isinstance(m, MotionModule)]
    assert motion_modules and all(id(m) in brought for m in motion_modules)
    assert watch.most == 2 and not watch.on


def test_blocks_go_back_to_storage_when_a_call_fails():
    watch = Residency()
    model = motion_model("v2").with_options(offload=cpu_block_offload(2, watch))
    with pytest.raises(RuntimeError):
        model(torch.zeros(4, 3, HW, HW), torch.zeros(4), torch.zeros(4, 77, 64), 4)  # 3 channels: the conv fails
    assert watch.moves > 0 and not watch.on


def test_prefetch_never_evicts_the_block_in_use():
    watch = Residency()
    streamer = BlockStreamer(cpu_block_offload(2, watch))
    a, b, c = (torch.nn.Linear(2, 2) for _ in range(3))
    streamer.use(a)
    streamer.prefetch(b)
    assert streamer.on_device == [a, b]
    streamer.use(b)
    streamer.prefetch(c)
    assert streamer.on_device == [b, c]
    streamer.close()
    assert streamer.on_device == [] and not watch.on


def test_prefetching_a_resident_block_again_moves_nothing_and_evicts_nothing():
    """A block already on the device is not brought again by a prefetch: no move, no eviction of the block in use
    (a second bring would also find its tensors on the device and lose their storage copies)."""
    watch = Residency()
    streamer = BlockStreamer(cpu_block_offload(2, watch))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    streamer.use(a)
    streamer.prefetch(b)
    streamer.prefetch(b)
    assert streamer.on_device == [a, b] and watch.moves == 2 and watch.on == {id(a), id(b)}
    streamer.close()
    assert not watch.on


def test_with_one_resident_block_prefetch_waits_for_the_block_in_use():
    """--novram keeps one block on the device: a prefetch then would evict the block about to run."""
    watch = Residency()
    streamer = BlockStreamer(cpu_block_offload(1, watch))
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    streamer.use(a)
    streamer.prefetch(b)
    assert streamer.on_device == [a] and watch.moves == 1
    streamer.use(b)
    assert streamer.on_device == [b]
    streamer.close()
    assert not watch.on


class FakeCopyStream:
    """Stands in for ``offload.CopyStream`` (CUDA only): logs the copies made on it and the hand-overs."""

    def __init__(self):
        self.inside, self.log = False, []

    @contextlib.contextmanager
    def copying(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def hand_over(self, stash):
        self.log.append(("hand over", stash))


def test_prefetched_blocks_are_handed_over_to_the_compute_stream_before_they_run():
    """On CUDA a prefetched block's weights are copied on a side stream: the compute stream must wait for them and
    own them (``record_stream``) before the block runs, or a later copy could overwrite them while it reads."""
    copies = FakeCopyStream()
    brought = {}  # block -> (the stash of its tensors' storage copies, copied on the side stream?)

    def watch(unit, device):
        if device.index is None:  # to the compute side (see cpu_block_offload)
            brought[unit[0]] = (streamer._stashes[id(unit)], copies.inside)

    streamer = BlockStreamer(cpu_block_offload(2, watch))
    streamer._copies = copies
    blocks = [torch.nn.Linear(2, 2) for _ in range(4)]
    for block in stream_blocks(streamer, blocks, "input"):
        copies.log.append(("run", block))
    streamer.close()
    assert [brought[b][1] for b in blocks] == [False, True, True, True]  # the first is brought for use at once
    for i, block in enumerate(blocks[1:], start=1):
        run = copies.log.index(("run", block))
        assert copies.log[run - 1][0] == "hand over" and copies.log[run - 1][1] is brought[block][0], copies.log
        assert copies.log[run - 2] == ("run", blocks[i - 1])
    assert sum(entry[0] == "hand over" for entry in copies.log) == 3


def test_offload_options_are_checked():
    with pytest.raises(KinemaError, match="offload mode"):
        OffloadOptions(mode="disk").validate()
    with pytest.raises(KinemaError, match="resident_blocks must be 1 or more"):
        OffloadOptions(mode="block", device="cpu", resident=0).validate()
    with pytest.raises(KinemaError, match="compute device"):
        OffloadOptions(mode="model").validate()
    with pytest.raises(KinemaError, match="attention chunk must be 0"):
        OffloadOptions(attn_chunk=-1).validate()


def test_memory_policy_node():
    node = load_pack().nodes.memory.KinemaMemoryPolicy()
    (model,) = node.apply(motion_model("v2"), "block", 3)
    assert model.offload.mode == "block" and model.offload.resident == 3 and motion_model("v2").offload.mode == "none"
    with pytest.raises(KinemaError, match="input 'model' takes a KINEMA_MODEL, got object"):
        node.apply(object(), "block", 2)


def test_svd_block_and_model_offload_give_the_same_video():
    import tempfile

    from fixtures_svd_pipeline import tiny_img2vid

    with tempfile.TemporaryDirectory() as tmp:
        bundle, cond, uncond, latent = tiny_img2vid(tmp)
    opts = pipelines.SampleOptions(seed=1, steps=2, cfg=2.5, scheduler="karras")
    plain = pipelines.sample_img2vid(bundle.model, cond, uncond, latent, opts)
    watch = Residency()
    streamed = pipelines.sample_img2vid(bundle.model.with_options(offload=cpu_block_offload(2, watch)), cond, uncond,
                                        latent, opts)
    # moved weights are fresh copies: the CPU kernels may round differently, and EDM sampling amplifies it
    assert float((streamed - plain).abs().max()) <= 1e-4 * float(plain.abs().max())
    assert watch.most == 2 and watch.moves > 0 and not watch.on
    watch = Residency()  # model offload: the whole UNet in for the run, back after
    whole = pipelines.sample_img2vid(
        bundle.model.with_options(offload=OffloadOptions(mode="model", device="cpu", storage="cpu:1", on_move=watch)),
        cond, uncond, latent, opts)
    assert float((whole - plain).abs().max()) <= 1e-4 * float(plain.abs().max())
    assert watch.moves == 2 and not watch.on


def test_the_memory_policy_reaches_the_sampler():
    from kinema.models.guidance import EpsVideoDenoiser

    seen = []
    real_init = EpsVideoDenoiser.__init__

    def spy(self, model, schedule, attn_chunk=0, batch_cond=True):
        seen.append((attn_chunk, batch_cond))
        real_init(self, model, schedule, attn_chunk, batch_cond)

    node = load_pack().nodes.memory.KinemaMemoryPolicy()
    (model,) = node.apply(motion_model("v2"), "none", 2, 256, False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EpsVideoDenoiser, "__init__", spy)
        policy = sample_small(model)
        g = torch.Generator().manual_seed(3)
        pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
        with torch.no_grad():
            pipelines.sample_video(model, pos, neg, torch.zeros(4, 4, HW, HW),
                                   pipelines.SampleOptions(seed=7, steps=2, cfg=5.0, attn_chunk=64))
    assert seen == [(256, False), (64, False)]  # the sampler's nonzero chunk wins; batching needs both
    with pytest.raises(KinemaError, match="attention_chunk must be 0"):  # an API prompt's negative chunk
        pipelines.sample_video(model, pos, neg, torch.zeros(4, 4, HW, HW),
                               pipelines.SampleOptions(seed=7, steps=2, cfg=5.0, attn_chunk=-64))
    # the same video up to fp32 rounding (another batch split and attention order, amplified over the steps)
    assert float((policy - sample_small(motion_model("v2"))).abs().max()) <= 1e-4 * float(policy.abs().max())


def test_a_move_interrupted_half_way_leaves_every_tensor_where_it_was(monkeypatch):
    """Ctrl+C (or any ``BaseException``) during a move puts back what was moved, as an out-of-memory error does,
    and is not swallowed."""
    net = torch.nn.Linear(3, 3)
    net.register_buffer("table", torch.arange(3.0))
    before = [(t.data_ptr(), t.device) for t in (*net.parameters(), *net.buffers())]
    real, calls = torch.Tensor.to, []

    def to(self, *args, **kwargs):  # a copy elsewhere; the second is interrupted
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs).clone()

    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(KeyboardInterrupt):
        offload.bring(net, torch.device("cpu", 1))
    assert len(calls) == 2 and [(t.data_ptr(), t.device) for t in (*net.parameters(), *net.buffers())] == before


def test_after_use_the_storage_copies_come_back_and_what_was_on_the_device_goes_to_storage(monkeypatch):
    """``return_to``: the tensors ``bring`` moved get their storage copies back (the same tensors, as they were:
    nothing is copied back from the device), and a tensor on the device without a storage copy is moved to
    storage. A CPU-only stand-in for a second device: "cpu:1" copies are clones, followed by their data pointers."""
    device, copies = torch.device("cpu", 1), []  # the copies on the device, kept: their addresses stay theirs

    def on_device(t):
        return any(t.data_ptr() == c.data_ptr() for c in copies)

    def to(self, where, *args, **kwargs):
        if (torch.device(where) == device) == on_device(self):
            return self  # already there
        moved = self.clone()
        if torch.device(where) == device:
            copies.append(moved)
        return moved

    net = torch.nn.Linear(3, 3)
    before = [(t.data, t.data.clone()) for t in net.parameters()]
    monkeypatch.setattr(torch.Tensor, "to", to)
    stash = offload.bring(net, device)
    assert len(stash) == 2 and all(on_device(t) for t in net.parameters())
    for t in net.parameters():
        t.data.fill_(7.0)  # what happens on the device never comes back
    net.register_buffer("table", torch.arange(3.0).to(device))  # on the device, with no storage copy
    offload.return_to(net, stash, torch.device("cpu"))
    after = list(net.parameters())
    assert all(a.data_ptr() == s.data_ptr() and torch.equal(a, v) for a, (s, v) in zip(after, before))
    assert not on_device(net.table) and torch.equal(net.table, torch.arange(3.0))


def test_a_model_computes_on_the_offload_device_when_one_is_named():
    """``compute_device``: the options' device when they name one (model and block offload, or none on a chosen
    device), else where the weights are."""
    net = torch.nn.Linear(1, 1)
    for mode in ("none", "model", "block"):
        assert offload.compute_device(net, OffloadOptions(mode=mode, device="cuda:0")) == torch.device("cuda:0")
    assert offload.compute_device(net, offload.NO_OFFLOAD) == torch.device("cpu")


def test_the_least_recently_used_block_is_evicted():
    """A block used again becomes the most recently used: with two resident, using a, b, a, then c evicts b (the
    least recently used), not a (the first brought)."""
    watch = Residency()
    streamer = BlockStreamer(cpu_block_offload(2, watch))
    a, b, c = (torch.nn.Linear(2, 2) for _ in range(3))
    for block in (a, b, a):
        streamer.use(block)
    assert streamer.on_device == [b, a] and watch.moves == 2  # the second use of a moved nothing
    streamer.use(c)
    assert streamer.on_device == [a, c] and watch.on == {id(a), id(c)}
    streamer.close()
    assert not watch.on


def test_the_time_embedding_and_the_output_layers_are_made_resident_before_they_run():
    """Besides the blocks, the UNet brings its ``time_embed`` (first) and ``out`` (last) to the compute device."""
    model = motion_model("v2").unet
    brought = []  # the modules moved to the compute device ("cpu", storage "cpu:1"), in order
    stream = BlockStreamer(OffloadOptions(mode="block", device="cpu", storage="cpu:1", resident=1,
                                          on_move=lambda m, device: device.index is None and brought.append(m)))
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            model(torch.randn(2, 4, HW, HW, generator=g), torch.tensor([500.0, 500.0]),
                  torch.randn(2, 77, 64, generator=g), stream=stream)
    finally:
        stream.close()
    assert brought[0] is model.time_embed and brought[-1] is model.out
    assert len(brought) == len(model.input_blocks) + 1 + len(model.output_blocks) + 2
