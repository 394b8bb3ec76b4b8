"""How the VAE calls run: an fp16 VAE in fp16, a call that overflows again in fp32 (which then holds); on the CPU
in channels_last; by default as many frames a call as the frame size allows."""
import contextlib
import logging

import torch
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
    assert [default_decode_chunk(AutoencoderKL, h, w) for h, w in ((512, 512), (256, 256), (384, 384), (768, 768),
                                                                  (1024, 576), (64, 64))] == [4, 8, 7, 1, 1, 8]
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
