"""Prompt travel: schedule parsing, per-frame interpolation, the Prompt Schedule node and the sampler's use of it."""
import math
import types

import pytest
import torch

import fixtures
from kinema.models import encoders, pipelines
from kinema.models import prompt_travel as pt
from kinema.models.errors import KinemaError


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("text", [
    "0: a cat walking, photo\n16: a cat running\n32: a cat jumping, (motion blur:1.2)",
    "0: a cat walking, photo, 16: a cat running, 32: a cat jumping, (motion blur:1.2)",
    "  32: a cat jumping, (motion blur:1.2)\n\n0:a cat walking, photo,\n 16 : a cat running  ",
    '"0": "a cat walking, photo", "16": "a cat running", "32": "a cat jumping, (motion blur:1.2)"',
    '{\n  "0": "a cat walking, photo",\n  "16": "a cat running",\n  "32": "a cat jumping, (motion blur:1.2)",\n}',
])
def test_parse_schedule_forms(text):
    assert pt.parse_schedule(text) == [
        (0, "a cat walking, photo"), (16, "a cat running"), (32, "a cat jumping, (motion blur:1.2)")]


def test_parse_schedule_plain_prompts_and_details():
    assert pt.parse_schedule("a (red:1.2) fox, running: fast") == [(0, "a (red:1.2) fox, running: fast")]
    assert pt.parse_schedule("{red|blue} cat {big|small}") == [(0, "{red|blue} cat {big|small}")]
    assert pt.parse_schedule("8: only one") == [(8, "only one")]
    assert pt.parse_schedule('{"0": "say \\"hi\\", twice"}') == [(0, 'say "hi", twice')]
    assert pt.parse_schedule("0: a cat\r\n4: a dog\r\n") == [(0, "a cat"), (4, "a dog")]
    # lines that only look a little like keyframes stay prompt text
    assert pt.parse_schedule("0: a cat\nstyle: anime\n4k photo, 3 dogs\n8: b") == [
        (0, "a cat\nstyle: anime\n4k photo, 3 dogs"), (8, "b")]
    assert pt.parse_schedule('0: "hello" sign, a cat\n8: b') == [(0, '"hello" sign, a cat'), (8, "b")]


def test_the_fizznodes_form_reads_as_json():
    """FizzNodes reads its schedule as a JSON object: a quoted prompt is one prompt whatever it holds, also a comma
    followed by ``<int>:`` (which starts a keyframe in the plain form) and escaped quotes."""
    assert pt.parse_schedule('"0": "a clock, 12: 30 pm", "8": "a dog"') == [(0, "a clock, 12: 30 pm"), (8, "a dog")]
    assert pt.parse_schedule('"0": "a \\"big\\", 4: cat", "8": "dog"') == [(0, 'a "big", 4: cat'), (8, "dog")]
    assert pt.parse_schedule('{"8": "b",\n "0": "a, 4: c",\n}') == [(0, "a, 4: c"), (8, "b")]
    assert pt.parse_schedule('"0": "a",') == [(0, "a")]  # a trailing comma, as FizzNodes allows


@pytest.mark.parametrize("text,match", [
    ('"0": "a", "8": "b", "8": "c, 2: d"', r"frame 8 has two keyframes \('\"8\":'"),
    ('"0": "a", "-4": "b"', "keyframe '\"-4\":': frame numbers start at 0"),
    ('"0": "a", "1.5": "b"', "keyframe '\"1.5\":': frame numbers must be whole numbers"),
    ('"0": "a", "2000000": "b"', "frame numbers go up to 1000000"),
    ('"0": "a", "8": "  "', "keyframe '\"8\":' has no prompt"),
])
def test_the_fizznodes_form_checks_its_keyframes(text, match):
    with pytest.raises(KinemaError, match=match):
        pt.parse_schedule(text)


@pytest.mark.parametrize("text,match", [
    ("", "the prompt schedule is empty"),
    ("   \n ", "the prompt schedule is empty"),
    ("{}", "the prompt schedule is empty"),
    ("0: a cat\n16:\n32: a dog", "keyframe '16:' has no prompt"),
    ('"0": "a cat", "8": ""', "keyframe '\"8\":' has no prompt"),
    ("0: a cat, 8: a dog, -4: a bird", "keyframe '-4:': frame numbers start at 0"),
    ("0: a cat\n8: a dog\n8: a bird", r"frame 8 has two keyframes \('8:'"),
    ("0: a cat\n1.5: a dog", "keyframe '1.5:': frame numbers must be whole numbers, got '1.5'"),
    ("0: a cat\n8.: a dog", "keyframe '8.:': frame numbers must be whole numbers, got '8.'"),
    ("0: a cat\n-1: a dog", "keyframe '-1:': frame numbers start at 0, got -1"),
    ("0: a cat\n8; a dog", "line '8; a dog' starts like a keyframe but is not one"),
    ("0: a cat\n8a: a dog", "line '8a: a dog' starts like a keyframe"),
    ("0: a cat\n1e3: a dog", "line '1e3: a dog' starts like a keyframe"),
    ("0: a cat\nframe 8: a dog", "line 'frame 8: a dog' starts like a keyframe"),
    ('"0": "a cat" "16": "a dog"', "keyframe '\"0\":': a comma is missing before '\"16\":'"),
    ('"0": "a cat,\n"16": "a dog"', "keyframe '\"0\":': its prompt '\"a cat' opens a quote it does not close"),
    ("0: a\n99999999999999999999999: b", "frame numbers go up to 1000000"),
    ("a lovely cat\n0: a cat\n8: a dog", "text before its first keyframe: 'a lovely cat'"),
    # lines that all start like keyframes without being one: refused, not encoded as one prompt with the markers
    ("frame 0: a cat\nframe 16: a dog", "line 'frame 0: a cat' starts like a keyframe but is not one"),
    ("0; a cat\n16; a dog", "line '0; a cat' starts like a keyframe"),
    # a thousands separator: not keyframe 200 with '1' added to the prompt above
    ("0: a cat\n1,200: a dog", r"line '1,200: a dog' starts like a keyframe.*without separators \(1200, not 1,200\)"),
    ("0: a cat\n'16': a dog", "line \"'16': a dog\" starts like a keyframe"),  # single quotes
    ("0: a cat\n16\uff1a a dog", "line '16\uff1a a dog' starts like a keyframe"),  # a full-width colon
    ("0: a cat\n00: a dog", r"frame 0 has two keyframes \('0:' and '00:'\)"),  # both markers quoted
])
def test_parse_schedule_errors(text, match):
    with pytest.raises(KinemaError, match=match):
        pt.parse_schedule(text)


def test_join_prompt():
    assert pt.join_prompt("a cat", "", "") == "a cat"
    assert pt.join_prompt("a cat", "photo,", " , best quality") == "photo, a cat, best quality"
    assert pt.join_prompt("a cat", None, "4k") == "a cat, 4k"


# ---------------------------------------------------------------- per-frame contexts

def _encodings(k=3, n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, d, generator=g)


def test_frames_at_keyframes_are_the_encodings_exactly():
    enc = _encodings()
    for method in pt.INTERPOLATIONS:
        out = pt.frame_contexts([0, 4, 10], enc, 11, method)
        assert out.shape == (11, 5, 8)
        for i, f in enumerate([0, 4, 10]):
            assert torch.equal(out[f], enc[i]), (method, f)


def test_lerp_midpoints_and_fractions():
    enc = _encodings()
    out = pt.frame_contexts([0, 4, 10], enc, 11, "lerp")
    torch.testing.assert_close(out[2], (enc[0] + enc[1]) / 2)
    torch.testing.assert_close(out[1], 0.75 * enc[0] + 0.25 * enc[1])
    torch.testing.assert_close(out[7], (enc[1] + enc[2]) / 2)
    torch.testing.assert_close(out[6], enc[1] + (enc[2] - enc[1]) / 3)


def test_none_holds_the_previous_keyframe():
    enc = _encodings()
    out = pt.frame_contexts([0, 4, 10], enc, 12, "none")
    for f in range(12):
        assert torch.equal(out[f], enc[0 if f < 4 else 1 if f < 10 else 2]), f


@pytest.mark.parametrize("method", pt.INTERPOLATIONS)
def test_frames_before_the_first_and_after_the_last_keyframe(method):
    enc = _encodings()
    out = pt.frame_contexts([3, 5, 7], enc, 10, method)
    for f in range(4):
        assert torch.equal(out[f], enc[0])
    for f in range(7, 10):
        assert torch.equal(out[f], enc[2])
    single = pt.frame_contexts([5], enc[:1], 8, method)
    assert all(torch.equal(single[f], enc[0]) for f in range(8))


def test_keyframes_beyond_the_video_are_approached():
    enc = _encodings(k=2)
    out = pt.frame_contexts([0, 16], enc, 8, "lerp")
    assert out.shape[0] == 8
    torch.testing.assert_close(out[7], enc[0] + (enc[1] - enc[0]) * 7 / 16)
    late = pt.frame_contexts([10, 20], enc, 8, "lerp")  # every frame before the first keyframe
    assert all(torch.equal(late[f], enc[0]) for f in range(8))


def test_slerp_keeps_unit_vectors_on_the_sphere():
    enc = torch.nn.functional.normalize(_encodings(k=2, n=7, d=16), dim=-1)
    out = pt.frame_contexts([0, 8], enc, 9, "slerp")
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(9, 7), atol=1e-5, rtol=0)
    lerped = pt.frame_contexts([0, 8], enc, 9, "lerp")
    assert (lerped[4].norm(dim=-1) < 0.999).all()  # the straight line cuts inside the sphere
    # the midpoint of the arc is the normalised midpoint of the chord
    torch.testing.assert_close(out[4], torch.nn.functional.normalize(enc[0] + enc[1], dim=-1), atol=1e-5, rtol=0)


def test_slerp_orthogonal_vectors_and_norms():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    t = torch.tensor([0.0, 1 / 3, 0.5, 1.0])
    out = pt.interpolate(a, b, t, "slerp")
    assert torch.equal(out[0], a) and torch.equal(out[3], b)  # exactly at t = 0 and 1
    # the direction turns at a constant rate, the norm moves linearly from 3 to 1
    torch.testing.assert_close(out[1], (3 - 2 / 3) * torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))
    torch.testing.assert_close(out[2], 2.0 * torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))


def test_slerp_equals_the_lerp_direction_at_the_ends():
    enc = _encodings(k=2)
    t = torch.tensor([0.0, 1.0])
    assert torch.equal(pt.interpolate(enc[0], enc[1], t, "slerp"), pt.interpolate(enc[0], enc[1], t, "lerp"))


def test_slerp_near_parallel_opposite_and_zero_vectors():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    t = torch.linspace(0, 1, 5)
    near = torch.tensor([[2.0, 1e-8, 0.0]])  # same direction to float precision: no great circle
    out = pt.interpolate(a, near, t, "slerp")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pt.interpolate(a, near, t, "lerp"))
    close = torch.tensor([[1.0, 1e-3, 0.0]])  # almost parallel, still curved: stays finite, close to the chord
    torch.testing.assert_close(pt.interpolate(a, close, t, "slerp"), pt.interpolate(a, close, t, "lerp"),
                               atol=1e-6, rtol=0)
    for other in (-a, torch.zeros_like(a)):  # opposite or zero vectors: the straight line
        out = pt.interpolate(a, other, t, "slerp")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, pt.interpolate(a, other, t, "lerp"))


def test_pooled_outputs_interpolate_too():
    pooled = _encodings(k=3, n=8, d=1)[:, :, 0]  # [k, d]
    for method in pt.INTERPOLATIONS:
        out = pt.frame_pooled([0, 4, 10], pooled, 12, method)
        assert out.shape == (12, 8) and torch.equal(out[4], pooled[1])
    torch.testing.assert_close(pt.frame_pooled([0, 4, 10], pooled, 12, "lerp")[2], (pooled[0] + pooled[1]) / 2)
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(pt.frame_pooled([0, 4, 10], unit, 12, "slerp").norm(dim=-1), torch.ones(12))


def test_frame_contexts_keeps_the_dtype():
    enc = _encodings().to(torch.bfloat16)
    for method in pt.INTERPOLATIONS:
        out = pt.frame_contexts([0, 4, 10], enc, 11, method)
        assert out.dtype == torch.bfloat16 and out.shape == (11, 5, 8) and torch.equal(out[4], enc[1])


@pytest.mark.parametrize("keyframes,count,frames,method,match", [
    ([0, 4], 3, 8, "lerp", "2 keyframes but 3 encodings"),
    ([4, 0, 8], 3, 8, "lerp", "increasing"),
    ([0, 4, 4], 3, 8, "lerp", "increasing"),
    ([-4, 4], 2, 8, "lerp", r"increasing frame numbers from 0, got \[-4, 4\]"),
    ([-1, 4], 2, 8, "lerp", r"increasing frame numbers from 0, got \[-1, 4\]"),
    ([0, 4, 8], 3, 8, "cubic", "unknown interpolation 'cubic'"),
    ([0, 4, 8], 3, 0, "lerp", "at least 1 frame"),
])
def test_frame_contexts_errors(keyframes, count, frames, method, match):
    with pytest.raises(KinemaError, match=match):
        pt.frame_contexts(keyframes, _encodings(k=count), frames, method)


def test_resolve_conditioning():
    enc = _encodings()
    plain = enc[:1]
    assert pt.resolve_conditioning(plain, {"pooled_output": torch.zeros(1, 8)}, 6) is plain
    assert pt.resolve_conditioning(plain, {}, 6) is plain
    out = pt.resolve_conditioning(enc, {"kinema_keyframes": [0, 2, 4], "kinema_interpolation": "none"}, 6)
    assert torch.equal(out, pt.frame_contexts([0, 2, 4], enc, 6, "none"))


def test_stack_encodings_matches_token_lengths():
    short = _encodings(k=1, n=77)
    long = _encodings(k=1, n=154, seed=1)
    out = pt.stack_encodings([short, long])
    assert out.shape == (2, 154, 8)
    assert torch.equal(out[0], torch.cat([short[0], short[0]])) and torch.equal(out[1], long[0])
    with pytest.raises(KinemaError, match="cannot be brought to one length"):
        pt.stack_encodings([_encodings(k=1, n=77 * 6), _encodings(k=1, n=77 * 7)])


# ---------------------------------------------------------------- the node, with the demo CLIP

@pytest.fixture(scope="module")
def clip():
    return encoders.TextEncoder.from_state_dict(fixtures.sd15_state_dict())


@pytest.fixture(scope="module")
def conditioning_nodes():
    from kinema.nodes import conditioning

    return conditioning


def _counting(clip, monkeypatch):
    """``clip`` with its encode calls recorded in the returned list (prompt, clip_skip)."""
    prompts, encode = [], clip.encode

    def counted(prompt, clip_skip=1, embeddings=None):
        prompts.append((prompt, clip_skip))
        return encode(prompt, clip_skip=clip_skip, embeddings=embeddings)

    monkeypatch.setattr(clip, "encode", counted)
    return prompts


def test_node_is_registered_and_documented(conditioning_nodes):
    cls = conditioning_nodes.NODE_CLASS_MAPPINGS["KinemaPromptSchedule"]
    assert conditioning_nodes.NODE_DISPLAY_NAME_MAPPINGS["KinemaPromptSchedule"] == "Prompt Schedule (Kinema)"
    assert cls.CATEGORY == "Kinema/conditioning" and cls.DESCRIPTION and cls.RETURN_TYPES == ("CONDITIONING",)
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec[section].items():
            assert entry[1].get("tooltip"), name
    assert spec["required"]["interpolation"][0] == list(pt.INTERPOLATIONS)
    assert spec["required"]["interpolation"][1]["default"] == "lerp"
    assert set(spec["optional"]) == {"pre_text", "app_text", "clip_skip"}
    assert len(pt.parse_schedule(spec["required"]["text"][1]["default"])) == 3


def test_node_encodes_each_keyframe_once(conditioning_nodes, clip, monkeypatch):
    prompts = _counting(clip, monkeypatch)
    text = "0: a cat walking\n8: a cat running, 16: a cat jumping, (motion blur:1.2)"
    (cond,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, text, "slerp", "photo", "best quality", 2)
    expected = ["photo, a cat walking, best quality", "photo, a cat running, best quality",
                "photo, a cat jumping, (motion blur:1.2), best quality"]
    assert prompts == [(p, 2) for p in expected]
    assert len(cond) == 1
    tensor, options = cond[0]
    assert tensor.shape == (3, 77, 64) and options["pooled_output"].shape == (3, 64)
    assert options["kinema_keyframes"] == [0, 8, 16] and options["kinema_interpolation"] == "slerp"
    for i, p in enumerate(expected):
        c, pooled = clip.encode(p, clip_skip=2)
        assert torch.equal(tensor[i], c[0]) and torch.equal(options["pooled_output"][i], pooled[0])
    # a held prompt is encoded once
    prompts.clear()
    conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: a cat, 8: a cat, 16: a dog", "lerp")
    assert [p for p, _ in prompts] == ["a cat", "a dog"]


def test_node_plain_prompt_and_bad_inputs(conditioning_nodes, clip):
    (cond,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, "a (red:1.2) fox", "lerp")
    tensor, options = cond[0]
    assert torch.equal(tensor, clip.encode("a (red:1.2) fox")[0]) and options["kinema_keyframes"] == [0]
    assert torch.equal(pt.resolve_conditioning(tensor, options, 5), tensor.expand(5, -1, -1))
    with pytest.raises(KinemaError, match="input 'interpolation': 'cubic' is not one of"):
        conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: a", "cubic")
    with pytest.raises(KinemaError, match="keyframe '8:' has no prompt"):
        conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: a, 8:", "lerp")


def test_node_long_prompts_are_matched_in_length(conditioning_nodes, clip):
    long_prompt = " ".join(["cat"] * 100)  # 100 tokens: two chunks
    assert clip.encode(long_prompt)[0].shape[1] == 154
    (cond,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, f"0: a cat\n8: {long_prompt}", "lerp")
    tensor, options = cond[0]
    assert tensor.shape == (2, 154, 64)
    short = clip.encode("a cat")[0][0]
    assert torch.equal(tensor[0], torch.cat([short, short])) and torch.equal(tensor[1], clip.encode(long_prompt)[0][0])
    per_frame = pt.resolve_conditioning(tensor, options, 9)
    assert per_frame.shape == (9, 154, 64) and torch.equal(per_frame[8], tensor[1])


# ---------------------------------------------------------------- the sampler uses it

def test_sampler_gives_each_frame_its_context(conditioning_nodes, clip):
    from kinema.nodes import sampler

    model = fixtures.motion_model("v2")
    (positive,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: a cat\n2: a dog\n5: a bird", "lerp")
    (negative,) = conditioning_nodes.KinemaTextEncode().encode(clip, "blurry")
    latent = {"samples": torch.zeros(6, 4, 8, 8)}
    (out,) = sampler.KinemaVideoSampler().sample(model, positive, negative, latent, 3, 1, 7.5, "euler", "normal", 1.0)

    enc = [clip.encode(p)[0] for p in ("a cat", "a dog", "a bird")]
    manual = torch.cat([enc[0], (enc[0] + enc[1]) / 2, enc[1], enc[1] + (enc[2] - enc[1]) / 3,
                        enc[1] + 2 * (enc[2] - enc[1]) / 3, enc[2]])
    assert torch.allclose(manual, pt.resolve_conditioning(positive[0][0], positive[0][1], 6), atol=1e-6)
    opts = pipelines.SampleOptions(seed=3, steps=1, cfg=7.5, sampler="euler", scheduler="normal")
    reference = pipelines.sample_video(model, pt.resolve_conditioning(positive[0][0], positive[0][1], 6),
                                       negative[0][0], latent["samples"], opts)
    assert torch.equal(out["samples"], reference)
    by_hand = pipelines.sample_video(model, manual, negative[0][0], latent["samples"], opts)
    scale = float(by_hand.abs().max())  # the unscaled latent is in the hundreds; contexts agree to float rounding
    torch.testing.assert_close(out["samples"], by_hand, atol=1e-5 * scale, rtol=0)
    # and the frames really see different prompts: the first keyframe alone gives another video
    alone = pipelines.sample_video(model, enc[0], negative[0][0], latent["samples"], opts)
    assert not torch.allclose(out["samples"], alone)


def test_sampler_passes_per_frame_contexts_to_the_pipeline(conditioning_nodes, clip, monkeypatch):
    from kinema.nodes import sampler

    seen = {}

    def spy(model, positive, negative, latent, opts, **kwargs):
        seen["positive"], seen["negative"] = positive, negative
        return latent

    monkeypatch.setattr(sampler.pipelines, "sample_video", spy)
    (positive,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: a cat, 3: a dog", "none")
    (negative,) = conditioning_nodes.KinemaTextEncode().encode(clip, "")
    latent = {"samples": torch.zeros(5, 4, 8, 8)}
    model = fixtures.motion_model("v2")  # the spy samples
    sampler.KinemaVideoSampler().sample(model, positive, negative, latent, 0, 1, 7.5, "euler", "normal", 1.0)
    assert seen["positive"].shape == (5, 77, 64)
    for f in range(5):
        assert torch.equal(seen["positive"][f], positive[0][0][0 if f < 3 else 1])
    assert seen["negative"] is negative[0][0]  # a plain prompt stays one context for the video


@pytest.mark.parametrize("change,message", [
    (lambda c: [c[0], c[0]], "holds 2 entries \\(ConditioningCombine makes several\\).*ConditioningConcat"),
    (lambda c: [[c[0][0], {**c[0][1], "control": object()}]], "core's Apply ControlNet.*Apply ControlNet \\(Kinema\\)"),
    (lambda c: [[c[0][0], {**c[0][1], "area": (8, 8, 0, 0), "strength": 1.0}]], "an area \\(ConditioningSetArea\\)"),
    (lambda c: [[c[0][0], {**c[0][1], "mask": torch.ones(1, 8, 8)}]], "a mask \\(ConditioningSetMask\\)"),
    (lambda c: [[c[0][0], {**c[0][1], "strength": 2.0}]], "a strength other than 1"),
    (lambda c: [[c[0][0], {**c[0][1], "start_percent": 0.5, "end_percent": 1.0}]], "a timestep range"),
    (lambda c: [[c[0][0], {**c[0][1], "gligen": ("position", None, [])}]], "GLIGEN boxes"),
    (lambda c: [[c[0][0], {**c[0][1], "concat_latent_image": torch.zeros(1, 4, 8, 8)}]],
     "SVD_img2vid_Conditioning.*SVD Image Conditioning \\(Kinema\\)"),
    (lambda c: [[c[0][0].repeat(2, 1, 1), c[0][1]]], "holds 2 prompts but no keyframes"),
])
def test_the_sampler_refuses_what_core_conditioning_nodes_add_and_it_cannot_do(conditioning_nodes, clip, change,
                                                                               message):
    """Core's Apply ControlNet, SetArea/SetMask, SetTimestepRange, Combine would be dropped without a word:
    refused, naming the node and what to use instead."""
    from kinema.nodes import sampler

    (positive,) = conditioning_nodes.KinemaTextEncode().encode(clip, "a cat")
    model = fixtures.motion_model("v2")
    with pytest.raises(KinemaError, match="^Video Sampler \\(Kinema\\): the positive conditioning .*" + message):
        sampler.KinemaVideoSampler().sample(model, change(positive), positive, {"samples": torch.zeros(3, 4, 8, 8)},
                                            0, 1, 7.5, "euler", "normal", 1.0)


def test_the_sampler_takes_neutral_core_keys_and_names_the_ones_it_ignores(conditioning_nodes, clip, monkeypatch,
                                                                          caplog):
    import logging

    from kinema.nodes import sampler

    monkeypatch.setattr(sampler.pipelines, "sample_video", lambda model, positive, negative, latent, opts, **kw: latent)
    (positive,) = conditioning_nodes.KinemaTextEncode().encode(clip, "a cat")
    neutral = [[positive[0][0], {**positive[0][1], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                                 "unclip_conditioning": [{}]}]]
    with caplog.at_level(logging.WARNING, logger="kinema"):
        sampler.KinemaVideoSampler().sample(fixtures.motion_model("v2"), neutral, positive,
                                            {"samples": torch.zeros(3, 4, 8, 8)}, 0, 1, 7.5, "euler", "normal", 1.0)
    assert "the positive conditioning's unclip_conditioning is ignored" in caplog.text


def test_svd_conditioning_changed_by_a_core_node_is_refused():
    """ConditioningAverage / ZeroOut change the visible tensor of SVD Image Conditioning's output, not the dict the
    sampler reads: refused rather than sampled from the unchanged image."""
    from kinema.nodes import sampler

    context = torch.randn(1, 1, 16)
    cond = {"context": context, "concat": torch.zeros(1, 4, 8, 8), "y": torch.zeros(1, 3)}
    assert sampler.image_conditioning([[context, {sampler.IMAGE_CONDITIONING: cond}]], "positive") is cond
    assert sampler.image_conditioning([[context.clone(), {sampler.IMAGE_CONDITIONING: cond}]], "positive") is cond
    with pytest.raises(KinemaError, match="image conditioning was changed by a conditioning node"):
        sampler.image_conditioning([[torch.zeros_like(context), {sampler.IMAGE_CONDITIONING: cond}]], "positive")


# ---------------------------------------------------------------- edges the tests above leave open

def test_frame_numbers_go_up_to_max_frame_inclusive():
    """1000000 is the largest frame a keyframe may name (the error says "up to 1000000"): it is accepted, the next
    one is refused."""
    assert pt.parse_schedule("0: a\n1000000: b") == [(0, "a"), (1000000, "b")]
    with pytest.raises(KinemaError, match="keyframe '1000001:': frame numbers go up to 1000000, got 1000001"):
        pt.parse_schedule("0: a\n1000001: b")


def test_a_quoted_prompt_that_is_not_json_loses_its_quotes():
    """An invalid JSON escape makes the FizzNodes form fall back to the keyframe parser: the quoted prompt is still
    read without its quotes (and keeps the backslash as written), not as '"a \\q cat"'."""
    assert pt.parse_schedule('"0": "a \\q cat", "8": "b"') == [(0, "a \\q cat"), (8, "b")]


def test_stack_encodings_takes_2d_encodings_of_different_lengths():
    """Encodings [n_i, d] (no batch axis) are stacked as [k, n, d], as its docstring promises, also when their
    lengths differ and the shorter one is repeated along the tokens."""
    short = _encodings(k=1, n=77)[0]
    long = _encodings(k=1, n=154, seed=1)[0]
    out = pt.stack_encodings([short, long])
    assert out.shape == (2, 154, 8)
    assert torch.equal(out[0], torch.cat([short, short])) and torch.equal(out[1], long)


def test_slerp_of_a_short_vector_follows_the_arc():
    """Only vectors of norm up to 1e-6 have no direction: a short one (norm 5e-4) still turns on the great circle,
    the norm moving linearly from 5e-4 to 1, instead of taking the straight line."""
    a = torch.tensor([[5e-4, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    out = pt.interpolate(a, b, torch.tensor([0.5]), "slerp")
    half = (5e-4 + 1) / 2 * math.sqrt(0.5)  # about 0.3537; the chord's midpoint is [0.00025, 0.5]
    torch.testing.assert_close(out, torch.tensor([[[half, half]]]), atol=1e-6, rtol=0)


def test_resolve_conditioning_lerps_when_no_interpolation_is_named():
    """A conditioning with keyframes but no ``kinema_interpolation`` (the node's default, lerp) blends the
    keyframes rather than holding one."""
    enc = _encodings(k=2)
    out = pt.resolve_conditioning(enc, {"kinema_keyframes": [0, 4]}, 5)
    assert torch.equal(out, pt.frame_contexts([0, 4], enc, 5, "lerp"))
    torch.testing.assert_close(out[1], 0.75 * enc[0] + 0.25 * enc[1])


def test_node_refuses_text_inputs_that_are_not_text(conditioning_nodes, clip):
    """pre_text and app_text are checked like text: a number or None from a broken workflow is a KinemaError
    naming the input, not an AttributeError from deep inside (or a None silently read as empty)."""
    node = conditioning_nodes.KinemaPromptSchedule()
    with pytest.raises(KinemaError, match=r"Prompt Schedule \(Kinema\): 'pre_text' must be text, got int"):
        node.encode(clip, "0: a cat", "lerp", pre_text=5)
    with pytest.raises(KinemaError, match=r"Prompt Schedule \(Kinema\): 'app_text' must be text, got NoneType"):
        node.encode(clip, "0: a cat", "lerp", app_text=None)


def test_sampler_passes_per_frame_negative_contexts_to_the_pipeline(conditioning_nodes, clip, monkeypatch):
    """A Prompt Schedule as the negative travels over the frames as the positive does: the model gets [frames, n, d]
    with frame f the schedule's value at f."""
    from kinema.nodes import sampler

    seen = {}

    def spy(model, positive, negative, latent, opts, **kwargs):
        seen["positive"], seen["negative"] = positive, negative
        return latent

    monkeypatch.setattr(sampler.pipelines, "sample_video", spy)
    (positive,) = conditioning_nodes.KinemaTextEncode().encode(clip, "a cat")
    (negative,) = conditioning_nodes.KinemaPromptSchedule().encode(clip, "0: blurry, 4: dark", "lerp")
    latent = {"samples": torch.zeros(5, 4, 8, 8)}
    sampler.KinemaVideoSampler().sample(fixtures.motion_model("v2"), positive, negative, latent,
                                        0, 1, 7.5, "euler", "normal", 1.0)
    enc = negative[0][0]
    assert seen["negative"].shape == (5, 77, 64) and seen["positive"] is positive[0][0]
    assert torch.equal(seen["negative"][0], enc[0]) and torch.equal(seen["negative"][4], enc[1])
    for f in range(1, 4):
        torch.testing.assert_close(seen["negative"][f], enc[0] + (enc[1] - enc[0]) * f / 4)


def test_the_sampler_refuses_an_image_to_video_conditioning_for_a_text_model():
    """SVD Image Conditioning's output on a text-to-video model would sample from its bare context tensor: refused,
    naming image-to-video conditioning and what to connect."""
    from kinema.nodes import sampler

    context = torch.randn(1, 1, 16)
    cond = [[context, {sampler.IMAGE_CONDITIONING: {"context": context, "concat": torch.zeros(1, 4, 8, 8)}}]]
    with pytest.raises(KinemaError, match=r"^Video Sampler \(Kinema\): the negative conditioning is an image-to-video "
                                          r"conditioning, but the model is a text-to-video model: connect Text Encode"):
        sampler.conditioning_tensor(cond, "negative", 3)


def test_the_sampler_takes_core_attention_masks_without_a_warning(conditioning_nodes, clip, monkeypatch, caplog):
    """Core's text encodings may carry ``attention_mask``, which holds nothing for SD1.5's 77-token chunks: honoured
    quietly, no "is ignored" warning that would send users looking for a problem."""
    import logging

    from kinema.nodes import sampler

    monkeypatch.setattr(sampler.pipelines, "sample_video", lambda model, positive, negative, latent, opts, **kw: latent)
    (positive,) = conditioning_nodes.KinemaTextEncode().encode(clip, "a cat")
    masked = [[positive[0][0], {**positive[0][1], "attention_mask": torch.ones(1, 77)}]]
    with caplog.at_level(logging.WARNING, logger="kinema"):
        sampler.KinemaVideoSampler().sample(fixtures.motion_model("v2"), masked, masked,
                                            {"samples": torch.zeros(3, 4, 8, 8)}, 0, 1, 7.5, "euler", "normal", 1.0)
    assert "ignored" not in caplog.text


def test_the_sampler_refuses_an_empty_conditioning_and_takes_an_entry_without_options(caplog):
    """An empty CONDITIONING list is named as such (not an IndexError); an entry of a tensor alone has no options.
    Several ignored keys are named together, "are ignored"."""
    import logging

    from kinema.nodes import sampler

    with pytest.raises(KinemaError, match=r"^Video Sampler \(Kinema\): the negative conditioning is empty or not a "
                                          r"CONDITIONING"):
        sampler.conditioning_tensor([], "negative", 3)
    context = torch.randn(1, 77, 64)
    assert sampler.conditioning_tensor([[context]], "positive", 3) is context
    with caplog.at_level(logging.WARNING, logger="kinema"):
        sampler.conditioning_tensor([[context, {"unclip_conditioning": [], "hooks": None}]], "positive", 3)
    assert "the positive conditioning's hooks, unclip_conditioning are ignored" in caplog.text


def test_a_prompt_that_only_starts_and_ends_with_a_quote_keeps_its_quotes():
    """Only a prompt that is one quoted string loses its quotes: '"STOP" sign, "EXIT"' is read as written (as Text
    Encode reads it), not as 'STOP" sign, "EXIT', in either form."""
    assert pt.parse_schedule('0: "STOP" sign, "EXIT"\n8: a dog') == [(0, '"STOP" sign, "EXIT"'), (8, "a dog")]
    assert pt.parse_schedule('0: a cat, 8: "a dog" and "a bird"') == [(0, "a cat"), (8, '"a dog" and "a bird"')]
    assert pt.parse_schedule('0: "a \\"big\\" cat"\n8: "b"') == [(0, 'a "big" cat'), (8, "b")]


@pytest.mark.parametrize("text", ['{"0": "a cat"', '{"0": "a cat", "16": "a dog"', "{0: a cat} in the snow"])
def test_a_schedule_that_opens_a_brace_it_does_not_close_is_refused(text):
    """A FizzNodes schedule missing its closing brace is named, not encoded as the prompt '{"0": "a cat"'."""
    with pytest.raises(KinemaError, match="opens a '{' it does not close"):
        pt.parse_schedule(text)
    assert pt.parse_schedule("{red|blue} cat {big|small}") == [(0, "{red|blue} cat {big|small}")]
