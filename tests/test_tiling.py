"""VAE tiling (feathered overlaps) and the out-of-memory retry of VAE encode/decode."""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import OutOfMemoryAbove
from fixtures import vae as sd_vae
from fixtures_svd_pipeline import svd_state_dict
from kinema.models import checkpoint, memory, tiling
from kinema.models.errors import KinemaError, KinemaOutOfMemoryError
from kinema.models.tiling import TileOptions, run_tiled, tile_starts
from kinema.models.vae import (
    SVD_VAE_PREFIX,
    TemporalAutoencoder,
    decode_frames,
    encode_frames,
    infer_temporal_vae_config,
)


@pytest.mark.parametrize("size,tile,overlap,align", [(40, 16, 4, 1), (40, 16, 6, 1), (24, 24, 4, 1), (37, 10, 3, 1),
                                                     (320, 128, 32, 8), (64, 100, 8, 1)])
def test_tiles_cover_the_side_with_the_overlap(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    assert all(s % align == 0 for s in starts)
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap - align  # neighbours share (about) the overlap, never leave a gap


def test_blending_is_exact_for_a_local_function():
    x = torch.randn(3, 4, 24, 40, generator=torch.Generator().manual_seed(0))

    def up(t):  # pointwise, then 8x nearest: each output pixel depends on one input pixel only
        return F.interpolate(torch.tanh(t[:, :3]), scale_factor=8, mode="nearest")

    for tiles in (TileOptions(16, 4), TileOptions(12, 5), TileOptions(8, 2)):
        assert torch.allclose(run_tiled(up, x, tiles, 8), up(x), atol=1e-6)


def test_blend_ramps_are_linear_over_the_overlaps_at_pixel_centres():
    """A tile's weight is min(1, (i + 0.5) / left overlap, (length - i - 0.5) / right overlap) at its pixel i, so
    the falling ramp of one tile and the rising ramp of the next add up to 1 across their overlap."""
    def by_hand(length, left, right):
        return [min(1.0, (i + 0.5) / left if left else 1.0, (length - i - 0.5) / right if right else 1.0)
                for i in range(length)]

    first = tiling._ramp(8, 0, 8, 20, None, 5)  # the next tile starts at 5: 3 shared pixels
    middle = tiling._ramp(10, 5, 15, 20, 8, 12)  # 3 shared with the previous tile, 3 with the next
    last = tiling._ramp(8, 12, 20, 20, 15, None)
    assert first.tolist() == pytest.approx([1, 1, 1, 1, 1, 5 / 6, 1 / 2, 1 / 6], abs=1e-12)
    for got, want in ((first, by_hand(8, 0, 3)), (middle, by_hand(10, 3, 3)), (last, by_hand(8, 3, 0))):
        assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, abs=1e-12)
    assert (first[5:] + middle[:3]).tolist() == pytest.approx([1, 1, 1], abs=1e-12)
    assert (middle[7:] + last[:3]).tolist() == pytest.approx([1, 1, 1], abs=1e-12)
    assert torch.equal(tiling._ramp(6, 0, 6, 6, None, None), torch.ones(6, dtype=torch.float64))


def test_a_tile_as_large_as_the_image_is_the_untiled_result_exactly():
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_frames(sd_vae(), latent, tiles=TileOptions(8, 2)), decode_frames(sd_vae(), latent))


def _column_gradients(images):
    """Mean |horizontal difference| per column boundary of IMAGE frames [f, h, w, 3]."""
    return (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(0, 1, 3))


def _row_gradients(images):
    """Mean |vertical difference| per row boundary of IMAGE frames [f, h, w, 3]."""
    return (images[:, 1:] - images[:, :-1]).abs().mean(dim=(0, 2, 3))


def _row_seam_ratio(tiled, plain):
    return float((_row_gradients(tiled) / _row_gradients(plain)).max())


def _seam_ratio(tiled, plain):
    """How much the most visible boundary stands out in ``tiled`` against ``plain``: between columns (tiles side
    by side) and between rows (tiles one above the other)."""
    return max(float((_column_gradients(tiled) / _column_gradients(plain)).max()), _row_seam_ratio(tiled, plain))


def test_tiled_decode_is_close_to_untiled_and_has_no_seams(monkeypatch):
    latent = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    plain = decode_frames(sd_vae(), latent)
    tiled = decode_frames(sd_vae(), latent, tiles=TileOptions(16, 4))
    # random-weight VAE: its GroupNorm statistics and mid attention are global, so tiles see other statistics
    assert float((tiled - plain).abs().mean()) < 0.06
    assert _seam_ratio(tiled, plain) < 1.2  # no column boundary stands out: the overlaps cross-fade
    # the metric sees a seam: the same tiles cut hard (no feathering) make the tile borders stand out
    real_ramp = tiling._ramp
    monkeypatch.setattr(tiling, "_ramp", lambda length, *a: torch.ones(length, dtype=torch.float64))
    hard = decode_frames(sd_vae(), latent, tiles=TileOptions(16, 4))
    assert _seam_ratio(hard, plain) > _seam_ratio(tiled, plain) + 0.2
    # and a seam between tile rows alone: rows cut hard (the ramp's height is the tile's), columns feathered
    monkeypatch.setattr(tiling, "_ramp", lambda length, start, end, size, *a: (
        torch.ones(length, dtype=torch.float64) if size == 24 * 8 else real_ramp(length, start, end, size, *a)))
    rows_hard = decode_frames(sd_vae(), latent, tiles=TileOptions(16, 4))
    assert _row_seam_ratio(rows_hard, plain) > _row_seam_ratio(tiled, plain) + 0.1


def test_tiled_encode_is_close_to_untiled():
    images = torch.rand(2, 192, 320, 3, generator=torch.Generator().manual_seed(2))
    plain = encode_frames(sd_vae(), images)
    tiled = encode_frames(sd_vae(), images, tiles=TileOptions(128, 32))
    assert tiled.shape == plain.shape
    # random weights, global GroupNorm statistics: close, not equal (a misplaced tile differs by ~100%)
    assert float((tiled - plain).abs().mean()) < 0.2 * float(plain.abs().mean())


@pytest.fixture(scope="module")
def temporal_vae():
    sd = {k[len(SVD_VAE_PREFIX):]: v for k, v in svd_state_dict().items() if k.startswith(SVD_VAE_PREFIX)}
    cfg = infer_temporal_vae_config(sd)
    return checkpoint.build_on_meta(lambda: TemporalAutoencoder(cfg), sd, torch.float32, "VAE", "demo svd")


def test_tiled_temporal_decode_keeps_the_chunk_a_video(temporal_vae):
    latent = torch.randn(4, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    plain = decode_frames(temporal_vae, latent, chunk=4)
    tiled = decode_frames(temporal_vae, latent, chunk=4, tiles=TileOptions(12, 4))
    assert float((tiled - plain).abs().mean()) < 0.06 and _seam_ratio(tiled, plain) < 1.2
    # the tiles still hold all 4 frames of the chunk: 2-frame chunks give another video
    assert float((decode_frames(temporal_vae, latent, chunk=2) - plain).abs().mean()) > 0


@pytest.mark.parametrize("tiles,match", [(TileOptions(16, 8), "less than half"), (TileOptions(-8, 0), "0 or more")])
def test_bad_tiling_is_refused(tiles, match):
    with pytest.raises(KinemaError, match=match):
        decode_frames(sd_vae(), torch.zeros(1, 4, 32, 32), tiles=tiles)


def test_encode_tiles_must_be_whole_latent_pixels():
    with pytest.raises(KinemaError, match="multiples of 8"):
        encode_frames(sd_vae(), torch.rand(1, 64, 64, 3), tiles=TileOptions(60, 8))


# -- out of memory ---------------------------------------------------------------------------------------------

def test_decode_out_of_memory_retries_with_half_the_frames(caplog):
    latent = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    vae = OutOfMemoryAbove(sd_vae(), frames=2)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae, latent, chunk=4)
    assert torch.allclose(out, decode_frames(sd_vae(), latent), atol=1e-6)
    assert [c[0] for c in vae.calls] == [4, 2, 2, 2, 2]  # the smaller chunk holds for the rest
    assert "out of memory" in caplog.text and "retrying once" in caplog.text


def test_temporal_decode_out_of_memory_retries_with_tiles_not_fewer_frames(temporal_vae, caplog):
    latent = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    vae = OutOfMemoryAbove(temporal_vae, pixels=100)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae, latent, chunk=3)
    assert out.shape == (3, 128, 128, 3)
    assert all(c[0] == 3 for c in vae.calls) and vae.calls[0][-2:] == (16, 16) and vae.calls[1][-2:] == (8, 8)
    assert "tiles of 64 overlapping 8 pixels" in caplog.text  # in image pixels, as the node takes them


def test_out_of_memory_with_a_tile_covering_the_frame_retries_in_real_tiles(temporal_vae, caplog):
    """A tile at least the frame's size is no tiling: the retry starts tiling (half the side), not at half that tile
    (which would still cover the frame and fail the same way)."""
    latent = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    vae = OutOfMemoryAbove(temporal_vae, pixels=100)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        decode_frames(vae, latent, chunk=3, tiles=TileOptions(64, 8))
    assert vae.calls[0][-2:] == (16, 16) and vae.calls[1][-2:] == (8, 8) \
        and "tiles of 64 overlapping 8 pixels" in caplog.text


def test_a_second_out_of_memory_names_the_settings_to_change():
    vae = OutOfMemoryAbove(sd_vae(), frames=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"also with 2 frame\(s\) a chunk: lower frame_chunk on VAE "
                                                     r"Decode Frames \(Kinema\), or free GPU memory") as err:
        decode_frames(vae, torch.zeros(4, 4, 8, 8), chunk=4)  # 64x64 pixels: no tile smaller than the frame
    assert len(vae.calls) == 2  # the first try and one retry, no more
    # the pack's error, and an out-of-memory error to a host (ComfyUI unloads its models then), never retried again
    assert isinstance(err.value, KinemaError) and isinstance(err.value, torch.OutOfMemoryError)
    assert not memory.is_out_of_memory(err.value)


@pytest.mark.parametrize("height,width", [(136, 136), (64, 200), (152, 152)])
def test_encode_out_of_memory_retries_in_tiles_of_whole_latent_pixels(height, width, caplog):
    """A frame that runs out of memory whole is encoded again in tiles (half its larger side, made a multiple of
    8), which cover it: no NaN where a tile stopped short, no mismatch of latent sizes."""
    images = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(7))
    vae = OutOfMemoryAbove(sd_vae(), pixels=height * width - 1)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = encode_frames(vae, images, chunk=1)
    assert out.shape == (1, 4, height // 8, width // 8) and bool(torch.isfinite(out).all())
    assert len(vae.calls) > 2 and all(h % 8 == 0 and w % 8 == 0 for *_, h, w in vae.calls)
    assert "tiles of" in caplog.text


def test_an_encode_too_small_to_tile_names_the_setting_instead():
    """Encode tiles are at least 64 pixels: a 64x64 frame that runs out of memory whole is not retried in tiles the
    encoder would see too little of, but named; a 96x96 one (half its side, 48, is below 64) is retried in tiles of
    64, the smallest the nodes take, and then named with nothing on the node left to lower."""
    vae = OutOfMemoryAbove(sd_vae(), pixels=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"nothing smaller to retry with: free GPU memory \(other"):
        encode_frames(vae, torch.rand(1, 64, 64, 3), chunk=1)
    assert len(vae.calls) == 1
    vae = OutOfMemoryAbove(sd_vae(), pixels=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"also with 1 frame\(s\) a chunk, tiles of 64 overlapping 8 "
                                                     r"pixels: free GPU memory \(other"):
        encode_frames(vae, torch.rand(1, 96, 96, 3), chunk=1)
    assert vae.calls == [(1, 3, 96, 96), (1, 3, 64, 64)]


def test_a_tile_whose_half_is_below_the_smallest_retries_at_the_smallest(temporal_vae, caplog):
    """A 120-pixel decode tile that runs out of memory is retried in 64-pixel tiles (half of it, 60, is below the
    smallest), which fit, instead of giving up; what the error names depends on what is left to change."""
    latent = torch.randn(3, 4, 24, 24, generator=torch.Generator().manual_seed(6))
    vae = OutOfMemoryAbove(temporal_vae, pixels=100)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        out = decode_frames(vae, latent, chunk=3, tiles=TileOptions(15, 4))
    assert out.shape == (3, 192, 192, 3) and bool(torch.isfinite(out).all())
    assert vae.calls[0][-2:] == (15, 15) and {c[-2:] for c in vae.calls[1:]} == {(8, 8)}
    assert "tiles of 120 overlapping 32 pixels; retrying once with 3 frame(s) a chunk, tiles of 64 overlapping 16 " \
        "pixels" in caplog.text
    never = OutOfMemoryAbove(temporal_vae, pixels=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"tiles of 64 overlapping 16 pixels: lower frame_chunk \(fewer "
                                                     r"frames decoded together change the video a little\) on VAE "
                                                     r"Decode Frames \(Kinema\), or free GPU memory"):
        decode_frames(never, latent, chunk=3, tiles=TileOptions(15, 4))
    with pytest.raises(KinemaOutOfMemoryError, match=r"nothing smaller to retry with: lower frame_chunk \(fewer "
                                                     r"frames"):
        decode_frames(OutOfMemoryAbove(temporal_vae, pixels=0), latent, chunk=3, tiles=TileOptions(8, 2))
    big = OutOfMemoryAbove(sd_vae(), frames=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"also with 1 frame\(s\) a chunk, tiles of 192 overlapping 8 "
                                                     r"pixels: lower tile_size below 192 \(64 at least\) on VAE "
                                                     r"Decode"):
        decode_frames(big, torch.zeros(1, 4, 48, 48), chunk=1)
    unset = OutOfMemoryAbove(sd_vae(), frames=0)
    with pytest.raises(KinemaOutOfMemoryError, match=r"also with 2 frame\(s\) a chunk: lower frame_chunk, or set "
                                                     r"tile_size \(512 to start\) on VAE Decode Frames"):
        decode_frames(unset, torch.zeros(4, 4, 16, 16), chunk=4)
    with pytest.raises(KinemaOutOfMemoryError, match=r"also with 1 frame\(s\) a chunk: set tile_size \(512 to "
                                                     r"start\) on VAE Decode Frames"):
        decode_frames(OutOfMemoryAbove(sd_vae(), frames=0), torch.zeros(2, 4, 16, 16), chunk=2)


def test_a_short_chunk_retries_with_fewer_frames_than_it_has():
    """The retry halves the frames the failing chunk holds, not the setting: 2 frames left at a chunk of 8 are
    retried 1 at a time; a single frame goes to tiles, never the same call again."""
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    vae = OutOfMemoryAbove(sd_vae(), frames=1)
    decode_frames(vae, latent, chunk=8)
    assert [c[0] for c in vae.calls] == [2, 1, 1]
    one = OutOfMemoryAbove(sd_vae(), pixels=16 * 16 - 1)
    decode_frames(one, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9)), chunk=4)
    assert one.calls[0] == (1, 4, 16, 16) and one.calls[1] == (1, 4, 8, 8)


def test_tiles_are_whole_latent_pixels_or_refused():
    assert TileOptions(200, 48).smaller(64, 8) == TileOptions(96, 24)
    assert TileOptions(136, 40).smaller(64, 8) == TileOptions(64, 16)
    # half a tile below the smallest: the smallest; none smaller than that, nor a smallest tile covering the side
    assert TileOptions(120, 8).smaller(64, 8) == TileOptions(64, 8) and TileOptions(64, 8).smaller(64, 8) is None
    assert TileOptions(15, 4).smaller(8) == TileOptions(8, 2) and TileOptions(8, 2).smaller(8) is None
    assert TileOptions.first(136, 64, 8) == TileOptions(64, 8) and TileOptions.first(100, 64, 8) == TileOptions(64, 8)
    assert TileOptions.first(64, 64, 8) is None and TileOptions.first(12, 8) == TileOptions(8, 1)
    assert TileOptions.first(40, 8) == TileOptions(20, 1)  # a decoder's latent pixels: any size
    with pytest.raises(KinemaError, match="multiples of 8"):
        run_tiled(lambda t: t[..., ::8, ::8], torch.zeros(1, 3, 64, 64), TileOptions(36, 8), 1 / 8)


def test_other_errors_are_not_retried():
    class Broken(OutOfMemoryAbove):
        def decode(self, z):
            self.calls.append(tuple(z.shape))
            raise ValueError("boom")

    vae = Broken(sd_vae())
    with pytest.raises(ValueError, match="boom"):
        decode_frames(vae, torch.zeros(2, 4, 8, 8))
    assert len(vae.calls) == 1


def test_the_codecs_refuse_what_is_not_a_vae_and_chunks_below_one():
    from fixtures import motion_model

    with pytest.raises(KinemaError, match="decoding needs a VAE with a decoder"):
        decode_frames(motion_model("v2"), torch.zeros(2, 4, 8, 8))
    with pytest.raises(KinemaError, match="encoding needs a VAE"):
        encode_frames(None, torch.rand(1, 64, 64, 3))
    with pytest.raises(KinemaError, match="frame_chunk must be a whole number of frames, 1 or more"):
        decode_frames(sd_vae(), torch.zeros(2, 4, 8, 8), chunk=-1)
    with pytest.raises(KinemaError, match="frame_chunk must be"):
        encode_frames(sd_vae(), torch.rand(1, 64, 64, 3), chunk=2.5)
    with pytest.raises(KinemaError, match="frame_chunk must be a whole number of frames, 1 or more"):
        encode_frames(sd_vae(), torch.rand(1, 64, 64, 3), chunk=0)
    for chunk in (float("nan"), float("inf"), "4"):  # not a ValueError / OverflowError from int()
        with pytest.raises(KinemaError, match="frame_chunk must be a whole number of frames, 1 or more"):
            decode_frames(sd_vae(), torch.zeros(2, 4, 8, 8), chunk=chunk)
    assert decode_frames(sd_vae(), torch.zeros(2, 4, 8, 8), chunk=np.int64(1)).shape == (2, 64, 64, 3)


def test_the_codecs_refuse_bad_latents_and_frames():
    with pytest.raises(KinemaError, match="the latent has 8 channels but this VAE decodes 4"):
        decode_frames(sd_vae(), torch.zeros(2, 8, 8, 8))
    bad = torch.zeros(2, 4, 8, 8)
    bad[1, 0, 3, 3] = float("inf")
    with pytest.raises(KinemaError, match="the latent holds NaN or infinite values"):
        decode_frames(sd_vae(), bad)
    for h, w in ((64, 60), (60, 64), (4, 64)):
        with pytest.raises(KinemaError, match=f"the frames are {w}x{h}; the VAE needs both sides a multiple of 8"):
            encode_frames(sd_vae(), torch.rand(1, h, w, 3))


def test_an_alpha_channel_is_dropped_before_encoding():
    rgb = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    rgba = torch.cat([rgb, torch.rand(2, 32, 32, 1)], dim=-1)
    assert torch.equal(encode_frames(sd_vae(), rgba), encode_frames(sd_vae(), rgb))


def test_vae_nodes_take_tile_sizes_in_pixels():
    from conftest import load_pack

    nodes = load_pack().nodes.vae
    latent = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    (plain,) = nodes.KinemaVAEDecodeFrames().decode(sd_vae(), {"samples": latent})
    (tiled,) = nodes.KinemaVAEDecodeFrames().decode(sd_vae(), {"samples": latent}, 0, 96, 32)
    assert torch.equal(plain, decode_frames(sd_vae(), latent))
    assert torch.equal(tiled, decode_frames(sd_vae(), latent, tiles=TileOptions(12, 4)))
    (enc,) = nodes.KinemaVAEEncodeFrames().encode(sd_vae(), plain, 8, 96, 32)
    assert torch.equal(enc["samples"], encode_frames(sd_vae(), plain, tiles=TileOptions(96, 32)))
    # an overlap that changes where the tiles start (tiles of 64 pixels: 5 a row at overlap 24, 4 at 8)
    assert len(tile_starts(24, 8, 3)) == 5 and len(tile_starts(24, 8, 1)) == 4
    (tiled,) = nodes.KinemaVAEDecodeFrames().decode(sd_vae(), {"samples": latent}, 0, 64, 24)
    assert torch.equal(tiled, decode_frames(sd_vae(), latent, tiles=TileOptions(8, 3)))
    (enc,) = nodes.KinemaVAEEncodeFrames().encode(sd_vae(), plain, 8, 64, 24)
    assert torch.equal(enc["samples"], encode_frames(sd_vae(), plain, tiles=TileOptions(64, 24)))


def test_three_tiles_overlapping_at_one_pixel_are_normalised_by_their_summed_weights():
    """Where three tiles overlap (113 wide in tiles of 64 overlapping 16: starts 0, 24 and 49, the first and the last
    share pixels 49..63), the ramps no longer add up to 1: the blend divides by the summed weights, so an identity
    function comes back exact."""
    assert tile_starts(113, 64, 16) == [0, 24, 49]
    x = torch.randn(2, 3, 113, 113, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(run_tiled(lambda t: t, x, TileOptions(64, 16), 1), x, atol=1e-6)


def test_encode_overlaps_must_be_whole_latent_pixels():
    """An encoder's tiles start on whole latent pixels: an overlap that is not a multiple of 8 is refused (as an
    unaligned tile size is), naming the multiple, by VAE encode and by the tiling itself."""
    with pytest.raises(KinemaError, match="tile size and overlap must be multiples of 8 pixels, got 32 and 4"):
        encode_frames(sd_vae(), torch.rand(1, 64, 64, 3), tiles=TileOptions(32, 4))
    with pytest.raises(KinemaError, match="tiles of 32 overlapping 4 on 64x64 pixels: all must be multiples of 8"):
        run_tiled(lambda t: t[..., ::8, ::8], torch.zeros(1, 3, 64, 64), TileOptions(32, 4), 1 / 8)


def test_the_codecs_refuse_another_kind_of_vae_that_has_decode_and_encode():
    """ComfyUI's own VAE object has ``decode`` and ``encode`` methods but no Kinema config: it is named, not met as
    an AttributeError on ``cfg``."""

    class VAE:
        def decode(self, samples):
            return samples

        def encode(self, pixels):
            return pixels

    with pytest.raises(KinemaError, match=r"^decoding needs a VAE with a decoder .*, not a VAE$"):
        decode_frames(VAE(), torch.zeros(2, 4, 8, 8))
    with pytest.raises(KinemaError, match=r"^encoding needs a VAE .*, not a VAE$"):
        encode_frames(VAE(), torch.rand(1, 64, 64, 3))


def test_frames_not_a_multiple_of_8_are_refused_with_a_size_to_resize_to():
    """The refusal names the size width first and one the VAE takes (each side rounded down to a multiple of 8, at
    least 8); frames without rows are refused the same way, not met as a convolution error."""
    for h, w, to in ((60, 4, "8x56"), (4, 60, "56x8"), (0, 64, "64x8")):
        with pytest.raises(KinemaError, match=rf"^the frames are {w}x{h}; the VAE needs both sides a multiple of 8\. "
                                              rf"Resize or crop them first \(Load Video \(Kinema\) does; e\.g\. to "
                                              rf"{to}\)$"):
            encode_frames(sd_vae(), torch.rand(1, h, w, 3))


def test_a_smaller_tiling_never_goes_below_the_smallest_tile():
    """Halving a tile stops at ``minimum`` rounded up to a whole ``unit``: tiles of 32 with a smallest of 20 in units
    of 8 become 24 (not 16, under the smallest), the overlap at most a quarter of it; a tile at that least is final."""
    assert TileOptions(32, 8).smaller(20, 8) == TileOptions(24, 0)
    assert TileOptions(64, 16).smaller(20, 8) == TileOptions(32, 8)
    assert TileOptions(24, 0).smaller(20, 8) is None
    assert TileOptions.first(40, 20, 8) == TileOptions(24, 8)
