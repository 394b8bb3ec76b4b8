"""Copy-on-write copies with deferred weights (``models.patching``): a LoRA'd copy computes its merged weights when
first used, so a copy that only feeds another merge (a chain of LoRA nodes, each output kept by ComfyUI) holds
none; every use materializes it first (before any device move), and a failed merge leaves it as it was."""
import pytest
import torch
from fixtures import motion_model, motion_modules, sd15_state_dict
from kinema.models import demo, lora, pipelines, placement
from kinema.models.encoders import TextEncoder
from kinema.models.memory import cast_weights
from kinema.models.offload import OffloadOptions
from kinema.models.patching import (
    defer,
    is_deferred,
    materialize,
    replace_parameters,
    shallow_copy,
)
from kinema.models.placement import Placement
from torch import nn

HW = 16


def _pairs(seed, width=8, names=("0.weight", "1.weight")):
    g = torch.Generator().manual_seed(seed)
    return {n: lora.LoRAPair(torch.randn(2, width, generator=g), torch.randn(width, 2, generator=g) * 0.1, 2.0)
            for n in names}


def _params(module):
    return dict(module.named_parameters())


def test_a_chain_of_merges_holds_weights_only_where_it_is_used():
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    a, b = _pairs(0), _pairs(1, names=("1.weight", "2.weight"))
    first = lora.merge(base, [(a, 0.5)])
    second = lora.merge(first, [(b, -1.0)])
    eager = lora.merge(base, [(a, 0.5), (b, -1.0)])
    assert is_deferred(first) and is_deferred(second)
    assert all(p is _params(base)[n] for n, p in _params(second).items())  # nothing of its own yet
    materialize(second)
    materialize(eager)
    assert not is_deferred(second) and is_deferred(first)  # the middle of the chain is never computed
    assert all(p is _params(base)[n] for n, p in _params(first).items())
    new = [n for n, p in _params(second).items() if p is not _params(base)[n]]
    assert sorted(new) == ["0.weight", "1.weight", "2.weight"]
    for n, p in _params(second).items():
        assert torch.equal(p, _params(eager)[n])
    want = base[1].weight + 0.5 * a["1.weight"].delta((8, 8)) - b["1.weight"].delta((8, 8))
    torch.testing.assert_close(second[1].weight, want, rtol=0, atol=1e-6)
    assert materialize(second) is second  # once: a second call changes nothing
    assert torch.equal(second[1].weight, eager[1].weight)


def test_calling_the_copy_materializes_it_and_its_hook_is_its_own():
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    merged = lora.merge(base, [(_pairs(2), 1.0)])
    x = torch.randn(3, 8)
    assert len(base._forward_pre_hooks) == 0  # the base's hooks are not the copy's
    plain = base(x)
    assert is_deferred(merged)  # calling the base does not compute the copy
    out = merged(x)
    assert not is_deferred(merged) and len(merged._forward_pre_hooks) == 0
    assert not torch.allclose(out, plain)
    assert torch.equal(out, merged(x))


def test_a_failed_merge_leaves_the_copy_deferred_and_whole():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    calls = []

    def compute(current):
        calls.append(dict(current))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return {n: w.detach() + 1.0 for n, w in current.items()}

    copy = defer(base, ["0.weight", "1.weight"], compute)
    with pytest.raises(RuntimeError, match="simulated"):
        materialize(copy)
    assert is_deferred(copy) and all(p is _params(base)[n] for n, p in _params(copy).items())
    materialize(copy)
    assert torch.equal(copy[0].weight, base[0].weight + 1.0) and torch.equal(copy[1].weight, base[1].weight + 1.0)
    assert calls[1]["0.weight"] is base[0].weight  # computed from where the original weights are now


def test_a_name_the_model_does_not_have_is_an_error_when_the_copy_is_made():
    from kinema.models.errors import KinemaError

    with pytest.raises(KinemaError, match="internal error: the model has no parameter '0.nope'"):
        defer(nn.Sequential(nn.Linear(2, 2)), ["0.nope"], lambda current: {})
    with pytest.raises(KinemaError, match="no parameter '3.weight'"):
        replace_parameters(nn.Sequential(nn.Linear(2, 2)), {"3.weight": torch.zeros(2, 2)})


def test_a_compute_that_leaves_a_weight_out_is_an_error():
    from kinema.models.errors import KinemaError

    copy = defer(nn.Sequential(nn.Linear(2, 2)), ["0.weight"], lambda current: {})
    with pytest.raises(KinemaError, match="internal error: no new weight was computed for '0.weight'"):
        materialize(copy)
    assert is_deferred(copy)


def test_new_weights_are_parameters_that_need_no_gradient():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    replaced = replace_parameters(base, {"0.weight": torch.zeros(4, 4)})
    deferred = materialize(defer(base, ["1.weight"], lambda current: {n: w.detach() * 2 for n, w in current.items()}))
    for new in (replaced[0].weight, deferred[1].weight):
        assert isinstance(new, nn.Parameter) and not new.requires_grad
    assert base[0].weight.requires_grad and base[1].weight.requires_grad  # the original's are untouched


def test_a_deferred_copy_of_a_deferred_copy_is_made_from_its_computed_weights():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def plus(value):
        return lambda current: {n: w.detach() + value for n, w in current.items()}

    first = defer(base, ["0.weight", "1.weight"], plus(1.0))
    second = defer(first, ["1.weight"], plus(10.0))
    assert not is_deferred(first) and is_deferred(second)  # its root was materialized first
    materialize(second)
    assert torch.equal(second[0].weight, base[0].weight + 1.0)
    assert torch.equal(second[1].weight, base[1].weight + 1.0 + 10.0)
    assert torch.equal(first[1].weight, base[1].weight + 1.0)


def test_casting_a_deferred_merge_casts_the_merged_weights():
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    a = _pairs(3)
    merged = lora.merge(base, [(a, 0.7)])
    assert cast_weights(merged, torch.float32) is merged and is_deferred(merged)  # nothing to cast: nothing made
    half = cast_weights(merged, torch.float16)
    want = (base[0].weight + 0.7 * a["0.weight"].delta((8, 8))).half()
    assert half[0].weight.dtype == torch.float16 and torch.equal(half[0].weight, want)
    assert torch.equal(half[0].bias, base[0].bias.half())
    assert not is_deferred(half) and len(half._forward_pre_hooks) == 0
    assert is_deferred(merged)  # the merged fp32 weights were made for the cast only, not kept


def test_a_cast_computes_the_deferred_weights_once():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half())  # one layer in the cast's dtype already
    calls = []

    def compute(current):
        calls.append(1)
        return {n: w.detach() + 1.0 for n, w in current.items()}

    half = cast_weights(defer(base, ["0.weight", "1.weight"], compute), torch.float16)
    assert len(calls) == 1
    assert torch.equal(half[1].weight, base[1].weight + 1.0) and torch.equal(half[0].weight, (base[0].weight + 1).half())


def test_replacing_some_weights_of_a_deferred_copy_keeps_its_other_merged_weights():
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    merged = lora.merge(base, [(_pairs(4), 1.0)])
    zero = torch.zeros(8, 8)
    copy = replace_parameters(merged, {"0.weight": zero})
    assert is_deferred(merged) and not is_deferred(copy)
    assert torch.equal(copy[0].weight, zero)
    assert torch.equal(copy[1].weight, materialize(merged)[1].weight)
    assert not torch.equal(copy[1].weight, base[1].weight)


def _lora_video_model(**options):
    """A v2 video model with an SD1.5 LoRA and a MotionLoRA, both deferred."""
    model = motion_model("v2", **options)
    unet, _ = lora.apply_sd15_loras(model.unet, None, [(demo.sd15_lora_state_dict(), 0.8, 0.0, "lora")])
    motion = lora.apply_motion_loras(motion_modules("v2"), [(demo.motion_lora_state_dict(), 1.0, "zoom")])
    return model.with_options(unet=unet, motion=motion)


def _sample(model):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        return pipelines.sample_video(model, pos, neg, torch.zeros(4, 4, HW, HW),
                                      pipelines.SampleOptions(seed=7, steps=2, cfg=5.0))


@pytest.mark.parametrize("mode", ["model", "block"])
def test_sampling_materializes_the_merges_before_any_move(mode):
    """Under model or block offload the copies' own weights exist before the first move (else the merged
    tensors would be made on the device and the originals left there); the video equals the eager merge's."""
    seen = []

    def watch(module, device):
        seen.append(module)
        assert not is_deferred(module), "a deferred copy was moved"

    eager = _lora_video_model()
    materialize(eager.unet), materialize(eager.motion)
    want = _sample(eager)
    model = _lora_video_model()
    model = model.with_options(offload=OffloadOptions(mode=mode, device="cpu", storage="cpu:1", on_move=watch))
    assert is_deferred(model.unet) and is_deferred(model.motion)
    got = _sample(model)
    assert seen and not is_deferred(model.unet) and not is_deferred(model.motion)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_text_encoder_is_materialized_where_it_is_used_or_placed():
    te = TextEncoder.from_state_dict(sd15_state_dict())
    loras = [(demo.sd15_lora_state_dict(), 0.0, 0.9, "l")]
    _, eager = lora.apply_sd15_loras(motion_model("v2").unet, te, loras)
    materialize(eager.model)
    _, unplaced = lora.apply_sd15_loras(motion_model("v2").unet, te, loras)
    assert is_deferred(unplaced.model)
    assert torch.equal(unplaced.encode("a fox")[0], eager.encode("a fox")[0])  # made where it runs
    assert not is_deferred(unplaced.model)
    moved, deferred_moves = [], []

    def watch(module, device):
        moved.append(str(device))
        deferred_moves.append(is_deferred(module))

    _, placed = lora.apply_sd15_loras(motion_model("v2").unet, te, loras)
    placement.place(placed, Placement(device="cpu", offload=True, storage="cpu:1", on_move=watch))
    assert moved == ["cpu:1"] and deferred_moves == [False]  # made before it was moved
    assert torch.equal(placed.encode("a fox")[0], eager.encode("a fox")[0])


def test_resting_a_deferred_model_leaves_the_original_weights_where_they_are():
    """Memory Policy moves the video model to where it rests: a deferred copy is made first, else the originals
    it holds until then (the weights its LoRA changes) would move, and the merge be made next to them."""
    base = motion_model("v2")
    unet, _ = lora.apply_sd15_loras(base.unet, None, [(demo.sd15_lora_state_dict(), 0.8, 0.0, "lora")])
    before = {n: p.data_ptr() for n, p in base.unet.named_parameters()}
    placement.rest(base.with_options(unet=unet), OffloadOptions(mode="model", device="cpu", storage="cpu:1"))
    assert not is_deferred(unet)
    changed = [n for n, p in unet.named_parameters() if p is not _params(base.unet)[n]]
    assert changed and all(_params(base.unet)[n].data_ptr() == before[n] for n in changed)


def test_a_copy_of_a_deferred_copy_is_made_from_its_merged_weights():
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    merged = lora.merge(base, [(_pairs(5), 1.0)])
    twin = shallow_copy(merged)
    assert not is_deferred(merged) and not is_deferred(twin)
    x = torch.randn(2, 8)
    assert torch.equal(twin(x), merged(x)) and not torch.equal(merged(x), base(x))
    eager = materialize(lora.merge(base, [(_pairs(5), 1.0)]))
    assert torch.equal(merged(x), eager(x))


def test_functional_call_on_a_deferred_copy_keeps_the_merge():
    """The text encoder's fp32 call of fp16 weights (``functional_call`` with cast copies) on a deferred copy."""
    from kinema.models.encoders import _in_float32

    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    merged = lora.merge(base, [(_pairs(6), 1.0)])
    eager = materialize(lora.merge(base, [(_pairs(6), 1.0)]))
    x = torch.randn(2, 8)
    assert torch.equal(_in_float32(merged, x), _in_float32(eager, x))
    assert all(torch.equal(p, _params(eager)[n]) for n, p in merged.named_parameters())


def test_copies_of_a_transformers_model_have_their_own_layers_and_hooks():
    """transformers 5 records hidden states (clip_skip 2) with hooks it installs on the layers once per model
    instance: a LoRA'd text encoder sharing layer objects (or their hook tables) with the base would collect
    every layer twice once both have run, and read the wrong layer."""
    te = TextEncoder.from_state_dict(sd15_state_dict())
    loras = [(demo.sd15_lora_state_dict(), 0.0, 0.9, "l")]
    _, first = lora.apply_sd15_loras(motion_model("v2").unet, te, loras)
    _, second = lora.apply_sd15_loras(motion_model("v2").unet, te, loras)
    base_modules = {id(m) for m in te.model.modules()}
    assert not any(id(m) in base_modules for m in first.model.modules())
    half = cast_weights(first.model, torch.float16)  # a copy of the copy: whole as well
    assert not any(id(m) in {id(n) for n in first.model.modules()} for m in half.modules())
    want_base = te.encode("a fox", clip_skip=2)[0]
    want = first.encode("a fox", clip_skip=2)[0]
    second.encode("a fox", clip_skip=2)
    assert torch.equal(first.encode("a fox", clip_skip=2)[0], want)
    assert torch.equal(te.encode("a fox", clip_skip=2)[0], want_base)
    assert torch.equal(second.encode("a fox", clip_skip=2)[0], want)


def test_a_lora_after_a_precision_cast_merges_onto_the_cast_weights():
    """Load LoRA -> Memory Policy fp16 -> Load LoRA: the second merge is onto the fp16 copy (not the fp32 original
    the first LoRA was merged from, which would bring the model back in fp32)."""
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    half = cast_weights(lora.merge(base, [(_pairs(7), 1.0)]), torch.float16)
    assert "_kinema_merged_from" not in vars(half)
    again = materialize(lora.merge(half, [(_pairs(8), 1.0)]))
    assert all(p.dtype == torch.float16 for p in again.parameters())
    want = (half[0].weight.float() + _pairs(8)["0.weight"].delta((8, 8))).half()
    assert torch.equal(again[0].weight, want)


def test_changing_a_copys_buffers_or_hooks_leaves_the_original_as_it_is():
    """A structural copy owns its tables of buffers and hooks on the copied path (``_own_tables``): replacing a
    buffer of the copy, or registering a hook on it, changes neither the original module nor its buffers."""
    base = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 4))
    mean = base[0].running_mean
    copy = replace_parameters(base, {"0.weight": torch.full((4,), 2.0)})
    assert copy[0] is not base[0] and copy[0].running_mean is mean
    copy[0].running_mean = torch.ones(4)
    copy[0].register_forward_hook(lambda module, args, out: out * 0)
    copy.register_forward_pre_hook(lambda module, args: None)
    assert base[0].running_mean is mean and torch.equal(mean, torch.zeros(4))
    assert len(base[0]._forward_hooks) == 0 and len(base._forward_pre_hooks) == 0
    x = torch.randn(3, 4)
    base.eval()
    copy.eval()
    assert torch.equal(copy[0](x), torch.zeros(3, 4)) and not torch.equal(base[0](x), torch.zeros(3, 4))


def test_replacing_no_weights_returns_the_model_itself_and_computes_nothing():
    """``replace_parameters(m, {})`` (a cast that changes no weight) is ``m``: no copy, and a deferred ``m`` stays
    deferred (its merge is not computed for nothing)."""
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    assert replace_parameters(base, {}) is base
    calls = []

    def compute(current):
        calls.append(1)
        return {n: w + 1 for n, w in current.items()}

    deferred = defer(base, ["1.weight"], compute)
    assert replace_parameters(deferred, {}) is deferred
    assert is_deferred(deferred) and calls == []
    assert defer(base, [], compute) is base and not is_deferred(base)


def test_a_deferred_copy_takes_only_the_weights_it_names_from_its_compute():
    """What ``compute`` returns beyond the deferred names is not put anywhere: the other layers stay the
    original's modules and tensors."""
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    w0 = base[0].weight.detach().clone()
    copy_ = defer(base, ["1.weight"], lambda cur: {"1.weight": cur["1.weight"] * 2, "0.weight": torch.zeros(8, 8)})
    materialize(copy_)
    assert copy_[0] is base[0] and copy_[0].weight is base[0].weight and torch.equal(base[0].weight, w0)
    torch.testing.assert_close(copy_[1].weight, base[1].weight * 2)
