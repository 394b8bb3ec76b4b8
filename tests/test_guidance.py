"""Classifier-free guidance: batched and unbatched agree, and a batch that runs out of memory falls back."""
import logging

import pytest
import torch
from fixtures import motion_model
from kinema.models.errors import KinemaError
from kinema.models.guidance import CFGDenoiser, EpsVideoDenoiser, match_token_lengths
from kinema.models.sampling import DiscreteSchedule

F, HW = 4, 8


class OutOfMemoryAboveOneVideo:
    """A video model that raises the allocator's out-of-memory error on a batch of more than one video."""

    def __init__(self, model, error, above: int = 1):
        self.model, self.error, self.above, self.calls = model, error, above, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, ctx, num_frames, **kw):
        self.calls.append(x.shape[0] // num_frames)
        if x.shape[0] > self.above * num_frames:
            raise self.error
        return self.model(x, t, ctx, num_frames, **kw)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(F, 4, HW, HW, generator=g)
    cond, uncond = torch.randn(2, 77, 64, generator=g).chunk(2)
    return x, torch.tensor(3.0), cond.expand(F, -1, -1), uncond.expand(F, -1, -1)


def _cfg(model, batch_cond):
    x, sigma, cond, uncond = _inputs()
    den = EpsVideoDenoiser(model, DiscreteSchedule("linear"), batch_cond=batch_cond)
    with torch.no_grad():
        return CFGDenoiser(den, cond, uncond, 7.5)(x, sigma), den


def _close(a, b):  # fp32 batching noise (~1e-6 per eps), amplified by sigma and cfg
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


def test_batched_and_unbatched_cfg_agree():
    batched, _ = _cfg(motion_model("v2"), True)
    single, _ = _cfg(motion_model("v2"), False)
    assert _close(batched, single)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("MPS backend out of memory")])
def test_out_of_memory_in_a_batch_falls_back_to_one_context_at_a_time(error, caplog):
    model = OutOfMemoryAboveOneVideo(motion_model("v2"), error)
    with caplog.at_level(logging.WARNING, logger="kinema"):
        got, den = _cfg(model, True)
    want, _ = _cfg(motion_model("v2"), False)
    assert _close(got, want)
    assert model.calls == [2, 1, 1] and den.batch_cond is False
    assert "ran out of memory with 2 conditionings in one batch" in caplog.text  # the retry is said
    # the next step goes straight to one context at a time
    x, sigma, cond, uncond = _inputs()
    with torch.no_grad():
        den(x, sigma, [uncond, cond])
    assert model.calls[3:] == [1, 1]


@pytest.fixture
def chunks_save_memory(monkeypatch):
    """Attention as on a device whose SDPA holds the score matrix (e.g. MPS), where query chunks save memory: the
    CPU's flash kernel never holds it, so there the out-of-memory retry leaves chunks out."""
    from kinema.models import guidance

    monkeypatch.setattr(guidance, "fused_attention", lambda device: False)


@pytest.mark.parametrize("fused", [False, True], ids=["chunks save memory", "fused attention"])
def test_other_errors_and_single_video_out_of_memory_are_not_swallowed(fused, monkeypatch):
    from kinema.models import guidance

    model = OutOfMemoryAboveOneVideo(motion_model("v2"), ValueError("shape"))
    with pytest.raises(ValueError):
        _cfg(model, True)
    x, sigma, cond, _ = _inputs()
    oom = OutOfMemoryAboveOneVideo(motion_model("v2"), torch.OutOfMemoryError("out of memory"), above=0)
    den = EpsVideoDenoiser(oom, DiscreteSchedule("linear"))
    monkeypatch.setattr(guidance, "fused_attention", lambda device: fused)
    with pytest.raises(KinemaError, match="connect Context Options") as err:
        den(x, sigma, [cond])
    # where chunks save memory, one retry with chunked attention, then the settings; where not, the settings at once
    assert len(oom.calls) == (1 if fused else 2) and ("attention_chunk" in str(err.value)) is not fused


@pytest.mark.parametrize("offload,chunk,windowed,named,not_named", [
    (None, 0, False, ["connect Context Options", "attention_chunk on the Video Sampler below 1024",
                      "Memory Policy (Kinema) with block offload"], ["resident_blocks", "context_length"]),
    (("block", 2), 256, True, ["a shorter context_length", "below 128", "set resident_blocks to 1"],
     ["block offload", "connect Context Options"]),
    (("block", 1), 128, False, ["lower the frame count or the size"], ["attention_chunk", "resident_blocks",
                                                                       "block offload"]),
], ids=["defaults", "block of 2 in windows", "every setting at its least"])
def test_the_out_of_memory_error_names_only_the_settings_left_to_change(offload, chunk, windowed, named, not_named,
                                                                       chunks_save_memory):
    """A second out-of-memory error names what is left: not block offload where the model has it, not
    resident_blocks at 1, not an attention chunk that the retry took to its least (64)."""
    from kinema.models.errors import KinemaOutOfMemoryError
    from kinema.models.offload import OffloadOptions

    x, sigma, cond, _ = _inputs()
    oom = OutOfMemoryAboveOneVideo(motion_model("v2"), torch.OutOfMemoryError("out of memory"), above=0)
    if offload is not None:
        oom.offload = OffloadOptions(mode=offload[0], device="cpu", resident=offload[1])
    den = EpsVideoDenoiser(oom, DiscreteSchedule("linear"), attn_chunk=chunk)
    window = object() if windowed else None
    with pytest.raises(KinemaOutOfMemoryError) as err:
        den._predict_one(x, sigma, [cond], window, (False,), True, None)
    for text in named:
        assert text in str(err.value)
    for text in not_named:
        assert text not in str(err.value)


class OutOfMemoryUnchunked:
    """A video model that runs out of memory unless its attention is chunked."""

    def __init__(self, model):
        self.model, self.chunks = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, ctx, num_frames, attn_chunk=0, **kw):
        self.chunks.append(attn_chunk)
        if not attn_chunk:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return self.model(x, t, ctx, num_frames, attn_chunk=attn_chunk, **kw)


def test_out_of_memory_of_one_video_retries_with_chunked_attention(caplog, chunks_save_memory):
    import logging

    x, sigma, cond, _ = _inputs()
    model = OutOfMemoryUnchunked(motion_model("v2"))
    den = EpsVideoDenoiser(model, DiscreteSchedule("linear"))
    with caplog.at_level(logging.WARNING, logger="kinema"), torch.no_grad():
        got = den(x, sigma, [cond])[0]
        again = den(x, sigma, [cond])[0]
        want = EpsVideoDenoiser(motion_model("v2"), DiscreteSchedule("linear"))(x, sigma, [cond])[0]
    assert model.chunks == [0, 1024, 1024]  # the chunking holds for the rest of the run
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got, again)
    assert "retrying once with attention in chunks of 1024 queries" in caplog.text


def test_the_attention_chunk_retry_always_chunks_smaller():
    """After unchunked or a chunk above 1024 queries (which may cover every query: the same call again), 1024;
    then halves down to 64."""
    from kinema.models.guidance import AttentionChunk

    sizes = [AttentionChunk(q).smaller() for q in (0, 4096, 1 << 20, 1024, 200, 128, 127)]
    assert [s.queries if s else None for s in sizes] == [1024, 1024, 1024, 512, 100, 64, None]


class RecordingUncond:
    """A video model that records the ``uncond`` flags of each call (one per video of the batch)."""

    def __init__(self, model):
        self.model, self.flags = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, ctx, num_frames, **kw):
        self.flags.append(tuple(kw["uncond"]))
        return self.model(x, t, ctx, num_frames, **kw)


def test_one_conditioning_at_a_time_flags_only_the_uncond_call_as_unconditional():
    """With cond and uncond one after the other, each call says which side it is: an IP-Adapter then gives its
    zero image's tokens to the uncond call only, and the guided x0 is the batched one."""
    from fixtures_ip_adapter import ip_adapter
    from kinema.models.addons import ImageContent

    adapter = ip_adapter()
    with torch.no_grad():
        tokens = adapter.image_tokens(torch.randn(1, adapter.cfg.clip_dim, generator=torch.Generator().manual_seed(1)))
        content = ImageContent(adapter, tokens, adapter.uncond_tokens(1))
    model = motion_model("v2").with_options(contents=(content,))
    single, batched = RecordingUncond(model), RecordingUncond(model)
    got, _ = _cfg(single, False)
    want, _ = _cfg(batched, True)
    assert single.flags == [(True,), (False,)]  # uncond first, as CFGDenoiser passes them
    assert batched.flags == [(True, False)]
    assert _close(got, want)


def test_the_eps_denoiser_predicts_x0_as_x_less_sigma_times_eps():
    """An eps model sees ``x / sqrt(sigma^2 + 1)`` at the timestep of sigma; its x0 is ``x - sigma * eps``."""
    schedule = DiscreteSchedule("linear")
    x, sigma, cond, _ = _inputs()
    eps = torch.randn(F, 4, HW, HW, generator=torch.Generator().manual_seed(9))
    net, seen = motion_model("v2"), {}

    class KnownEps:
        unet = net.unet

        def __call__(self, xin, t, ctx, num_frames, **kw):
            seen.update(xin=xin, t=t)
            return eps

    x0 = EpsVideoDenoiser(KnownEps(), schedule)(x, sigma, [cond])[0]
    torch.testing.assert_close(x0, x - float(sigma) * eps)
    torch.testing.assert_close(seen["xin"], x / (float(sigma) ** 2 + 1) ** 0.5)
    torch.testing.assert_close(seen["t"], schedule.timestep(sigma.reshape(1)).expand(F))


def test_prompts_of_different_token_lengths_batch_by_repeating_their_tokens():
    """77 and 154 tokens (a long prompt in two chunks) batch as 154: the short one's tokens twice over; 77 and 231
    as 231; 154 and 231 as 462; lengths with no small common multiple (77 and 78) are not batched (None)."""
    a, b = torch.randn(2, 77, 4), torch.randn(2, 154, 4)
    got = match_token_lengths([a, b])
    assert got is not None and got[0].shape == (2, 154, 4) and torch.equal(got[1], b)
    assert torch.equal(got[0][:, :77], a) and torch.equal(got[0][:, 77:], a)
    c = torch.randn(2, 231, 4)
    got = match_token_lengths([c, a])
    assert got[1].shape == (2, 231, 4) and torch.equal(got[1], torch.cat([a, a, a], dim=1))
    two, three = torch.randn(2, 154, 4), torch.randn(2, 231, 4)  # prompts of 2 and 3 chunks: 462 tokens each
    got = match_token_lengths([two, three])
    assert got is not None and torch.equal(got[0], torch.cat([two] * 3, dim=1))
    assert torch.equal(got[1], torch.cat([three] * 2, dim=1))
    assert match_token_lengths([a, torch.randn(2, 78, 4)]) is None
