"""How the VAE calls run: an fp16 VAE in fp16, a call that overflows again in fp32 (which then holds); on the CPU
in channels_last; by default as many frames a call as the frame size allows."""
import contextlib
import logging

import torch
from fixtures import OutOfMemoryAbove
from fixtures import vae as sd_vae
from kinema.models import vae as vae_ops
from kinema.models.patching import replace_parameters
from kinema.models.memory import cast_weights
from kinema.models.vae import (
    AutoencoderKL,
    TemporalAutoencoder,
    decode_frames,
    default_decode_chunk,
    encode_frames,
)

LATENT = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(11))
IMAGES = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(12))


def _scaled(vae, factor, *names):
    """``vae`` with the weights ``names`` times ``factor`` (a copy: the shared fixture is left as it is)."""
    params = dict(vae.named_parameters())
    return replace_parameters(vae, {name: params[name].detach() * factor for name in names})


@contextlib.contextmanager
def _dtypes_seen(module):
    """The dtype of every input ``module`` receives inside the block (the hook table is shared with
    copy-on-write copies of it, so the fp32 fallback copy records too)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    try:
        yield seen
    finally:
        handle.remove()


def test_fp16_decode_runs_in_fp16_and_is_close_to_fp32(caplog):
    vae16 = cast_weights(sd_vae(), torch.float16)
    with _dtypes_seen(vae16.post_quant_conv) as seen, caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae16, LATENT, chunk=2)
    assert seen == [torch.float16, torch.float16]
    assert "overflowed" not in caplog.text
    ref = decode_frames(cast_weights(vae16, torch.float32), LATENT)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 2e-2


def test_fp16_decode_that_overflows_is_run_again_in_fp32_for_the_rest_of_the_job(caplog):
    # activations of ~1e5 after post_quant_conv: inf in fp16 (max 65504), fine in fp32 (GroupNorm rescales)
    vae16 = _scaled(cast_weights(sd_vae(), torch.float16), 1e3, "post_quant_conv.weight")
    latent = LATENT * 100
    assert torch.isfinite(vae16.post_quant_conv.weight).all()
    assert not torch.isfinite(vae16.decode(latent[:1].half())).all()
    with _dtypes_seen(vae16.post_quant_conv) as seen, caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae16, latent, chunk=1)
    assert seen == [torch.float16, torch.float32, torch.float32, torch.float32]  # once in fp16, then fp32 only
    assert "VAE decoding overflowed in fp16" in caplog.text
    assert torch.isfinite(out).all()
    assert torch.equal(out, decode_frames(cast_weights(vae16, torch.float32), latent, chunk=1))
    assert vae16.dtype == torch.float16 and vae16.post_quant_conv.weight.dtype == torch.float16  # input unchanged


def test_fp16_encode_that_overflows_is_run_again_in_fp32(caplog):
    vae16 = _scaled(cast_weights(sd_vae(), torch.float16), 1e3, "encoder.conv_out.weight", "quant_conv.weight")
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = encode_frames(vae16, IMAGES)
    assert "VAE encoding overflowed in fp16" in caplog.text
    assert torch.isfinite(out).all() and out.abs().max() > 65504  # values fp16 cannot hold
    assert torch.equal(out, encode_frames(cast_weights(vae16, torch.float32), IMAGES))


def test_fp32_and_bf16_vaes_are_never_rerun(caplog):
    for dtype in (torch.float32, torch.bfloat16):
        vae = _scaled(cast_weights(sd_vae(), dtype), 1e3, "post_quant_conv.weight")
        with _dtypes_seen(vae.post_quant_conv) as seen, caplog.at_level(logging.WARNING, logger="kinema"):
            decode_frames(vae, LATENT[:1] * 100)
        assert seen == [dtype]
    assert "overflowed" not in caplog.text


def test_cpu_decode_and_encode_run_in_channels_last():
    layouts = []
    vae = sd_vae()
    handles = [m.register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        for m in (vae.post_quant_conv, vae.encoder.conv_in)]
    try:
        decode_frames(vae, LATENT)
        encode_frames(vae, IMAGES)
    finally:
        for h in handles:
            h.remove()
    assert layouts == [True, True]


def test_the_default_chunk_holds_four_frames_of_512x512():
    """SD VAE: 4 frames a call at 512x512 (8 measured 4.45 GiB on a GPU, over AnimateDiff's 4 GB default), more for
    smaller frames up to 8, at least 1; SVD's temporal decoder keeps its 14 (the chunk is part of its output)."""
    sizes = ((512, 512), (256, 256), (384, 384), (768, 768), (1024, 576), (64, 64), (2048, 1024))
    assert [default_decode_chunk(AutoencoderKL, h, w) for h, w in sizes] == [4, 8, 7, 1, 1, 8, 1]
    assert default_decode_chunk(TemporalAutoencoder, 576, 1024) == 14


def test_decode_and_encode_frames_without_a_chunk_take_the_default_for_the_frame_size(monkeypatch):
    monkeypatch.setattr(vae_ops, "CHUNK_PIXELS", 2 * 64 * 64)  # 2 frames of the 8x8 latent's 64x64
    done = []
    images = decode_frames(sd_vae(), LATENT, on_chunk=lambda n, total: done.append((n, total)))
    assert done == [(2, 3), (3, 3)]
    torch.testing.assert_close(images, decode_frames(sd_vae(), LATENT, chunk=3), rtol=0, atol=1e-5)
    done.clear()
    frames = torch.cat([IMAGES, IMAGES[:1]])  # 3 frames of 64x64
    latent = encode_frames(sd_vae(), frames, on_chunk=lambda n, total: done.append((n, total)))
    assert done == [(2, 3), (3, 3)]
    torch.testing.assert_close(latent, encode_frames(sd_vae(), frames, chunk=3), rtol=0, atol=1e-5)


# -- out-of-memory retries: what the retry tries (the allocator's error simulated as in test_tiling.py) ---------------

def _out_of_memory_above(vae, **limits):
    """``test_tiling.OutOfMemoryAbove``: ``vae`` raising the allocator's error on a call above ``limits`` (frames,
    latent or image pixels), recording every call's shape."""

    return OutOfMemoryAbove(vae, **limits)


def test_an_odd_chunk_that_runs_out_of_memory_retries_with_the_smaller_half(caplog):
    """Half of a 3-frame chunk is 1 frame (rounded down), not 2: a retry with 2 would be nearly the chunk that just
    failed. The 1-frame chunk then holds for the rest, and the frames come out as decoded whole."""
    vae = _out_of_memory_above(sd_vae(), frames=1)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae, LATENT, chunk=3)
    assert [c[0] for c in vae.calls] == [3, 1, 1, 1]
    assert "ran out of memory with 3 frame(s) a chunk; retrying once with 1 frame(s) a chunk" in caplog.text
    torch.testing.assert_close(out, decode_frames(sd_vae(), LATENT, chunk=3), rtol=0, atol=1e-5)


def test_a_last_short_chunk_that_runs_out_of_memory_goes_to_tiles(caplog):
    """3 frames at a chunk of 2: the last chunk holds 1 frame. When that one runs out of memory the retry counts
    the frames left (1, nothing to halve) and tiles it; it never repeats the same 1-frame call."""
    latent = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(13))
    latent[2, 0, 0, 0] = 7.0  # marks the last frame


    class LastFrameTooLargeWhole(OutOfMemoryAbove):
        def _check(self, x):
            self.calls.append(tuple(x.shape))
            if x.shape[-2:] == (16, 16) and bool((x == 7.0).any()):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    vae = LastFrameTooLargeWhole(sd_vae())
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae, latent, chunk=2)
    assert out.shape == (3, 128, 128, 3) and bool(torch.isfinite(out).all())
    assert vae.calls[:3] == [(2, 4, 16, 16), (1, 4, 16, 16), (1, 4, 8, 8)]
    assert "retrying once with 2 frame(s) a chunk, tiles of 64 overlapping 8 pixels" in caplog.text


def test_a_tile_as_large_as_the_latent_is_no_tiling_on_retry(caplog):
    """A tile equal to the latent's side covers it: the retry starts tiling (half the side, overlapping a
    sixteenth at least 1), not the asked-for tiling halved (which would keep its overlap of 0: hard seams)."""
    from kinema.models.tiling import TileOptions

    vae = _out_of_memory_above(sd_vae(), pixels=100)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        decode_frames(vae, LATENT[:1].repeat(1, 1, 2, 2), chunk=1, tiles=TileOptions(16, 0))
    assert vae.calls[0] == (1, 4, 16, 16) and set(vae.calls[1:]) == {(1, 4, 8, 8)}
    assert ("tiles of 128 overlapping 0 pixels; retrying once with 1 frame(s) a chunk, tiles of 64 overlapping 8 "
            "pixels") in caplog.text


def test_a_tiled_encode_that_runs_out_of_memory_retries_in_tiles_of_whole_latent_pixels(caplog):
    """Encode tiles of 136 overlapping 40 that run out of memory are halved to multiples of 8 (64 overlapping 16),
    not to 68 overlapping 17, which the encoder cannot take (8 pixels to a latent pixel): the retry succeeds."""
    from kinema.models.tiling import TileOptions

    images = torch.rand(1, 160, 160, 3, generator=torch.Generator().manual_seed(14))
    vae = _out_of_memory_above(sd_vae(), pixels=100 * 100)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = encode_frames(vae, images, chunk=1, tiles=TileOptions(136, 40))
    assert out.shape == (1, 4, 20, 20) and bool(torch.isfinite(out).all())
    assert vae.calls[0] == (1, 3, 136, 136) and set(vae.calls[1:]) == {(1, 3, 64, 64)}
    assert ("tiles of 136 overlapping 40 pixels; retrying once with 1 frame(s) a chunk, tiles of 64 overlapping 16 "
            "pixels") in caplog.text  # an encoder's tiles: in pixels already


def test_an_8x8_latent_that_runs_out_of_memory_names_the_setting_instead():
    """Decode tiles are at least 8 latent pixels (the decoder needs some context): a 1-frame 8x8 latent that runs
    out of memory has nothing smaller to retry with, so it is named after one call, not retried in 4x4 tiles."""
    import pytest
    from kinema.models.errors import KinemaOutOfMemoryError

    vae = _out_of_memory_above(sd_vae(), pixels=63)
    with pytest.raises(KinemaOutOfMemoryError, match=r"^VAE decoding ran out of memory and there is nothing smaller "
                                                     r"to retry with: free GPU memory \(other models or programs "
                                                     r"using it\)$"):  # 1 frame of 64x64 pixels: nothing to lower
        decode_frames(vae, LATENT[:1], chunk=1)
    assert vae.calls == [(1, 4, 8, 8)]


def test_encode_pixels_encodes_one_frame_a_call():
    """``encode_pixels`` (SVD's init image) takes frames in [-1, 1] and encodes them a frame at a time, as
    ``encode_frames`` with a chunk of 1 does from [0, 1]."""
    from kinema.models.vae import encode_pixels

    vae = _out_of_memory_above(sd_vae())
    pixels = IMAGES.permute(0, 3, 1, 2) * 2 - 1
    out = encode_pixels(vae, torch.cat([pixels, pixels[:1]]), "SVD init image encoding", "lower the size")
    assert vae.calls == [(1, 3, 64, 64)] * 3
    torch.testing.assert_close(out, encode_frames(sd_vae(), torch.cat([IMAGES, IMAGES[:1]]), chunk=1),
                               rtol=0, atol=1e-5)


# -- dtypes and the fp32 fallback --------------------------------------------------------------------------------

def test_an_fp16_encode_returns_float32_latents():
    """An fp16 VAE's latents come back float32 (what the samplers and latent nodes take), close to the fp32 VAE's."""
    vae16 = cast_weights(sd_vae(), torch.float16)
    out = encode_frames(vae16, IMAGES)
    assert out.dtype == torch.float32
    assert (out - encode_frames(cast_weights(vae16, torch.float32), IMAGES)).abs().max() < 2e-2


def test_a_bf16_vae_whose_output_is_not_finite_is_not_run_again_in_fp32(caplog):
    """Only fp16 output that is not finite means fp16 overflowed: bf16 has fp32's range, so an inf from a bf16 VAE
    would be an inf in fp32 too; the call is not repeated in fp32 (nor the job switched to it), and the job stops
    with the pack's error instead of returning blank (NaN) frames."""
    import pytest
    from kinema.models.errors import KinemaError

    vae = _scaled(cast_weights(sd_vae(), torch.bfloat16), 1e30, "post_quant_conv.weight")
    latent = LATENT[:1] * 1e6
    assert not torch.isfinite(cast_weights(vae, torch.float32).decode(latent)).all()  # fp32 does not help
    with _dtypes_seen(vae.post_quant_conv) as seen, caplog.at_level(logging.WARNING, logger="kinema"), \
            pytest.raises(KinemaError, match=r"^VAE decoding gave NaN or infinite values in bfloat16 \(its input's "
                                             r"largest magnitude is .*check the node that made the input"):
        decode_frames(vae, latent)
    assert seen == [torch.bfloat16]
    assert "overflowed" not in caplog.text


def test_output_not_finite_in_fp32_either_is_an_error_after_the_fp16_retry(caplog):
    """An fp16 VAE whose output stays not finite in fp32 (an input far out of range: finite latents of 1e20) is
    run once in fp32, then stops with the pack's error naming the input's size, for a decode and an encode."""
    import pytest
    from kinema.models.errors import KinemaError

    vae = cast_weights(sd_vae(), torch.float16)
    with caplog.at_level(logging.WARNING, logger="kinema"), \
            pytest.raises(KinemaError, match=r"^VAE decoding gave NaN or infinite values in float32 \(its input's "
                                             r"largest magnitude is 1e\+20"):
        decode_frames(vae, torch.full((1, 4, 8, 8), 1e20))
    assert "VAE decoding overflowed in fp16" in caplog.text
    huge = _scaled(sd_vae(), 1e30, "encoder.conv_in.weight")
    with pytest.raises(KinemaError, match=r"^VAE encoding gave NaN or infinite values in float32"):
        encode_frames(huge, IMAGES[:1])


# -- what the codecs refuse ----------------------------------------------------------------------------------------

def test_an_empty_batch_and_a_chunk_of_true_are_refused():
    """No frames is named (not torch.cat's error on an empty list); True is no frame count (a bool is an int to
    Python: it would pass as a chunk of 1)."""
    import pytest
    from kinema.models.errors import KinemaError

    with pytest.raises(KinemaError, match="^no frames to encode: the image batch is empty$"):
        encode_frames(sd_vae(), torch.rand(0, 64, 64, 3))
    for codec, frames in ((decode_frames, LATENT), (encode_frames, IMAGES)):
        with pytest.raises(KinemaError, match=r"^frame_chunk must be a whole number of frames, 1 or more \(0 on the "
                                              r"nodes: the default\), got True$"):
            codec(sd_vae(), frames, chunk=True)


# -- config inference --------------------------------------------------------------------------------------------

def test_an_encoder_config_reads_its_latent_width():
    """An encoder with 16 latent channels (its conv_out gives mean and log-variance: 32) reads as 16, not SD's 4."""
    from fixtures_temporal_vae import meta_state_dict
    from kinema.models.vae import VAEConfig, infer_encoder_config

    with torch.device("meta"):
        sd = meta_state_dict(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), z_channels=16)))
    assert infer_encoder_config(sd) == VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=16)


def test_the_temporal_vae_config_reads_time_mix_conv_attention_and_quant_conv():
    """SVD's temporal decoder is known by its ``time_stack`` or its ``time_mix_conv`` keys (one without the other is
    named incomplete, not a plain decoder); temporal attention (``time_mix_block``) is refused; a ``quant_conv``
    beside the encoder is read into the config."""
    import pytest
    from fixtures_temporal_vae import svd_state_dict
    from kinema.models import checkpoint
    from kinema.models.errors import KinemaError
    from kinema.models.vae import (
        SVD_VAE_PREFIX,
        infer_temporal_vae_config,
        is_temporal_vae,
    )

    fs = checkpoint.sub_state_dict(svd_state_dict(), SVD_VAE_PREFIX)
    only_mix = {k: v for k, v in fs.items() if ".time_stack." not in k}
    assert is_temporal_vae(only_mix)
    with pytest.raises(KinemaError, match=r"^incomplete SVD temporal decoder: 'decoder\.mid\.block_1\.time_stack"):
        infer_temporal_vae_config(only_mix)
    with pytest.raises(KinemaError, match=r"^this SVD decoder has temporal attention \('time_mix_block', sgm "
                                          r"time_mode 'all' or 'attn-only'\): Kinema supports the published SVD "
                                          r"decoder \(time_mode 'conv-only'\)$"):
        infer_temporal_vae_config({**fs, "decoder.mid.attn_1.time_mix_block.norm.weight": torch.ones(4)})
    assert infer_temporal_vae_config(fs).quant_conv is False
    quant = {"quant_conv.weight": torch.zeros(8, 8, 1, 1), "quant_conv.bias": torch.zeros(8)}
    assert infer_temporal_vae_config({**fs, **quant}).quant_conv is True


def test_the_default_decode_chunk_counts_both_sides_of_a_wide_frame(monkeypatch):
    """The default chunk holds as many frames as ``CHUNK_PIXELS`` of their height times width: 2 frames of 64x128,
    not 4 (as many 64x64 frames fit)."""
    monkeypatch.setattr(vae_ops, "CHUNK_PIXELS", 2 * 64 * 128)
    done = []
    decode_frames(sd_vae(), LATENT.repeat(1, 1, 1, 2), on_chunk=lambda n, total: done.append((n, total)))
    assert done == [(2, 3), (3, 3)]


def test_a_vae_config_reads_its_image_channels_and_latent_width():
    """An AutoencoderKL of 4 image channels and 16 latent ones reads as such (the latent width off the decoder)."""
    from fixtures_temporal_vae import meta_state_dict
    from kinema.models.vae import VAEConfig, infer_vae_config

    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=16, in_channels=4)
    with torch.device("meta"):
        sd = meta_state_dict(AutoencoderKL(cfg))
    assert infer_vae_config(sd) == cfg
    assert infer_vae_config({"first_stage_model." + k: v for k, v in sd.items()}, "first_stage_model.") == cfg


def test_temporal_attention_keys_outside_the_vae_do_not_refuse_it():
    """Only a 'time_mix_block' key of the VAE's own decoder is temporal attention: one elsewhere in a whole
    checkpoint (another model's) leaves the VAE as it is."""
    from fixtures_temporal_vae import svd_state_dict
    from kinema.models.vae import SVD_VAE_PREFIX, infer_temporal_vae_config

    sd = svd_state_dict()
    stray = {"model.diffusion_model.x.time_mix_block.norm.weight": torch.ones(4)}
    assert infer_temporal_vae_config({**sd, **stray}, SVD_VAE_PREFIX) == infer_temporal_vae_config(sd, SVD_VAE_PREFIX)
