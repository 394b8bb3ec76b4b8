"""torch.compile of the video UNets (models/compiling.py, the Compile Model node): dynamo captures each UNet whole,
in one graph without breaks (under block offload: one graph per block, between the moves), reuses it over the
steps, and the video is the one the plain model makes; likewise the VAEs' decoders (Compile VAE). Backend
eager (dynamo's capture, PyTorch's kernels): inductor's code generation takes minutes on a CPU and is torch's to
test; bench_gpu.py's compiled row measures it on a GPU."""
import pytest
import torch
from conftest import load_pack
from fixtures import motion_model
from fixtures_offload import Residency, cpu_block_offload
from kinema.models import compiling, offload, pipelines
from kinema.models.compiling import CompileOptions
from kinema.models.errors import KinemaError

EAGER = CompileOptions(backend="eager")


@pytest.fixture
def dynamo():
    """Dynamo's caches and counters cleared before and after: the counts are this test's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiling._seen.clear()  # what the log said it compiles
    compiling._uncompiled.clear()
    yield counters
    torch._dynamo.reset()


def _captured_once(counters) -> None:
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the whole UNet, one graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == 1  # compiled at the first call, reused by the next ones
    assert counters["stats"]["calls_captured"] > 100


def _animatediff_with_addons(**options):
    """The demo v2 model with a ControlNet and an IP-Adapter (and ``options``), sampled 3 steps over 12 frames in
    context windows of 8: every add-on and window passes through the compiled calls."""
    from fixtures_controlnet import controlnet
    from fixtures_ip_adapter import ip_adapter
    from kinema.models import addons, demo
    from kinema.models.clip_vision import load_image_encoder
    from kinema.models.context import ContextOptions

    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    encoder = load_image_encoder(demo.clip_vision_state_dict(0, torch.float32), None, torch.float32, "clip vision")
    content = addons.image_content(ip_adapter(), encoder, torch.rand(1, 64, 64, 3, generator=g), weight=1.0)
    hint = addons.control_hint(controlnet(), torch.rand(4, 64, 64, 3, generator=g))
    opts = pipelines.SampleOptions(seed=7, steps=3, cfg=5.0, context=ContextOptions(context_length=8, overlap=4))
    latent = torch.zeros(12, 4, 8, 8)  # 64x64 pixels, the hints' size; 12 frames: windows of 8
    model = motion_model("v2").with_options(controls=(hint,), contents=(content,), **options)
    with torch.no_grad():
        return model, pipelines.sample_video(model, pos, neg, latent, opts)


def test_a_compiled_animatediff_model_makes_the_same_video_from_one_graph(dynamo):
    """With a ControlNet, an IP-Adapter and context windows, which all pass through the compiled call."""
    _, plain = _animatediff_with_addons()
    model, compiled = _animatediff_with_addons(compile=EAGER)
    assert float((compiled - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    _captured_once(dynamo)  # every window and step of the 3 reuses the graph
    assert "forward" not in vars(model.unet)  # nothing patched into the model


def test_a_compiled_animatediff_model_with_a_prompt_per_frame_is_one_graph(dynamo):
    """No two neighbouring frames share a prompt (prompt travel, one uncond video): checked before the compiled
    call too, so the UNet's own check has no data-dependent branch left to break the graph at."""
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randn(4, 77, 64, generator=g), torch.randn(4, 77, 64, generator=g)
    opts = pipelines.SampleOptions(seed=7, steps=2, cfg=5.0)
    latent = torch.zeros(4, 4, 8, 8)
    with torch.no_grad():
        plain = pipelines.sample_video(motion_model("v2"), pos, neg, latent, opts)
        dynamo.clear()
        compiled = pipelines.sample_video(motion_model("v2").with_options(compile=EAGER), pos, neg, latent, opts)
    assert float((compiled - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    _captured_once(dynamo)


@pytest.mark.parametrize("batch_cond", [True, False])
def test_a_compiled_svd_model_makes_the_same_video_from_one_graph(dynamo, tmp_path, batch_cond):
    """Also with cond and uncond one after the other: one video a call, whose 1x1 deepest level (the fixture's 64
    pixels) has size-1 dimensions whose strides dynamo guesses (``layers.flatten_hw`` reads none of them then:
    the video was 1e-2 apart when it did)."""
    from fixtures_svd_pipeline import tiny_img2vid

    bundle, cond, uncond, latent = tiny_img2vid(str(tmp_path))
    opts = pipelines.SampleOptions(seed=1, steps=3, cfg=2.5, scheduler="karras", batch_cond=batch_cond)
    with torch.no_grad():
        plain = pipelines.sample_img2vid(bundle.model, cond, uncond, latent, opts)
        dynamo.clear()
        compiled = pipelines.sample_img2vid(bundle.model.with_options(compile=EAGER), cond, uncond, latent, opts)
    assert float((compiled - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    _captured_once(dynamo)


def test_under_block_offload_each_block_is_compiled_between_the_moves(dynamo):
    """The UNet's loop runs as it is, moving the blocks (at most ``resident`` on the device), and calls each block
    through the compiled function: one graph per block (25, beyond dynamo's default limit of 8 a function), no
    breaks, reused by every window and step; with the add-ons, the video is the uncompiled block offload's."""
    _, plain = _animatediff_with_addons(offload=cpu_block_offload(2, Residency()))
    dynamo.clear()
    watch, blocks_only = Residency(), Residency()

    def moved(module, device):
        watch(module, device)
        if isinstance(module, torch.nn.ModuleList):  # a streamed unit (a UNet block and its motion modules), not
            blocks_only(module, device)               # the ControlNet or the IP-Adapter, there for the whole run

    model, compiled = _animatediff_with_addons(offload=cpu_block_offload(2, moved), compile=EAGER)
    assert float((compiled - plain).abs().max()) <= 1e-6 * float(plain.abs().max())
    assert blocks_only.most == 2 and watch.most == 2 + 2 and not watch.on
    blocks = len(model.unet.input_blocks) + 1 + len(model.unet.output_blocks)
    assert dynamo["stats"]["unique_graphs"] == blocks == 25, dict(dynamo["stats"])
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["frames"]["total"] == blocks  # compiled once each, at the first window of the first step


def test_svd_under_block_offload_is_compiled_block_by_block(dynamo, tmp_path):
    from fixtures_svd_pipeline import tiny_img2vid

    bundle, cond, uncond, latent = tiny_img2vid(str(tmp_path))
    opts = pipelines.SampleOptions(seed=1, steps=2, cfg=2.5, scheduler="karras")
    with torch.no_grad():
        plain = pipelines.sample_img2vid(bundle.model.with_options(offload=cpu_block_offload(2, Residency())), cond,
                                         uncond, latent, opts)
        dynamo.clear()
        watch = Residency()
        model = bundle.model.with_options(offload=cpu_block_offload(2, watch), compile=EAGER)
        compiled = pipelines.sample_img2vid(model, cond, uncond, latent, opts)
    # moved weights are fresh copies: the CPU kernels may round differently, and EDM sampling amplifies it (two
    # uncompiled block-offload runs differ as much, see test_offload)
    assert float((compiled - plain).abs().max()) <= 1e-4 * float(plain.abs().max())
    assert watch.most == 2 and not watch.on
    blocks = len(model.unet.input_blocks) + 1 + len(model.unet.output_blocks)
    # a graph per block at most: blocks of the same layout and sizes share one (no motion-module slot to tell them
    # apart, as AnimateDiff has)
    assert 1 < dynamo["stats"]["unique_graphs"] <= blocks, dict(dynamo["stats"])
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])


def test_the_graph_limits_are_raised_by_this_torchs_names():
    from types import SimpleNamespace

    old = SimpleNamespace(cache_size_limit=8, accumulated_cache_size_limit=256)  # torch before 2.6
    assert compiling._graph_limits(99, old) == {"cache_size_limit": 99, "accumulated_cache_size_limit": 99}
    assert set(compiling._graph_limits(99)) == {"recompile_limit", "accumulated_recompile_limit"}  # this torch


def test_compile_and_block_offload_go_together_in_either_order():
    pack = load_pack()
    (compiled,) = pack.nodes.compiling.KinemaCompileModel().apply(motion_model("v2"), "eager", "default")
    assert compiled.compile == EAGER
    (streamed,) = pack.nodes.memory.KinemaMemoryPolicy().apply(compiled, "block")  # the policy after the compile
    assert streamed.compile == EAGER and streamed.offload.mode == "block"
    (streamed,) = pack.nodes.memory.KinemaMemoryPolicy().apply(motion_model("v2"), "block")
    (compiled,) = pack.nodes.compiling.KinemaCompileModel().apply(streamed, "eager", "default")  # and before it
    assert compiled.compile == EAGER and compiled.offload.mode == "block"


@pytest.mark.parametrize("opts, match", [(CompileOptions(backend="cudagraphs"), "unknown compile backend"),
                                         (CompileOptions(mode="reduce-overhead"), "unknown compile mode")])
def test_compile_options_are_checked(opts, match):
    with pytest.raises(KinemaError, match=match):
        opts.validate()
    with pytest.raises(KinemaError, match=match):
        compiling.compiled_call.__wrapped__(opts)  # checked before torch.compile, which would take cudagraphs


def test_the_compile_node_takes_video_models_only():
    with pytest.raises(KinemaError, match="input 'model' takes a KINEMA_MODEL, got str"):
        load_pack().nodes.compiling.KinemaCompileModel().apply("not a model")


class _Blocks(torch.nn.Module):
    """A net the way the UNets take block offload: ``stream`` and ``call_block(fn, *args)``."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)

    def forward(self, x, stream=None, call_block=offload.call_directly):
        return call_block(self.second, call_block(self.first, x))


def test_torch_compile_refusing_to_run_is_a_kinema_error_naming_the_nodes(monkeypatch, dynamo):
    """torch.compile itself raising (its check of the Python version, say) before any graph: the pack's error."""
    def refuses(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.15+")

    monkeypatch.setattr(torch, "compile", refuses)
    compiling.compiled_call.cache_clear()
    compiling.compiled_decode_call.cache_clear()
    try:
        with pytest.raises(KinemaError, match=r"torch.compile cannot run here \(RuntimeError: torch.compile is not "
                                              r"supported.*remove Compile Model \(Kinema\) and Compile VAE"):
            compiling.run(_Blocks(), EAGER, torch.ones(1, 3))
    finally:
        compiling.compiled_call.cache_clear()
        compiling.compiled_decode_call.cache_clear()


@pytest.mark.parametrize("by_block", [False, True])
def test_a_backend_that_fails_is_a_kinema_error_naming_the_fix(monkeypatch, dynamo, by_block):
    def broken(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(compiling, "compiled_call", lambda opts: torch.compile(compiling._call, backend=broken))
    monkeypatch.setattr(compiling, "compiled_block_call",
                        lambda opts: torch.compile(compiling._call_block, backend=broken))
    net, stream = _Blocks(), (object() if by_block else None)  # any streamer: the blocks are called compiled
    with pytest.raises(KinemaError, match="could not compile the _Blocks: .*triton.*remove Compile Model"):
        compiling.run(net, EAGER, torch.ones(1, 3), stream=stream)


def test_without_options_the_net_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(compiling, "compiled_call", lambda opts: pytest.fail("compiled without options"))
    net = torch.nn.Linear(3, 2)
    x = torch.ones(1, 3)
    assert torch.equal(compiling.run(net, None, x), net(x))


def test_the_compile_mode_reaches_torch_compile(monkeypatch):
    """The mode goes to torch.compile with inductor (default: torch's own, no mode given); eager takes none."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.append(kwargs) or fn)
    for opts in (CompileOptions(mode="max-autotune-no-cudagraphs"), CompileOptions(),
                 CompileOptions(backend="eager", mode="max-autotune-no-cudagraphs")):
        assert compiling._compiled(compiling._call, opts, dynamic=False) is compiling._call
    assert asked == [{"backend": "inductor", "mode": "max-autotune-no-cudagraphs", "dynamic": False},
                     {"backend": "inductor", "mode": None, "dynamic": False},
                     {"backend": "eager", "mode": None, "dynamic": False}]


def test_the_log_says_a_compile_is_coming_once_per_input_size(monkeypatch, caplog):
    """The first call with new input sizes compiles (minutes): said in the log once per size (nothing compiled
    here: the compiled function stands in as the plain call)."""
    monkeypatch.setattr(compiling, "_seen", set())
    monkeypatch.setattr(compiling, "compiled_call", lambda opts: compiling._call)
    net = torch.nn.Linear(3, 2)
    with caplog.at_level("INFO", logger="kinema"):
        for rows in (1, 2, 1, 2):
            compiling.run(net, EAGER, torch.ones(rows, 3))
    said = [r.getMessage() for r in caplog.records if "torch.compile (eager) of the Linear" in r.getMessage()]
    assert len(said) == 2 and "[1, 3] float32" in said[0] and "[2, 3] float32" in said[1], said

# -- the VAE decoders (Compile VAE) -------------------------------------------------------------------------------

def _vae(kind: str):
    """(a VAE, a latent video of 5 frames, frames a decode call): the SD VAE in chunks of 2 (2, 2, 1), SVD's
    temporal decoder in videos of 3 (3, 2): a second size in both."""
    from fixtures import vae
    from fixtures_temporal_vae import temporal_vae

    model = vae() if kind == "sd" else temporal_vae()
    latent = torch.randn(5, model.cfg.z_channels, 8, 12, generator=torch.Generator().manual_seed(5))
    return model, latent, 2 if kind == "sd" else 3


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiles"])
@pytest.mark.parametrize("kind", ["sd", "svd"])
def test_a_compiled_vae_decodes_the_same_frames_without_graph_breaks(dynamo, kind, tiled):
    from kinema.models.tiling import TileOptions
    from kinema.models.vae import decode_compile, decode_frames, with_compiled_decode

    vae, latent, chunk = _vae(kind)
    tiles = TileOptions(6, 2) if tiled else TileOptions()  # tiles of 3 sizes on the 8x12 latent
    compiled = with_compiled_decode(vae, EAGER)
    frames = decode_frames(compiled, latent, chunk, tiles=tiles)
    # to rounding: on the CPU the temporal decoder's channels_last videos keep their layout by a stride that
    # layers.flatten_hw does not set while compiling (another kernel order then, 4e-6 apart)
    assert torch.allclose(frames, decode_frames(vae, latent, chunk, tiles=tiles), rtol=0, atol=2e-5)
    assert not dynamo["graph_break"], dict(dynamo["graph_break"])
    assert dynamo["stats"]["calls_captured"] > 50  # the decoder's layers, in the graph
    assert dynamo["stats"]["unique_graphs"] == 2, dict(dynamo["stats"])  # a graph per size: the two chunks'
    assert torch.equal(decode_frames(compiled, latent, chunk, tiles=tiles), frames)  # again: the same graphs
    assert dynamo["stats"]["unique_graphs"] == 2, dict(dynamo["stats"])
    assert decode_compile(compiled) == EAGER and decode_compile(vae) is None  # the input VAE unchanged
    assert all(a is b for a, b in zip(vae.parameters(), compiled.parameters()))  # the same weights


def test_a_compiled_fp16_decode_that_overflows_runs_again_in_fp32_compiled(dynamo, caplog):
    from fixtures import vae
    from kinema.models.patching import replace_parameters
    from kinema.models.memory import cast_weights
    from kinema.models.vae import decode_frames, with_compiled_decode

    vae16 = cast_weights(vae(), torch.float16)
    weight = vae16.post_quant_conv.weight
    vae16 = replace_parameters(vae16, {"post_quant_conv.weight": weight.detach() * 1e3})  # 1e5 activations: inf
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 100
    with caplog.at_level("INFO", logger="kinema"):
        frames = decode_frames(with_compiled_decode(vae16, EAGER), latent, chunk=1)
    assert "VAE decoding overflowed in fp16" in caplog.text and torch.isfinite(frames).all()
    assert torch.equal(frames, decode_frames(cast_weights(vae16, torch.float32), latent, chunk=1))
    said = [r.getMessage() for r in caplog.records if "torch.compile (eager) of the AutoencoderKL decoder"
            in r.getMessage()]
    assert len(said) == 2  # in fp16, then the fp32 copy (said once each)


def test_the_compile_vae_node_takes_vaes_with_a_decoder():
    from fixtures import vae
    from fixtures_temporal_vae import cond_encoder, temporal_vae
    from kinema.models.vae import decode_compile

    node = load_pack().nodes.compiling.KinemaCompileVAE()
    for model in (vae(), temporal_vae()):
        (compiled,) = node.apply(model, "eager", "default")
        assert decode_compile(compiled) == EAGER and compiled is not model
    with pytest.raises(KinemaError, match="takes a VAE with a decoder"):  # SVD's encoder-only VAE: a KINEMA_VAE
        node.apply(cond_encoder())
    for wrong, got in ((motion_model("v2"), "MotionModel"), ("not a vae", "str")):
        with pytest.raises(KinemaError, match=f"input 'vae' takes a KINEMA_VAE, got {got}"):
            node.apply(wrong)
    with pytest.raises(KinemaError, match="unknown compile backend"):
        decode_compile(node.apply(vae(), "eager")[0]).__class__(backend="cudagraphs").validate()
    with pytest.raises(KinemaError, match="Compile VAE \\(Kinema\\): input 'backend': 'cudagraphs' is not one of"):
        node.apply(vae(), "cudagraphs")


def test_a_decode_backend_that_fails_is_a_kinema_error_naming_the_node(monkeypatch, dynamo):
    from fixtures import vae
    from kinema.models.vae import decode_frames, with_compiled_decode

    def broken(gm, example_inputs):
        raise RuntimeError("Cannot find a working triton installation")

    monkeypatch.setattr(compiling, "compiled_decode_call",
                        lambda opts: torch.compile(compiling._call_decode, backend=broken))
    with pytest.raises(KinemaError, match="could not compile the AutoencoderKL decoder: .*remove Compile VAE"):
        decode_frames(with_compiled_decode(vae(), EAGER), torch.zeros(1, 4, 8, 8))


def test_past_the_graph_limit_calls_run_uncompiled_and_the_log_says_so(dynamo, monkeypatch, caplog):
    """dynamo keeps a limited number of graphs per function (8 by default, which one session's sizes and
    settings reach): Kinema raises it, and a call past it runs uncompiled, said once in the log, not silently."""
    monkeypatch.setattr(compiling, "UNET_GRAPHS", 2)
    net = torch.nn.Linear(3, 3)
    with caplog.at_level("WARNING", logger="kinema"):
        for rank in range(2, 6):  # a new input rank: a new graph each
            x = torch.randn((2,) * (rank - 1) + (3,))
            torch.testing.assert_close(compiling.run(net, EAGER, x), net(x))
    assert dynamo["stats"]["unique_graphs"] == 2
    said = [r.getMessage() for r in caplog.records if "calls that need another run uncompiled" in r.getMessage()]
    assert len(said) == 1 and "holds 2 graphs of the Linear" in said[0]


def test_a_decode_past_the_graph_limit_runs_uncompiled(dynamo, monkeypatch):
    monkeypatch.setattr(compiling, "DECODE_GRAPHS", 2)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def decode(self, x):
            return self.lin(x)

    vae = Decoder()
    for rank in range(2, 6):
        x = torch.randn((2,) * (rank - 1) + (3,))
        torch.testing.assert_close(compiling.run_decode(vae, EAGER, x), vae.decode(x))
    assert dynamo["stats"]["unique_graphs"] == 2


def test_more_sizes_than_dynamos_default_stay_compiled(dynamo, caplog):
    """dynamo keeps 8 graphs a function by default; a session's sizes and settings reach that: the UNet keeps
    UNET_GRAPHS (64)."""
    net = torch.nn.Linear(3, 3)
    with caplog.at_level("WARNING", logger="kinema"):
        for rank in range(2, 12):  # 10 input ranks: 10 graphs
            compiling.run(net, EAGER, torch.randn((1,) * (rank - 1) + (3,)))
    assert dynamo["stats"]["unique_graphs"] == 10
    assert not [r for r in caplog.records if "uncompiled" in r.getMessage()]


def test_the_log_names_what_compiles_the_unet_whole_block_by_block_or_a_decoder(monkeypatch, caplog):
    """The same input sizes to the whole net, to it block by block and to a decoder: three compiles, each said."""
    monkeypatch.setattr(compiling, "_seen", set())
    monkeypatch.setattr(compiling, "compiled_call", lambda opts: compiling._call)
    monkeypatch.setattr(compiling, "compiled_block_call", lambda opts: compiling._call_block)
    monkeypatch.setattr(compiling, "compiled_decode_call", lambda opts: compiling._call_decode)
    net, x = _Blocks(), torch.ones(1, 3)
    net.decode = net.forward
    with caplog.at_level("INFO", logger="kinema"):
        compiling.run(net, EAGER, x)
        compiling.run(net, EAGER, x, stream=object())
        compiling.run_decode(net, EAGER, x)
    said = [r.getMessage() for r in caplog.records if "torch.compile (eager) of the" in r.getMessage()]
    assert [s.split(" for inputs")[0].removeprefix("Kinema: torch.compile (eager) of the ") for s in said] == [
        "_Blocks", "_Blocks block by block (block offload)", "_Blocks decoder"], said


def test_under_block_offload_the_blocks_keep_more_graphs_than_the_whole_unet(dynamo, monkeypatch):
    """Block by block, the limit is BLOCK_GRAPHS, not UNET_GRAPHS: here 2 blocks, 2 graphs past a whole-UNet limit
    of 1."""
    monkeypatch.setattr(compiling, "UNET_GRAPHS", 1)
    net, x = _Blocks(), torch.ones(1, 3)
    torch.testing.assert_close(compiling.run(net, EAGER, x, stream=object()), net(x))
    assert dynamo["stats"]["unique_graphs"] == 2, dict(dynamo["stats"])


def test_the_unet_and_a_decoder_past_their_limits_are_each_said_in_the_log(dynamo, monkeypatch, caplog):
    monkeypatch.setattr(compiling, "UNET_GRAPHS", 1)
    monkeypatch.setattr(compiling, "DECODE_GRAPHS", 1)
    net = torch.nn.Linear(3, 3)
    net.decode = net.forward
    with caplog.at_level("WARNING", logger="kinema"):
        for rank in (2, 3):
            compiling.run(net, EAGER, torch.randn((2,) * (rank - 1) + (3,)))
        for rank in (2, 3):
            compiling.run_decode(net, EAGER, torch.randn((2,) * (rank - 1) + (3,)))
    said = [r.getMessage() for r in caplog.records if "calls that need another run uncompiled" in r.getMessage()]
    assert len(said) == 2 and "of the Linear (" in said[0] and "of the Linear decoder (" in said[1], said


def test_a_decode_that_fails_is_not_run_again_uncompiled(dynamo, caplog):
    """An error of the decoder itself (not dynamo's limit) passes unchanged, after one call."""
    calls = []

    class Failing(torch.nn.Module):
        def decode(self, x):
            calls.append(x.shape)
            raise ValueError("out of range")

    with caplog.at_level("WARNING", logger="kinema"), pytest.raises(ValueError, match="out of range"):
        compiling.run_decode(Failing(), EAGER, torch.ones(1, 3))
    assert len(calls) == 1 and "uncompiled" not in caplog.text


def test_the_blocks_and_the_decoders_compile_static_sizes(monkeypatch):
    """A graph per block and per chunk or tile size (``dynamic=False``); the whole UNet's, dynamo's automatic ones."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: asked.append((fn, kwargs.get("dynamic", "auto"))) or fn)
    for compiled in (compiling.compiled_call, compiling.compiled_block_call, compiling.compiled_decode_call):
        compiled.__wrapped__(EAGER)  # past functools.cache: a fresh torch.compile
    assert asked == [(compiling._call, "auto"), (compiling._call_block, False), (compiling._call_decode, False)]
