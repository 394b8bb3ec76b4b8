"""Image-to-video sampling pieces that need no model: per-frame guidance, the EDM schedule and
preconditioning, memory checks, init-image fitting, the Load Image node."""
import math

import pytest
import torch

from kinema.models import memory, pipelines, sampling
from kinema.models.errors import KinemaError
from kinema.models.guidance import CFGDenoiser, VEDMVideoDenoiser, per_frame_cfg
from kinema.models.svd_model import fit_image, variant_of


# -- per-frame guidance --------------------------------------------------------------------------------------------

def test_linear_guidance_runs_from_min_to_max():
    assert torch.allclose(per_frame_cfg("linear", 1.0, 2.5, 14), torch.linspace(1.0, 2.5, 14))
    assert per_frame_cfg("linear", 1.5, 3.0, 1).tolist() == [1.5]


def test_constant_guidance_is_the_max_everywhere():
    assert per_frame_cfg("constant", 1.0, 3.0, 5).tolist() == [3.0] * 5


@pytest.mark.parametrize("frames", [1, 2, 5, 14, 25])
def test_triangle_guidance_peaks_in_the_middle(frames):
    scale = per_frame_cfg("triangle", 1.0, 3.0, frames)
    # the original's triangle wave: 2 |t/p - floor(t/p + 1/2)| over t in linspace(0, 1)
    t = torch.linspace(0, 1, frames)
    expected = 2 * (t - torch.floor(t + 0.5)).abs() * 2.0 + 1.0
    assert torch.allclose(scale, expected, atol=1e-6)
    assert scale[0] == pytest.approx(1.0)
    if frames > 2:
        assert scale[-1] == pytest.approx(1.0) and float(scale.max()) <= 3.0 + 1e-6
    if frames % 2 and frames > 1:
        assert scale[frames // 2] == pytest.approx(3.0)


def test_triangle_period_half_gives_two_peaks():
    scale = per_frame_cfg("triangle", 0.0, 1.0, 9, period=0.5)
    assert scale.tolist() == pytest.approx([0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5, 0])


def test_bad_guidance_modes_are_refused():
    with pytest.raises(KinemaError, match="per-frame guidance"):
        per_frame_cfg("cosine", 1, 2, 4)
    with pytest.raises(KinemaError, match="period"):
        per_frame_cfg("triangle", 1, 2, 4, period=0)
    with pytest.raises(KinemaError, match="at least 1 frame"):
        per_frame_cfg("constant", 1, 2, 0)


class _Fixed:
    """A denoiser returning fixed uncond/cond predictions, recording the conditionings it is given."""

    def __init__(self, x0_u, x0_c):
        self.x0_u, self.x0_c, self.seen = x0_u, x0_c, []

    def __call__(self, x, sigma, conds, window=None, **kw):
        self.seen.append(conds)
        if len(conds) == 1:
            return [self.x0_c]
        return [self.x0_u, self.x0_c]


def test_cfg_with_one_scale_per_frame():
    x0_u, x0_c = torch.zeros(4, 2, 3, 3), torch.ones(4, 2, 3, 3)
    cfg = torch.tensor([1.0, 2.0, 3.0, 4.0])
    den = CFGDenoiser(_Fixed(x0_u, x0_c), {"y": torch.zeros(4, 1)}, {"y": torch.ones(4, 1)}, cfg)
    out = den(torch.zeros(4, 2, 3, 3), torch.tensor(1.0))
    assert torch.equal(out[:, 0, 0, 0], cfg)


def test_cfg_all_ones_skips_the_uncond_pass():
    fixed = _Fixed(None, torch.ones(3, 1, 2, 2))
    den = CFGDenoiser(fixed, torch.zeros(3, 1, 4), torch.zeros(3, 1, 4), torch.ones(3))
    den(torch.zeros(3, 1, 2, 2), torch.tensor(1.0))
    assert len(fixed.seen[0]) == 1


def test_per_frame_scale_and_dict_conditioning_are_sliced_per_window():
    from kinema.models.context import ContextWindow

    x0_u, x0_c = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    fixed = _Fixed(x0_u, x0_c)
    cond = {"y": torch.arange(6.0)[:, None], "concat": torch.arange(6.0)[:, None, None, None]}
    den = CFGDenoiser(fixed, cond, cond, torch.arange(6.0) + 1)
    window = ContextWindow(full_length=6, context_length=2, sub_idxs=(2, 5))
    out = den(torch.zeros(2, 1, 1, 1), torch.tensor(1.0), window=window)
    assert out.flatten().tolist() == [3.0, 6.0]
    assert fixed.seen[0][1]["y"].flatten().tolist() == [2.0, 5.0]


# -- EDM ----------------------------------------------------------------------------------------------------------

def test_edm_schedule_karras_runs_from_700_to_0002():
    s = sampling.ContinuousEDMSchedule(0.002, 700.0)
    sig = sampling.calculate_sigmas(s, "karras", 25)
    assert sig[0] == pytest.approx(700.0, rel=1e-5) and sig[-2] == pytest.approx(0.002, rel=1e-4) and sig[-1] == 0
    rho = 7.0
    ramp = torch.linspace(0, 1, 25, dtype=torch.float64)
    expected = (700 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 700 ** (1 / rho))) ** rho
    assert torch.allclose(sig[:-1].double(), expected, rtol=1e-5)
    assert float(s.timestep(torch.tensor(math.e ** 4))) == pytest.approx(1.0)
    assert float(s.sigma(torch.tensor(1.0))) == pytest.approx(math.e ** 4, rel=1e-6)


@pytest.mark.parametrize("scheduler", list(sampling.SCHEDULERS))
def test_every_scheduler_works_on_the_edm_schedule(scheduler):
    sig = sampling.calculate_sigmas(sampling.ContinuousEDMSchedule(0.002, 700.0), scheduler, 10)
    assert len(sig) == 11 and sig[-1] == 0
    assert bool((sig[:-1] > 0).all()) and bool((sig[:-2] >= sig[1:-1]).all())
    assert float(sig[0]) <= 700.0 * (1 + 1e-5)


class _ConstantV:
    """An SVDModel stand-in whose network returns a fixed v and records its inputs."""

    def __init__(self, v):
        self.v, self.calls = v, []
        self.unet = torch.nn.Linear(1, 1)
        self.unet.dtype = torch.float32

    def __call__(self, x, timesteps, context, y, num_frames, attn_chunk=0, window=None, temporal=True):
        self.calls.append((x, timesteps, context, y, num_frames))
        return self.v.repeat(x.shape[0] // self.v.shape[0], 1, 1, 1)


def test_v_edm_preconditioning():
    frames, sigma = 3, 2.5
    x = torch.randn(frames, 4, 2, 2)
    v = torch.randn(frames, 4, 2, 2)
    concat = torch.randn(frames, 4, 2, 2)
    cond = {"context": torch.randn(frames, 1, 8), "concat": concat, "y": torch.randn(frames, 6)}
    model = _ConstantV(v)
    (x0,) = VEDMVideoDenoiser(model)(x, torch.tensor(sigma), [cond])
    c_skip, c_out, c_in = 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1), 1 / math.sqrt(sigma**2 + 1)
    assert torch.allclose(x0, c_skip * x + c_out * v, atol=1e-6)
    xin, t, _, _, nf = model.calls[0]
    assert nf == frames and xin.shape[1] == 8
    assert torch.allclose(xin[:, :4], x * c_in, atol=1e-6)
    assert torch.equal(xin[:, 4:], concat)  # the concat latents are not scaled by c_in
    assert torch.allclose(t, torch.full((frames,), 0.25 * math.log(sigma)))


def test_v_edm_batches_cond_and_uncond():
    frames = 2
    model = _ConstantV(torch.zeros(frames, 4, 2, 2))
    c = {"context": torch.ones(frames, 1, 8), "concat": torch.ones(frames, 4, 2, 2), "y": torch.ones(frames, 6)}
    u = {k: torch.zeros_like(t) for k, t in c.items()}
    outs = VEDMVideoDenoiser(model, batch_cond=True)(torch.zeros(frames, 4, 2, 2), torch.tensor(1.0), [u, c])
    assert len(outs) == 2 and len(model.calls) == 1 and model.calls[0][0].shape[0] == 2 * frames
    assert torch.equal(model.calls[0][2][:frames], u["context"]) and torch.equal(model.calls[0][2][frames:],
                                                                                   c["context"])


class _VFromConditioning(_ConstantV):
    """A network whose v depends on each video's conditioning: context + concat + y, per batch entry."""

    def __call__(self, x, timesteps, context, y, num_frames, attn_chunk=0, window=None, temporal=True):
        self.calls.append((x, timesteps, context, y, num_frames))
        return x[:, 4:] + context.mean(dim=(1, 2))[:, None, None, None] + y.mean(dim=1)[:, None, None, None]


def test_v_edm_batched_predictions_come_back_in_the_order_of_the_conditionings():
    """Batched, each conditioning gets the x0 it gets when run alone (uncond first, cond second)."""
    frames, sigma = 2, 1.7
    g = torch.Generator().manual_seed(4)
    x = torch.randn(frames, 4, 2, 2, generator=g)
    c = {"context": torch.randn(frames, 1, 8, generator=g), "concat": torch.randn(frames, 4, 2, 2, generator=g),
         "y": torch.randn(frames, 6, generator=g)}
    u = {k: torch.zeros_like(t) for k, t in c.items()}
    model = _VFromConditioning(torch.zeros(1))
    x0_u, x0_c = VEDMVideoDenoiser(model, batch_cond=True)(x, torch.tensor(sigma), [u, c])
    assert len(model.calls) == 1
    c_skip, c_out = 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    for got, cond in ((x0_u, u), (x0_c, c)):  # v by hand from the stand-in's rule
        v = cond["concat"] + cond["context"].mean(dim=(1, 2))[:, None, None, None] + cond["y"].mean(dim=1)[
            :, None, None, None]
        torch.testing.assert_close(got, c_skip * x + c_out * v)


# -- memory, inputs -----------------------------------------------------------------------------------------------

def test_a_latent_that_cannot_fit_is_refused_before_allocation():
    with pytest.raises(KinemaError, match="lower the frame count"):
        pipelines.empty_video_latent(10**9, 1024, 1024)


def test_sampling_too_many_frames_at_once_is_refused(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    with pytest.raises(KinemaError, match="Context Options"):
        memory.check_fits(memory.video_activation_bytes(25, 2, 72, 128, 320, torch.float16), "cpu",
                          "sampling 25 frames", "connect Context Options (Kinema)")


def test_the_fit_estimate_and_the_depth_batch_retry():
    """The pre-sampling estimate is 8 first-level feature maps per frame of the batch (a lower bound: a quarter of
    it would let through requests that then fail in the middle of sampling); an out-of-memory retry halves what
    was running, the last short batch included."""
    assert memory.video_activation_bytes(16, 2, 64, 64, 320, torch.float16) == 8 * 16 * 2 * 320 * 64 * 64 * 2
    assert memory.video_activation_bytes(16, 2, 64, 64, 320, torch.float32) == 8 * 16 * 2 * 320 * 64 * 64 * 4
    assert memory.FrameBatch(8).smaller(8) == memory.FrameBatch(4)
    assert memory.FrameBatch(8).smaller(2) == memory.FrameBatch(1)  # the 2 frames left ran out: 1 at a time
    assert memory.FrameBatch(8).smaller(1) is None and memory.FrameBatch(1).smaller(5) is None


def test_the_host_is_asked_for_room_before_the_fit_is_refused(monkeypatch):
    """A device short of memory: the host (ComfyUI) is asked to free what is needed, and only what is still
    missing after that refuses the run."""
    from kinema.models import placement

    free = {"bytes": 1024}
    asked = []

    def make_room(nbytes, device):
        asked.append((nbytes, device.type))
        free["bytes"] = 1 << 40

    monkeypatch.setattr(memory, "available_bytes", lambda device: free["bytes"])
    monkeypatch.setattr(placement, "_make_room", make_room)
    memory.check_fits(1 << 30, "cuda", "sampling", "lower it")
    assert asked == [(1 << 30, "cuda")]
    monkeypatch.setattr(placement, "_make_room", lambda nbytes, device: asked.append(nbytes))
    free["bytes"] = 1024
    with pytest.raises(KinemaError, match="sampling needs about 1.00 GiB but cuda has 0.00 GiB free: lower it"):
        memory.check_fits(1 << 30, "cuda", "sampling", "lower it")
    assert len(asked) == 2


def test_the_cpu_allocators_error_is_out_of_memory():
    from kinema.models.checkpoint import damaged_file

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    assert memory.is_out_of_memory(cpu) and not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))  # an allocator raises a RuntimeError
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"), damaged_file("sd15.safetensors", "a model"):
        raise cpu  # not "damaged: download it again"
    with pytest.raises(KinemaError, match="is damaged"), damaged_file("sd15.safetensors", "a model"):
        raise RuntimeError("shape mismatch")


def test_available_bytes_on_cpu_is_known_on_linux():
    free = memory.available_bytes("cpu")
    assert free is None or free > 0


def test_fit_image_covers_and_centre_crops():
    img = torch.zeros(1, 40, 100, 3)
    img[:, :, 40:60] = 1.0  # a white band in the middle
    out = fit_image(img, 64, 64)
    assert out.shape == (1, 64, 64, 3)
    assert float(out[0, 32, 32, 0]) > 0.9 and float(out[0, 32, 0, 0]) < 0.1
    # scaled to cover (aspect kept: 64 x 160, columns 48..112 kept), not squeezed: the band spans columns 16..48
    assert float(out[0, 32, 20, 0]) > 0.9 and float(out[0, 32, 44, 0]) > 0.9
    # a tall image: scaled to cover, the middle rows kept (a horizontal band in the middle stays in the middle)
    tall = torch.zeros(1, 100, 40, 3)
    tall[:, 40:60] = 1.0  # scaled to 160 x 64, rows 48..112 kept: the band at 64..96 is the crop's 16..48
    out = fit_image(tall, 64, 64)
    assert float(out[0, 32, 32, 0]) > 0.9 and float(out[0, 2, 32, 0]) < 0.1 and float(out[0, 61, 32, 0]) < 0.1
    assert float(out[0, 20, 32, 0]) > 0.9 and float(out[0, 44, 32, 0]) > 0.9
    assert fit_image(torch.rand(2, 64, 64, 4), 64, 64).shape == (1, 64, 64, 3)
    batch = torch.stack([torch.zeros(64, 64, 3), torch.ones(64, 64, 3)])  # only the first image of a batch is used
    assert torch.equal(fit_image(batch, 64, 64), torch.zeros(1, 64, 64, 3))
    with pytest.raises(KinemaError, match="IMAGE"):
        fit_image(torch.zeros(64, 64, 3), 64, 64)
    # clamped to [0, 1] at its own size too (as when scaled); 8-bit and non-finite images refused
    assert float(fit_image(torch.full((1, 64, 64, 3), 5.0), 64, 64).max()) == 1.0
    assert float(fit_image(torch.full((1, 64, 64, 3), -1.0), 32, 32).min()) == 0.0
    with pytest.raises(KinemaError, match="takes IMAGE floats in \\[0, 1\\], got torch.uint8"):
        fit_image(torch.full((1, 64, 64, 3), 200, dtype=torch.uint8), 64, 64)
    nan = torch.rand(1, 64, 64, 3)
    nan[0, 3, 3, 1] = float("nan")
    with pytest.raises(KinemaError, match="the content image holds NaN"):
        fit_image(nan, 64, 64, "the content image")


def test_variant_from_file_name():
    assert variant_of("svd_xt.safetensors") == "svd_xt"
    assert variant_of("sub/svd_xt_1_1.safetensors") == "svd_xt"
    assert variant_of("svd.safetensors") == "svd"
