"""Context windows, fuse weights and FreeNoise: exhaustive over small sizes, pure ints and small tensors."""
import pytest
import torch

from kinema.models.context import (
    FUSE_METHODS,
    SCHEDULES,
    ContextOptions,
    ContextWindow,
    WindowAccumulator,
    context_windows,
    freenoise,
    freenoise_sources,
    fuse,
    fuse_weights,
    ordered_halving,
)
from kinema.models.errors import KinemaError

MAX_FRAMES = 80
MAX_LENGTH = 20
STEPS = range(8)


def idxs(num_frames, opts, step=0):
    return [w.sub_idxs for w in context_windows(num_frames, opts, step, len(STEPS))]


def spacing(window, num_frames):
    """The constant gap (modulo the video length) between consecutive frames of a window, or None."""
    if len(window) == 1:
        return 1
    k = (window[1] - window[0]) % num_frames
    ring = tuple(range(num_frames)) * 2 if k * len(window) <= num_frames else ()
    return k if window == ring[window[0]:window[0] + k * len(window):k] else None


def check_common(windows, num_frames, opts, what):
    """Every frame covered, every window min(L, f) distinct in-range frames."""
    want = min(opts.context_length, num_frames)
    covered = set()
    for w in windows:
        distinct = set(w)
        assert len(w) == want and len(distinct) == want, f"{what}: window {w} should hold {want} distinct frames"
        assert min(w) >= 0 and max(w) < num_frames, f"{what}: window {w} leaves 0..{num_frames - 1}"
        covered |= distinct
    assert len(covered) == num_frames, f"{what}: frames {sorted(set(range(num_frames)) - covered)} uncovered"


# --------------------------------------------------------------------------------------------------------------
# schedules


def test_ordered_halving_is_the_bit_reversed_step():
    assert [ordered_halving(s) for s in range(8)] == [0.0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875]
    assert ordered_halving(1 << 63) == 2.0 ** -64
    assert all(0.0 <= ordered_halving(s) < 1.0 for s in range(1000))


def test_short_videos_are_one_window_whatever_the_schedule():
    for length in range(1, MAX_LENGTH + 1):
        for frames in range(1, length + 1):
            for schedule in SCHEDULES:
                opts = ContextOptions(context_length=length, overlap=length - 1, stride=3, schedule=schedule)
                for step in STEPS:
                    windows = context_windows(frames, opts, step, 8)
                    assert [w.sub_idxs for w in windows] == [tuple(range(frames))], (frames, length, schedule, step)
                    assert windows[0] == ContextWindow(full_length=frames, context_length=length,
                                                       sub_idxs=tuple(range(frames)))


def test_static_windows_are_contiguous_fixed_and_end_on_the_last_frame():
    for length in range(1, MAX_LENGTH + 1):
        for overlap in range(length):
            opts = ContextOptions(context_length=length, overlap=overlap, schedule="static")
            for frames in range(1, MAX_FRAMES + 1):
                what = f"static f={frames} L={length} o={overlap}"
                windows = context_windows(frames, opts, 0, 8)
                w = [x.sub_idxs for x in windows]
                assert all(x.full_length == frames and x.context_length == length for x in windows), what
                check_common(w, frames, opts, what)
                for x in w:
                    assert x == tuple(range(x[0], x[0] + len(x))), f"{what}: {x} is not contiguous"
                assert w[0][0] == 0 and w[-1][-1] == frames - 1, f"{what}: {w} must start at 0 and end at f-1"
                starts = [x[0] for x in w]
                assert starts == sorted(set(starts)), f"{what}: starts {starts} not increasing"
                # every window but the last advances by L - o; the last is pulled back to end on the last frame
                assert starts[:-1] == list(range(0, (length - overlap) * (len(starts) - 1), length - overlap)), what
                for a, b in zip(w, w[1:]):
                    assert len(set(a) & set(b)) >= overlap, f"{what}: {a} and {b} share fewer than {overlap}"
                if frames > length and (frames - length) % (length - overlap) == 0:
                    assert len(w) == (frames - length) // (length - overlap) + 1, what
                if frames % 3 == 0:  # the step and the stride change nothing
                    moved = ContextOptions(context_length=length, overlap=overlap, stride=3, schedule="static")
                    for step in (1, 5, 7):
                        assert idxs(frames, moved, step) == w, f"{what}: step {step} changed the windows"


def uniform_checks(frames, length, overlap, stride, step):
    """All invariants of both uniform schedules for one configuration; returns the looped windows."""
    looped_opts = ContextOptions(length, overlap, stride, "uniform_looped")
    standard_opts = ContextOptions(length, overlap, stride, "uniform_standard")
    looped, standard = idxs(frames, looped_opts, step), idxs(frames, standard_opts, step)
    what = f"f={frames} L={length} o={overlap} stride={stride} step={step}"
    check_common(looped, frames, looped_opts, "looped " + what)
    check_common(standard, frames, standard_opts, "standard " + what)
    if frames <= length:
        return looped
    levels = [k for k in (1, 2, 4, 8)[:stride] if length * k <= frames]
    looped_cover, standard_cover = {}, {}
    for w in looped:
        k = spacing(w, frames)
        assert k in levels, f"looped {what}: {w} has spacing {k}, allowed {levels}"
        looped_cover.setdefault(k, set()).update(w)
    for w in standard:
        k = w[1] - w[0] if length > 1 else 1
        assert w == tuple(range(w[0], w[0] + k * length, k)), f"standard {what}: {w} wraps or is uneven"
        assert k in levels, f"standard {what}: {w} has spacing {k}, allowed {levels}"
        standard_cover.setdefault(k, set()).update(w)
    assert len(set(standard)) == len(standard), f"standard {what}: duplicate windows {standard}"
    if length > 1:
        assert sorted(looped_cover) == levels, f"looped {what}: levels {sorted(looped_cover)} != {levels}"
        assert sorted(standard_cover) == levels, f"standard {what}: levels {sorted(standard_cover)} != {levels}"
        assert looped_cover[1] == set(range(frames)), f"looped {what}: level 1 alone must cover the video"
        assert standard_cover[1] == set(range(frames)), f"standard {what}: level 1 alone must cover the video"
    return looped


def test_uniform_windows_cover_every_frame_at_every_step():
    for length in range(1, MAX_LENGTH + 1):
        for overlap in sorted({0, length // 2, length - 1}):
            # every step offset with overlap 0; fewer for more overlap (more windows, costlier to check)
            steps = STEPS if overlap == 0 else (0, 1, 3, 6) if overlap < length - 1 else (0, 5)
            for frames in range(length + 1, MAX_FRAMES + 1):  # shorter videos: one window (tested above)
                # stride levels above those that fit give the same windows: test each distinct stride once
                strides = [s for s in (1, 2, 3) if s == 1 or length * (1 << (s - 1)) <= frames]
                for stride in strides:
                    for step in steps:
                        uniform_checks(frames, length, overlap, stride, step)


def test_uniform_windows_every_overlap_for_small_sizes():
    for length in range(1, 9):
        for overlap in range(length):
            for frames in range(1, 33):
                for stride in (1, 2, 3):
                    for step in (0, 1, 2, 3, 6):
                        uniform_checks(frames, length, overlap, stride, step)


def test_stride_levels_that_do_not_fit_are_left_out():
    for schedule in ("uniform_looped", "uniform_standard"):
        for frames in range(17, 64):
            for step in (0, 3):
                one = idxs(frames, ContextOptions(16, 4, 1, schedule), step)
                many = idxs(frames, ContextOptions(16, 4, 8, schedule), step)
                fitting = max(s for s in range(1, 9) if 16 * (1 << (s - 1)) <= frames)
                assert many == idxs(frames, ContextOptions(16, 4, fitting, schedule), step), (schedule, frames)
                if frames < 32:
                    assert many == one, (schedule, frames, step)


def test_looped_windows_wrap_around_the_end():
    for frames in range(2, MAX_FRAMES + 1):
        for length in range(1, min(frames, MAX_LENGTH + 1)):
            for overlap in {0, length // 2}:
                for step in STEPS:
                    for w in idxs(frames, ContextOptions(length, overlap, 1, "uniform_looped"), step):
                        assert all((b - a) % frames == 1 for a, b in zip(w, w[1:])), (frames, length, step, w)
    wrapping = [w for s in STEPS for w in idxs(20, ContextOptions(8, 2, 1, "uniform_looped"), s) if w[0] > w[-1]]
    assert wrapping, "some looped windows must share frames between the end and the start"


def test_uniform_windows_match_the_community_schedule():
    """Hand-worked: f=20, L=8, o=2, two stride levels (offsets round(20*h) + floor(k*h))."""
    looped = ContextOptions(8, 2, 2, "uniform_looped")
    assert idxs(20, looped, 0) == [
        tuple(range(0, 8)), tuple(range(6, 14)), tuple(range(12, 20)), (18, 19, 0, 1, 2, 3, 4, 5),
        tuple(range(0, 16, 2)), (14, 16, 18, 0, 2, 4, 6, 8),
    ]
    assert idxs(20, looped, 1) == [  # h = 1/2: level 1 starts at 10, level 2 at 11
        tuple(range(10, 18)), (16, 17, 18, 19, 0, 1, 2, 3), tuple(range(2, 10)), tuple(range(8, 16)),
        (11, 13, 15, 17, 19, 1, 3, 5), tuple(range(5, 20, 2)),
    ]
    standard = ContextOptions(8, 2, 2, "uniform_standard")
    assert idxs(20, standard, 0) == [
        tuple(range(0, 8)), tuple(range(6, 14)), tuple(range(12, 20)), tuple(range(0, 16, 2)), tuple(range(4, 20, 2)),
    ]
    assert idxs(20, standard, 1) == [
        tuple(range(10, 18)), tuple(range(12, 20)), tuple(range(0, 8)), tuple(range(2, 10)),
        tuple(range(5, 20, 2)), tuple(range(1, 16, 2)),
    ]


def test_a_strided_window_reaching_the_last_frame_is_kept_where_it_starts():
    """f=5, L=2, o=1, stride 2 at step 6 (h = 3/8): the level-2 window starting on frame 2 ends exactly on the
    last frame (2 + (L - 1) * 2 = 4) and is taken as it is, not pulled back and wrapped."""
    assert idxs(5, ContextOptions(2, 1, stride=2), 6) == [(2, 3), (3, 4), (0, 1), (2, 4), (0, 2)]


def test_uniform_seams_move_from_step_to_step():
    for frames in (20, 33, 50, 77):
        per_step = [frozenset(idxs(frames, ContextOptions(16, 4, 1, "uniform_looped"), s)) for s in range(4)]
        assert len(set(per_step)) == 4, (frames, per_step)
        # the standard schedule may repeat a step's windows (pulled-back windows coincide), never all of them
        per_step = [frozenset(idxs(frames, ContextOptions(16, 4, 1, "uniform_standard"), s)) for s in STEPS]
        assert len(set(per_step)) > 1, (frames, per_step)
    for frames in range(17, MAX_FRAMES + 1):  # looped: the first window starts at round(f * h(step))
        for step in STEPS:
            first = idxs(frames, ContextOptions(16, 4, 1, "uniform_looped"), step)[0]
            assert first[0] == round(frames * ordered_halving(step)) % frames, (frames, step, first)


# --------------------------------------------------------------------------------------------------------------
# fuse weights and fusing


def test_fuse_weights_shapes_values_symmetry():
    assert fuse_weights(1, "pyramid").tolist() == [1.0]
    assert fuse_weights(4, "pyramid").tolist() == [1.0, 2.0, 2.0, 1.0]
    assert fuse_weights(5, "pyramid").tolist() == [1.0, 2.0, 3.0, 2.0, 1.0]
    assert fuse_weights(6, "flat").tolist() == [1.0] * 6
    for method in FUSE_METHODS:
        for n in range(1, 65):
            w = fuse_weights(n, method)
            assert w.shape == (n,) and w.dtype == torch.float32, (method, n)
            assert (w > 0).all(), f"{method} n={n}: {w.tolist()}"
            assert torch.equal(w, w.flip(0)), f"{method} n={n} not symmetric: {w.tolist()}"
            half = w[: (n + 1) // 2]
            assert (half[1:] >= half[:-1]).all(), f"{method} n={n} must rise towards the centre"
    g = fuse_weights(16, "gauss")
    assert 0.1 < float(g[0] / g.max()) < 0.3 and float(g[0]) > 0
    with pytest.raises(KinemaError, match="pyramid, flat, gauss"):
        fuse_weights(4, "triangle")


def all_window_sets():
    yield 1, ContextOptions(16, 4, 1, "static"), 0
    for schedule in SCHEDULES:
        for frames, length, overlap, stride in ((20, 8, 2, 2), (37, 16, 4, 3), (64, 16, 12, 2), (9, 1, 0, 3),
                                                (17, 16, 15, 1)):
            for step in (0, 1, 6):
                yield frames, ContextOptions(length, overlap, stride, schedule), step


def test_fusing_a_constant_gives_exactly_that_constant():
    for frames, opts, step in all_window_sets():
        for method in FUSE_METHODS:
            windows = context_windows(frames, opts, step, 8)
            parts = ((w, torch.ones(len(w.sub_idxs), 4, 3, 2)) for w in windows)
            out = fuse(parts, frames, method)
            assert out.shape == (frames, 4, 3, 2) and torch.equal(out, torch.ones_like(out)), (frames, opts, method)


def test_fusing_is_the_per_frame_weighted_mean():
    g = torch.Generator().manual_seed(0)
    for frames, opts, step in all_window_sets():
        truth = torch.randn(frames, 3, 2, 2, generator=g, dtype=torch.float64)
        windows = context_windows(frames, opts, step, 8)
        for method in FUSE_METHODS:
            # windows holding the true values give the true values back
            out = fuse(((w, truth[list(w.sub_idxs)]) for w in windows), frames, method)
            assert torch.allclose(out, truth, atol=1e-12), (frames, opts, method)
            # random predictions: compare with a dense reference (weights normalised per frame)
            preds = [torch.randn(len(w.sub_idxs), 3, 2, 2, generator=g) for w in windows]
            num = torch.zeros(frames, 3, 2, 2, dtype=torch.float64)
            den = torch.zeros(frames, dtype=torch.float64)
            for w, p in zip(windows, preds):
                wt = fuse_weights(len(w.sub_idxs), method).double()
                for j, i in enumerate(w.sub_idxs):
                    num[i] += wt[j] * p[j].double()
                    den[i] += wt[j]
            out = fuse(zip(windows, preds), frames, method)
            assert out.dtype == torch.float32
            assert torch.allclose(out.double(), num / den[:, None, None, None], atol=1e-5), (frames, opts, method)
            # a frame held by one window only is that window's prediction
            count = [0] * frames
            for w in windows:
                for i in w.sub_idxs:
                    count[i] += 1
            for w, p in zip(windows, preds):
                for j, i in enumerate(w.sub_idxs):
                    if count[i] == 1:
                        assert torch.allclose(out[i], p[j], atol=1e-6), (frames, opts, method, i)


def test_fuse_keeps_dtype_and_reports_bad_parts():
    opts = ContextOptions(8, 2, 1, "static")
    windows = context_windows(20, opts)
    out = fuse(((w, torch.full((8, 2), 0.5, dtype=torch.float16)) for w in windows), 20, "pyramid")
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((20, 2), 0.5, dtype=torch.float16))
    with pytest.raises(KinemaError, match="7 frames"):
        fuse([(windows[0], torch.zeros(7, 2))], 20, "flat")
    with pytest.raises(KinemaError, match="no context window"):
        fuse([(windows[0], torch.zeros(8, 2))], 20, "flat")
    with pytest.raises(KinemaError, match="no window"):
        fuse([], 20, "flat")
    with pytest.raises(KinemaError, match="outside"):
        fuse([(ContextWindow(10, 8, tuple(range(4, 12))), torch.zeros(8, 2))], 10, "flat")
    with pytest.raises(KinemaError, match="differ in shape"):
        fuse([(windows[0], torch.zeros(8, 2)), (windows[1], torch.zeros(8, 3))], 20, "flat")


def test_accumulator_holds_one_full_length_buffer():
    acc = WindowAccumulator(20, "pyramid")
    for w in context_windows(20, ContextOptions(8, 2, 1, "static")):
        acc.add(w, torch.ones(8, 4, 2, 2))
        assert acc.total.shape == (20, 4, 2, 2) and acc.weight_sum.shape == (20,)
    assert torch.equal(acc.result(), torch.ones(20, 4, 2, 2))


def test_accumulator_sums_half_precision_in_float32_and_returns_half():
    acc = WindowAccumulator(4, "flat")
    acc.add(ContextWindow(4, 4, (0, 1, 2, 3)), torch.full((4, 2), 0.1, dtype=torch.float16))
    assert acc.total.dtype == torch.float32 and acc.weight_sum.dtype == torch.float32
    assert acc.result().dtype == torch.float16


def test_accumulator_refuses_a_window_one_past_the_last_frame():
    acc = WindowAccumulator(4, "flat")
    with pytest.raises(KinemaError, match="outside a video of 4 frames"):
        acc.add(ContextWindow(5, 2, (3, 4)), torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------------------
# FreeNoise


def test_freenoise_repeats_the_first_window_shuffled_per_block():
    for length in range(1, 13):
        for overlap in range(length):
            opts = ContextOptions(length, overlap, 1, "static", freenoise=True)
            block = length - overlap
            for frames in range(1, 50):
                src = freenoise_sources(frames, opts, seed=frames * 31 + length)
                what = f"f={frames} L={length} o={overlap}: {src}"
                assert src[:length] == list(range(min(length, frames))), what
                assert all(0 <= s < length for s in src), what
                for start in range(length, frames, block):  # each block: a permutation of the frames L earlier
                    size = min(block, frames - start)
                    assert sorted(src[start:start + size]) == sorted(src[start - length:start - length + size]), what
                for w in context_windows(frames, opts):  # every static window holds each base noise once
                    assert sorted(src[i] for i in w.sub_idxs) == list(range(len(w.sub_idxs))), what


def test_freenoise_tensor_rule_determinism_and_shuffling():
    opts = ContextOptions(8, 2, 1, "uniform_standard", freenoise=True)
    noise = torch.randn(40, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    before = noise.clone()
    a = freenoise(noise, opts, seed=5)
    assert torch.equal(noise, before), "the input must not change"
    assert a.shape == noise.shape and a.dtype == noise.dtype and a.data_ptr() != noise.data_ptr()
    assert torch.equal(a, noise[freenoise_sources(40, opts, 5)])
    assert torch.equal(a[:8], noise[:8])
    for i in range(8, 40):  # every later frame repeats one of the first window's noises
        assert any(torch.equal(a[i], noise[j]) for j in range(8)), i
    assert torch.equal(a, freenoise(noise, opts, seed=5)), "same seed, same noise"
    assert not torch.equal(a, freenoise(noise, opts, seed=6)), "another seed shuffles differently"
    periodic = noise[[i % 8 for i in range(40)]]
    assert not torch.equal(a, periodic), "blocks must be shuffled, not plain copies"
    big = freenoise(noise, opts, seed=2**64 - 1)  # ComfyUI seeds reach 2**64 - 1
    assert big.shape == noise.shape


def test_freenoise_leaves_short_videos_and_disabled_options_alone():
    noise = torch.randn(16, 4, 2, 2)
    for frames, opts in ((16, ContextOptions(16, 4, freenoise=True)), (10, ContextOptions(16, 4, freenoise=True)),
                         (16, ContextOptions(8, 2, freenoise=False))):
        out = freenoise(noise[:frames], opts, seed=3)
        assert torch.equal(out, noise[:frames]) and out.data_ptr() != noise.data_ptr(), (frames, opts)


# --------------------------------------------------------------------------------------------------------------
# options


def test_bad_options_are_clear_errors():
    cases = [
        (ContextOptions(context_length=0), "context length is 0.*at least 1"),
        (ContextOptions(context_length=8, overlap=-1), "overlap is -1.*0 or more"),
        (ContextOptions(context_length=8, overlap=8), "overlap is 8 but the context length is 8.*7 or less"),
        (ContextOptions(context_length=8, overlap=12), "overlap is 12.*less than the context length"),
        (ContextOptions(stride=0), "stride is 0.*at least 1"),
        (ContextOptions(schedule="looped"), "'looped'.*uniform_standard, uniform_looped, static"),
        (ContextOptions(fuse="mean"), "'mean'.*pyramid, flat, gauss"),
        (ContextOptions(context_length=8.0), "^context length must be a whole number"),
        (ContextOptions(overlap=1.5), "^context overlap must be a whole number"),
    ]
    for opts, message in cases:
        with pytest.raises(KinemaError, match=message):
            opts.validate()
        with pytest.raises(KinemaError, match=message):
            context_windows(40, opts)
    with pytest.raises(KinemaError, match="at least 1 frame"):
        ContextOptions().validate(0)
    with pytest.raises(KinemaError, match="step"):
        context_windows(40, ContextOptions(), -1)
    ContextOptions().validate(1)
    ContextOptions(context_length=1, overlap=0).validate(500)
    assert ContextOptions() == ContextOptions(16, 4, 1, "uniform_standard", "pyramid", False)


def test_freenoise_shuffles_follow_randperm_seeded_with_the_seed():
    # the documented rule, written plainly: one torch.randperm per block, in block order, from a CPU generator
    # seeded with the seed itself (ComfyUI's seed reproduces the noise of another run or tool)
    length, overlap, frames, seed = 6, 2, 23, 1234
    gen = torch.Generator(device="cpu").manual_seed(seed)
    want = list(range(length))
    for start in (6, 10, 14, 18, 22):
        size = min(length - overlap, frames - start)
        perm = torch.randperm(size, generator=gen).tolist()
        want += [want[start - length + p] for p in perm]
    opts = ContextOptions(length, overlap, 1, "static", freenoise=True)
    assert freenoise_sources(frames, opts, seed) == want
    assert freenoise_sources(frames, opts, seed + 2**64) == want, "seeds wrap modulo 2**64"
