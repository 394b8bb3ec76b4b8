"""The Stable Video Diffusion autoencoder: published layout, config from shapes, parity, chunked decoding.

The tiny SVD autoencoder (``tests/fixtures_temporal_vae.py``) is loaded into the
engine in the published sgm layout and into diffusers'
``AutoencoderKLTemporalDecoder`` through this suite's own key mapping, so the
parity tests also check the engine's key layout independently. diffusers'
``quant_conv`` is the identity for the first stage (the published
``first_stage_model`` has none). Tolerance: ``1e-5 * max(1, max |reference|)``
(max abs difference), fp32.
"""
import pytest
import torch
from conftest import assert_net_close
from einops import rearrange
from fixtures_temporal_vae import (
    REAL,
    TINY,
    cond_encoder,
    diffusers_temporal_vae,
    meta_state_dict,
    svd_state_dict,
    temporal_vae,
)
from kinema.models import checkpoint, layers
from kinema.models.errors import KinemaError
from kinema.models.vae import (
    SVD_COND_ENCODER_PREFIX,
    SVD_DECODE_CHUNK,
    SVD_VAE_PREFIX,
    AutoencoderKL,
    ImageEncoderKL,
    TemporalAutoencoder,
    VAEConfig,
    decode_frames,
    encode_frames,
    infer_encoder_config,
    infer_temporal_vae_config,
    infer_vae_config,
    is_temporal_vae,
)

FRAMES, HW = 5, 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)




# -- the published layout and config inference -------------------------------------------------------------------

def test_published_layout():
    sd = svd_state_dict()
    fs = checkpoint.sub_state_dict(sd, SVD_VAE_PREFIX)
    assert "encoder.conv_in.weight" in fs and "decoder.conv_in.weight" in fs
    assert not any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in fs)  # none in first_stage_model
    # every decoder ResBlock is a VideoResBlock: mid 2 + 4 levels x 3
    assert sum(k.endswith(".mix_factor") for k in fs) == 2 + len(TINY.ch_mult) * (TINY.num_res_blocks + 1)
    assert fs["decoder.mid.block_1.mix_factor"].shape == (1,)
    assert fs["decoder.up.0.block.2.time_stack.out_layers.3.weight"].shape == (32, 32, 3, 1, 1)
    assert fs["decoder.conv_out.weight"].shape == (3, 32, 3, 3)
    assert fs["decoder.conv_out.time_mix_conv.weight"].shape == (3, 3, 3, 1, 1)
    assert not any("time_stack" in k or "mix_factor" in k for k in fs if k.startswith("encoder."))
    assert not any(".attn_1." in k and ("time" in k or "mix" in k) for k in fs)  # time_mode conv-only
    cond = checkpoint.sub_state_dict(sd, SVD_COND_ENCODER_PREFIX)
    assert "encoder.conv_in.weight" in cond and "quant_conv.weight" in cond and "decoder.conv_in.weight" in cond
    assert not is_temporal_vae(cond)  # the conditioning copy's decoder is a plain 2D one


def test_config_inferred_from_real_size_shapes():
    with torch.device("meta"):
        model = TemporalAutoencoder(REAL)
        plain = AutoencoderKL(VAEConfig())
    sd = meta_state_dict(model, SVD_VAE_PREFIX)
    sd.update(meta_state_dict(plain, SVD_COND_ENCODER_PREFIX))
    fs = checkpoint.sub_state_dict(sd, SVD_VAE_PREFIX)
    # shapes of the published svd.safetensors
    assert fs["decoder.mid.block_1.time_stack.in_layers.2.weight"].shape == (512, 512, 3, 1, 1)
    assert fs["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert fs["decoder.conv_out.time_mix_conv.weight"].shape == (3, 3, 3, 1, 1)
    assert infer_temporal_vae_config(fs) == REAL
    assert infer_temporal_vae_config(sd, SVD_VAE_PREFIX) == REAL
    assert REAL.quant_conv is False
    cond = infer_encoder_config(sd, SVD_COND_ENCODER_PREFIX)
    assert cond == VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, in_channels=3)
    with torch.device("meta"):
        enc = ImageEncoderKL(cond)
    assert set(enc.state_dict()) <= set(checkpoint.sub_state_dict(sd, SVD_COND_ENCODER_PREFIX))


def test_plain_vae_is_not_mistaken_for_temporal():
    with torch.device("meta"):
        plain = meta_state_dict(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2))))
    assert not is_temporal_vae(plain)
    with pytest.raises(KinemaError, match="plain image decoder.*time_stack"):
        infer_temporal_vae_config(plain)
    with pytest.raises(KinemaError, match="plain image decoder"):
        infer_temporal_vae_config(svd_state_dict(), SVD_COND_ENCODER_PREFIX)
    assert is_temporal_vae(svd_state_dict(), SVD_VAE_PREFIX)
    # a temporal layout with time_mix_conv missing is named, not half-loaded
    fs = {k: v for k, v in checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX).items()
          if "time_mix_conv" not in k}
    with pytest.raises(KinemaError, match="time_mix_conv"):
        infer_temporal_vae_config(fs)
    # the plain reader still reads the plain parts of the SVD file
    assert infer_vae_config(checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX)).ch_mult == TINY.ch_mult
    # temporal kernels that disagree are named at load, not met as a shape error later
    fs = dict(checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX))
    mix = fs["decoder.conv_out.time_mix_conv.weight"]
    fs["decoder.conv_out.time_mix_conv.weight"] = mix[:, :, :1]
    differ = r"temporal kernels differ \(time_stack \(3, 1, 1\), time_mix_conv \(1, 1, 1\)"
    with pytest.raises(KinemaError, match=differ):
        infer_temporal_vae_config(fs)


def test_the_latent_width_is_read_off_the_decoder():
    """A VAE with 16 latent channels (as later models have) is read as such, not as SD's 4."""
    with torch.device("meta"):
        sd = meta_state_dict(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), z_channels=16)))
    assert infer_vae_config(sd).z_channels == 16


# -- parity with diffusers -----------------------------------------------------------------------------------------

def test_decode_matches_diffusers():
    pytest.importorskip("diffusers", exc_type=ImportError)
    z = torch.randn(FRAMES, 4, HW, HW, generator=_gen(1))
    with torch.no_grad():
        ours = temporal_vae().decode(z, num_frames=FRAMES)
        ref = diffusers_temporal_vae().decode(z, num_frames=FRAMES).sample
    assert ours.shape == (FRAMES, 3, 8 * HW, 8 * HW)
    assert_net_close(ours, ref, "temporal decode")


def test_encode_matches_diffusers():
    pytest.importorskip("diffusers", exc_type=ImportError)
    x = torch.rand(2, 3, 64, 64, generator=_gen(2)) * 2 - 1
    with torch.no_grad():
        ours = temporal_vae().encode(x)
        ref = diffusers_temporal_vae().encode(x).latent_dist.mean
        assert_net_close(ours, ref, "first-stage encode (mean, no quant_conv)")
        ours_c = cond_encoder().encode(x)
        ref_c = diffusers_temporal_vae(SVD_COND_ENCODER_PREFIX, quant_conv=True).encode(x).latent_dist.mean
    assert ours.shape == (2, 4, 8, 8)
    assert_net_close(ours_c, ref_c, "conditioning-frame encode (mean, with quant_conv)")
    assert float((ours - ours_c).abs().max()) > 1e-3  # two different weight sets


# -- frames, videos and chunks -------------------------------------------------------------------------------------

def test_decode_folds_videos_and_checks_frames():
    vae = temporal_vae()
    z = torch.randn(2 * 3, 4, 8, 8, generator=_gen(3))
    with torch.no_grad():
        both = vae.decode(z, num_frames=3)
        first, second = vae.decode(z[:3]), vae.decode(z[3:])
        whole = vae.decode(z)  # one 6-frame video: frames mix across the boundary
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=0)
    assert float((whole[:3] - first).abs().max()) > 1e-3
    with pytest.raises(KinemaError, match="do not split"):
        vae.decode(z, num_frames=4)


def test_decode_frames_chunk_changes_the_output_as_in_sgm():
    vae = temporal_vae()
    z = torch.randn(FRAMES, 4, 8, 8, generator=_gen(4))
    calls = []
    with torch.no_grad():
        one_call = rearrange((vae.decode(z).clamp(-1, 1) + 1) / 2, "f c h w -> f h w c")
        head = rearrange((vae.decode(z[:2]).clamp(-1, 1) + 1) / 2, "f c h w -> f h w c")
    all_frames = decode_frames(vae, z, chunk=FRAMES)
    by_two = decode_frames(vae, z, chunk=2, on_chunk=lambda done, total: calls.append((done, total)))
    default = decode_frames(vae, z)  # SVD_DECODE_CHUNK >= FRAMES: one call
    assert all_frames.shape == (FRAMES, 64, 64, 3) and 0 <= float(all_frames.min()) <= float(all_frames.max()) <= 1
    # decode_frames runs in channels_last on the CPU: the same sums in another order (fp32 rounding)
    torch.testing.assert_close(all_frames, one_call, atol=2e-5, rtol=0)
    torch.testing.assert_close(default, all_frames, atol=0, rtol=0)
    torch.testing.assert_close(by_two[:2], head, atol=2e-5, rtol=0)  # each chunk is its own short video
    assert float((by_two - all_frames).abs().max()) > 1e-3
    assert calls == [(2, FRAMES), (4, FRAMES), (5, FRAMES)]
    assert SVD_DECODE_CHUNK == 14 and TemporalAutoencoder.default_decode_chunk == SVD_DECODE_CHUNK


def test_the_decoder_runs_its_per_frame_layers_on_slices_of_frames_with_the_same_output(monkeypatch):
    """``layers.SLICE_POSITIONS`` bounds the frames a per-frame layer (spatial ResBlock halves, mid attention,
    upsamplings, conv_out's 2D part) takes at once, and the rows a temporal conv takes at once: the same video."""
    vae = temporal_vae()
    z = torch.randn(FRAMES, 4, 8, 8, generator=_gen(6))
    batches = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
             for m in (vae.decoder.mid.attn_1, vae.decoder.up[0].block[0].conv1, vae.decoder.up[1].upsample.conv)]
    try:
        with torch.no_grad():
            whole = vae.decode(z)
            assert set(batches) == {FRAMES}
            batches.clear()
            monkeypatch.setattr(layers, "SLICE_POSITIONS", 2 * 8 * 8)  # 2 latent-size frames, 1 full-size frame
            monkeypatch.setattr(layers, "UNBANDED_DEVICES", frozenset())  # the temporal convs in bands, as on a GPU
            sliced = vae.decode(z)
    finally:
        for h in hooks:
            h.remove()
    assert batches == [2, 2, 1] + [1] * FRAMES * 2  # mid attention; the full-size ResBlock; the last upsampling
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_the_temporal_group_norm_of_a_half_video_is_float32_groupnorm(monkeypatch, native):
    """sgm's GroupNorm32 on an fp16 video: float32 slices of groups where the device's kernel would not accumulate
    in float32; PyTorch's own kernel where it does (``NATIVE_HALF_GROUP_NORM``: CUDA and the CPU; the CPU stands
    in for a device without one here)."""
    from kinema.models import vae as vae_module

    norm = torch.nn.GroupNorm(8, 16).half()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1), norm.bias.normal_(0, 0.1)
    frames = (torch.randn(2 * 3, 16, 5, 7, generator=_gen(9)) * 3 + 1).half()
    x = rearrange(frames, "(b f) c h w -> b c f h w", f=3)
    calls = []
    real = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm", lambda t, *a, **k: calls.append(t.dtype) or real(t, *a, **k))
    monkeypatch.setattr(vae_module, "GN_FP32_SLICE_BYTES", 2 * 3 * 2 * 35 * 4)  # one group's float32 copy a slice
    monkeypatch.setattr(vae_module, "NATIVE_HALF_GROUP_NORM", frozenset({"cpu"} if native else ()))
    out = vae_module._group_norm_fp32(norm, x)
    reference = real(x.float(), 8, norm.weight.float(), norm.bias.float(), norm.eps)
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert calls == ([torch.float16] if native else [torch.float32] * 8)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-3)  # fp16 steps are 2e-3 at 2..4


def test_the_cpus_group_norm_of_a_bf16_video_keeps_its_layout_and_float32_statistics(monkeypatch):
    """A bf16 video as the CPU decoder holds it (channels_last frames seen as b c f h w) through PyTorch's own CPU
    kernel: the layout kept for the convolutions after it, the statistics accumulated in float32 (an offset mean
    that bf16 sums would lose)."""
    from kinema.models import vae as vae_module

    norm = torch.nn.GroupNorm(8, 16).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1), norm.bias.normal_(0, 0.1)
    frames = (torch.randn(2 * 3, 16, 5, 7, generator=_gen(4)) * 0.5 + 30).bfloat16()
    x = rearrange(frames.contiguous(memory_format=torch.channels_last), "(b f) c h w -> b c f h w", f=3)
    calls = []
    real = torch.nn.functional.group_norm
    monkeypatch.setattr(torch.nn.functional, "group_norm", lambda t, *a, **k: calls.append(t.dtype) or real(t, *a, **k))
    out = vae_module._group_norm_fp32(norm, x)
    assert calls == [torch.bfloat16]  # one call of the CPU's own kernel, no float32 copies
    assert out.dtype == torch.bfloat16 and out.stride() == x.stride()
    reference = real(x.float(), 8, norm.weight.float(), norm.bias.float(), norm.eps)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05)  # bf16 steps are 1.6e-2 at 2..4


def test_encode_frames_with_temporal_vae():
    vae = temporal_vae()
    images = torch.rand(3, 32, 48, 3, generator=_gen(5))
    latent = encode_frames(vae, images, chunk=2)
    with torch.no_grad():
        want = vae.encode(rearrange(images, "f h w c -> f c h w") * 2 - 1)
    assert latent.shape == (3, 4, 4, 6)
    torch.testing.assert_close(latent, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_frames(cond_encoder(), images), cond_encoder().encode(
        rearrange(images, "f h w c -> f c h w") * 2 - 1), atol=1e-5, rtol=0)


def test_bf16_load_decodes_close_to_fp32():
    sd = checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX)
    cfg = infer_temporal_vae_config(sd)
    vae16 = checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, torch.bfloat16, "VAE", "tiny svd")
    assert vae16.dtype == torch.bfloat16
    z = torch.randn(3, 4, 8, 8, generator=_gen(6))
    with torch.no_grad():
        out = vae16.decode(z.bfloat16())
        ref = temporal_vae().decode(z)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) < 0.1 * max(1.0, float(ref.abs().max()))


def test_cpu_decode_keeps_channels_last_through_the_temporal_layers():
    """On the CPU the decoder's frames are channels_last (``vae._layout``); its temporal layers (GroupNorm over the
    video, the frame convolutions) keep that layout, also for one video, so no convolution after them falls back
    to the slower default layout."""
    model = temporal_vae()
    layouts = []

    def record(module, args):
        x = args[0]
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        layouts.append((type(module).__name__, tuple(x.shape), x.is_contiguous(memory_format=fmt)))

    handles = [m.register_forward_pre_hook(record) for m in model.decoder.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    try:
        decode_frames(model, torch.randn(FRAMES, 4, 8, 8), chunk=FRAMES)
    finally:
        for h in handles:
            h.remove()
    assert any(name == "FrameConv" for name, _, _ in layouts)
    assert all(kept for _, _, kept in layouts), [entry for entry in layouts if not entry[2]]


def test_a_first_stage_with_a_quant_conv_encodes_through_it():
    """A first stage that has a ``quant_conv`` (the published files have none) is read as such also under its
    prefix in a whole checkpoint, and encodes the mean of the quant_conv's output, as sgm's AutoencodingEngine."""
    from dataclasses import replace

    sd = dict(svd_state_dict())
    for leaf in ("weight", "bias"):
        sd[f"{SVD_VAE_PREFIX}quant_conv.{leaf}"] = sd[f"{SVD_COND_ENCODER_PREFIX}quant_conv.{leaf}"]
    cfg = infer_temporal_vae_config(sd, SVD_VAE_PREFIX)
    assert cfg == replace(TINY, quant_conv=True)
    vae = checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), checkpoint.sub_state_dict(sd, SVD_VAE_PREFIX),
                                   torch.float32, "VAE", "tiny svd with a quant_conv")
    x = torch.rand(2, 3, 32, 32, generator=_gen(7)) * 2 - 1
    with torch.no_grad():
        moments = vae.encoder(x)
        want = vae.quant_conv(moments)[:, :4]
        got = vae.encode(x)
    assert float((want - moments[:, :4]).abs().max()) > 1e-3  # the quant_conv changes the latent
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
