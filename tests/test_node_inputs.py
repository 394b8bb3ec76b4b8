"""The small checks in front of the nodes: ``finite_number``, the LATENT check, Empty Video Latent's sizes and its
``size_of`` input, the widget wrapper of nodes/inputs.py, and the ranges the nodes declare to ComfyUI's widgets."""
import pytest
import torch
from kinema.models import pipelines
from kinema.models.errors import KinemaError, finite_number
from kinema.nodes import checks, latent, video_output

EMPTY = latent.KinemaEmptyVideoLatent


# -- finite_number -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, False, float("inf"), float("-inf"), float("nan"), "1.0", None])
def test_finite_number_refuses_booleans_non_finite_values_and_non_numbers(value):
    """A bool is an ``int`` to Python, but a JSON ``true`` sent for a strength is a mistake, not 1.0; infinity
    passes ComfyUI's min/max checks. Both are refused, naming the input."""
    with pytest.raises(KinemaError, match=r"strength must be a finite number, got "):
        finite_number(value, "strength")


def test_finite_number_gives_floats_for_real_numbers():
    assert finite_number(3, "x") == 3.0 and isinstance(finite_number(3, "x"), float)
    assert finite_number(-0.25, "x") == -0.25


# -- the LATENT check ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples, match", [
    (torch.zeros(1, 4, 8, 8, dtype=torch.int64), (r"N: expected a video latent \[frames, channels, height, width\] "
                                                  r"of floats, got shape \[1, 4, 8, 8\] \(torch.int64\)")),
    (torch.zeros(1, 4, 2, 8, 8), r"N: expected a video latent .* got shape \[1, 4, 2, 8, 8\] \(torch.float32\)"),
    (torch.zeros(4, 8, 8), r"N: expected a video latent .* got shape \[4, 8, 8\]"),
    (torch.zeros(2, 4, 8, 0), r"N: the latent is 0x8 latent pixels, an empty frame"),
])
def test_the_latent_check_refuses_integer_5d_and_zero_width_latents(samples, match):
    """Only a float [frames, channels, height, width] latent with pixels passes: an integer latent would be
    sampled in integer arithmetic, a 5-D one (a batch of videos) would be taken apart along the wrong axis, and a
    zero-width one gives an empty video nodes later."""
    with pytest.raises(KinemaError, match=match):
        checks.latent_samples({"samples": samples}, "N")


def test_the_latent_check_returns_the_samples_of_a_good_latent():
    samples = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    assert checks.latent_samples({"samples": samples, "batch_index": [0, 1]}, "N") is samples


# -- Empty Video Latent --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, name", [(0, 64, "width"), (64, 0, "height"), (-8, 64, "width")])
def test_an_empty_video_latent_needs_at_least_8_pixels_a_side(width, height, name):
    """0 and -8 are multiples of 8, but no latent size: refused rather than a latent without pixels."""
    with pytest.raises(KinemaError, match=f"{name} must be a positive multiple of 8, got {min(width, height)} "
                                          r"\(try 8\)"):
        pipelines.empty_video_latent(1, width, height)


@pytest.mark.parametrize("size_of", [torch.rand(24, 40, 3), torch.rand(2, 24, 40, 2), torch.rand(24, 40)])
def test_size_of_must_be_image_frames(size_of):
    """A single image [h, w, c] (or a mask, or 2 channels) is not taken apart as if it were frames: a [24, 40, 3]
    tensor would read as 24 frames of 40x3 pixels."""
    with pytest.raises(KinemaError, match=r"Empty Video Latent \(Kinema\): size_of takes IMAGE frames \[frames, "
                                          r"height, width, 1 or 3 or 4\], got shape"):
        EMPTY().make(1, 8, 8, size_of=size_of)


@pytest.mark.parametrize("channels", [1, 4])
def test_size_of_takes_gray_and_rgba_frames(channels):
    (out,) = EMPTY().make(1, 8, 8, size_of=torch.rand(2, 16, 40, channels))
    assert out["samples"].shape == (2, 4, 2, 5)


def test_size_of_frames_of_a_height_not_a_multiple_of_8_are_named_width_by_height():
    """The message names the frames' size (width x height, 40x20) and the fix, not a bare 'height must be a
    multiple of 8' about a widget the user did not set."""
    with pytest.raises(KinemaError, match=r"Empty Video Latent \(Kinema\): the size_of frames are 40x20, and a latent "
                                          r"needs multiples of 8: resize or crop the frames"):
        EMPTY().make(1, 8, 8, size_of=torch.rand(2, 20, 40, 3))


def test_empty_video_latent_declares_comfyuis_size_widgets():
    """ComfyUI's own EmptyLatentImage steps width and height by 8 from a 512 default: a widget stepping by 1 offers
    sizes the latent refuses; the ranges are the node's documented ones."""
    required = EMPTY.INPUT_TYPES()["required"]
    for name in ("width", "height"):
        opts = required[name][1]
        assert (opts["default"], opts["min"], opts["max"], opts["step"]) == (512, 8, 8192, 8), name
    assert (required["frames"][1]["default"], required["frames"][1]["min"]) == (16, 1)


# -- the widget wrapper (nodes/inputs.py) --------------------------------------------------------------------------

def test_the_wrapper_hands_the_node_the_converted_values():
    """An INT widget given a whole float (a JSON 4.0) reaches the node as the int 4: the latent's shape is ints."""
    (out,) = EMPTY().make(4.0, 64, 64.0)
    samples = out["samples"]
    assert samples.shape == (4, 4, 8, 8) and all(type(n) is int for n in samples.shape)


def test_the_wrapper_reports_a_missing_argument_as_a_kinema_error():
    """A call with too few values (an API prompt missing an input) names the node and the argument, as a
    KinemaError ComfyUI shows, not a TypeError about ``make()``."""
    with pytest.raises(KinemaError, match=r"^Empty Video Latent \(Kinema\): missing a required argument: 'width'$"):
        EMPTY().make(1)
    with pytest.raises(KinemaError, match=r"^Empty Video Latent \(Kinema\): .*unexpected keyword argument 'depth'"):
        EMPTY().make(1, 64, 64, depth=3)


# -- Save Video's declared ranges ----------------------------------------------------------------------------------

def test_save_video_declares_its_fps_and_loop_count_ranges():
    """fps 0.01 to 240 (a frame per 100 s up to high-rate video), loop_count 0 (forever) up to 1000 plays."""
    required = video_output.KinemaSaveVideo.INPUT_TYPES()["required"]
    fps, loop = required["fps"][1], required["loop_count"][1]
    assert (fps["min"], fps["max"], fps["step"]) == (0.01, 240.0, 0.01)
    assert (loop["default"], loop["min"], loop["max"]) == (0, 0, 1000)


@pytest.mark.parametrize("fps, loop_count, match", [
    (0.005, 0, r"input 'fps': 0.005 is smaller than the minimum 0.01"),
    (0.0, 0, r"input 'fps': 0.0 is smaller than the minimum 0.01"),
    (241.0, 0, r"input 'fps': 241.0 is bigger than the maximum 240.0"),
    (8.0, -1, r"input 'loop_count': -1 is smaller than the minimum 0"),
])
def test_save_video_refuses_values_outside_its_ranges_before_saving(fps, loop_count, match, tmp_path):
    from kinema.nodes import host

    host.set_output_dir(str(tmp_path / "output"))
    try:
        with pytest.raises(KinemaError, match=r"^Save Video \(Kinema\): " + match):
            video_output.KinemaSaveVideo().save(torch.rand(2, 8, 8, 3), fps, "webp", loop_count, "v")
    finally:
        host.set_output_dir(None)
    assert not (tmp_path / "output").exists()


# -- the pack's sockets ------------------------------------------------------------------------------------------

def test_every_socket_of_the_pack_is_checked():
    """Each KINEMA_* type a node takes has the classes it carries (a new socket type without them would pass any
    value on to the node unchecked)."""
    from conftest import load_pack
    from kinema.nodes import inputs
    from kinema.nodes import workflow_format as wf

    taken = {s.type for cls in load_pack().NODE_CLASS_MAPPINGS.values() for s in wf.input_specs(cls)
             if isinstance(s.type, str) and s.type.startswith("KINEMA_")}
    assert taken and taken <= set(inputs._socket_kinds())


def test_a_wrong_object_in_a_socket_is_named_before_the_node_runs(host_dirs):
    """What an any-type node of another pack (or a call from Python) hands a Kinema socket is checked: the node
    names the input, what it got and what to connect, instead of failing inside with an AttributeError."""
    from conftest import load_pack
    from kinema.models import demo

    nodes = load_pack().NODE_CLASS_MAPPINGS
    model, clip, vae = nodes["KinemaCheckpointLoader"]().load(demo.DEMO_CHECKPOINT, "fp32")
    (mm,) = nodes["KinemaMotionModuleLoader"]().load(demo.DEMO_MOTION["v2"], "fp32")
    with pytest.raises(KinemaError, match=r"Apply Motion Module \(Kinema\): input 'motion_module' takes a "
                                          r"KINEMA_MOTION_MODULE, got AutoencoderKL: connect Load Motion Module"):
        nodes["KinemaApplyMotionModule"]().apply(model, vae, 1.0, "linear")
    with pytest.raises(KinemaError, match=r"input 'clip' takes a KINEMA_CLIP, got nothing: connect the clip output"):
        nodes["KinemaTextEncode"]().encode(None, "a cat")
    with pytest.raises(KinemaError, match=r"input 'model' takes a KINEMA_MODEL, got TextEncoder"):
        nodes["KinemaApplyMotionModule"]().apply(clip, mm, 1.0, "linear")
    with pytest.raises(KinemaError, match=r"Text Encode \(Kinema\): 'text' must be text, got int"):
        nodes["KinemaTextEncode"]().encode(clip, 5)
    (video,) = nodes["KinemaApplyMotionModule"]().apply(model, mm, 1.0, "linear")  # the right objects pass
    assert video.motion is mm
    # what a switch of another pack passes on from core nodes: an IMAGE tensor, a core LATENT dict
    with pytest.raises(KinemaError, match=r"VAE Decode Frames \(Kinema\): input 'vae' takes a KINEMA_VAE, got Tensor"):
        nodes["KinemaVAEDecodeFrames"]().decode(torch.zeros(1, 8, 8, 3), {"samples": torch.zeros(1, 4, 8, 8)}, 0)
    (latent,) = nodes["KinemaEmptyVideoLatent"]().make(2, 64, 64)
    (pos,) = nodes["KinemaTextEncode"]().encode(clip, "a cat")
    with pytest.raises(KinemaError, match=r"input 'context_options' takes a KINEMA_CONTEXT_OPTIONS, got dict: "
                                          r"connect Context Options \(Kinema\)"):
        nodes["KinemaVideoSampler"]().sample(video, pos, pos, latent, 0, 1, 1.0, "euler", "normal", 1.0,
                                             context_options={"context_length": 16})
    # CONDITIONING is a core type: the node checks it itself
    with pytest.raises(KinemaError, match=r"the positive conditioning is empty or not a CONDITIONING"):
        nodes["KinemaVideoSampler"]().sample(video, None, pos, latent, 0, 1, 1.0, "euler", "normal", 1.0)
    (out,) = nodes["KinemaVideoSampler"]().sample(video, pos, pos, latent, 0, 1, 1.0, "euler", "normal", 1.0,
                                                  context_options=None)  # an optional socket left empty
    assert out["samples"].shape == latent["samples"].shape


def test_the_latent_batch_index_is_checked_and_given_as_ints():
    """Latent From Batch's ``batch_index``: one whole number a frame, handed on as ints (a JSON 1.0 as 1)."""
    samples = torch.zeros(2, 4, 8, 8)
    index = checks.latent_batch_index({"samples": samples, "batch_index": [1.0, 0]}, samples)
    assert index == (1, 0) and all(type(i) is int for i in index)
    assert checks.latent_batch_index({"samples": samples}, samples) is None
    with pytest.raises(KinemaError, match="batch_index must list 2 whole numbers"):
        checks.latent_batch_index({"samples": samples, "batch_index": [0]}, samples)


def test_a_model_name_outside_the_list_gets_the_loaders_own_error(host_dirs):
    """A loader's file list is not checked as a choice (the list is the one of when ComfyUI started): a missing
    file's error says where it was looked for and how to add a folder."""
    from conftest import load_pack

    nodes = load_pack().NODE_CLASS_MAPPINGS
    with pytest.raises(KinemaError, match=r"checkpoints model 'missing.safetensors' not found. Searched: "):
        nodes["KinemaCheckpointLoader"]().load("missing.safetensors", "fp32")
    with pytest.raises(KinemaError, match=r"clip_vision model 'gone.safetensors' not found. Searched: "):
        nodes["KinemaCLIPVisionLoader"]().load("gone.safetensors")


def test_svds_conditioning_frame_encoder_is_a_vae_to_encode_with():
    """SVD's conditioning-frame encoder (``ImageEncoderKL``, no decoder) passes the KINEMA_VAE socket of VAE Encode
    Frames (Kinema) for a Python caller that built it."""
    from conftest import load_pack
    from fixtures_temporal_vae import cond_encoder

    nodes = load_pack().NODE_CLASS_MAPPINGS
    (latent,) = nodes["KinemaVAEEncodeFrames"]().encode(cond_encoder(), torch.rand(2, 16, 16, 3))
    assert latent["samples"].shape[:2] == (2, 4)
