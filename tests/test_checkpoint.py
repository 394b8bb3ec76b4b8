"""Safe loading and format detection: every bad file gives a clear KinemaError."""
import os
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kinema.models import checkpoint, demo
from kinema.models.errors import KinemaError


@pytest.fixture(scope="module")
def motion_sd():
    return demo.motion_state_dict("v2")


def test_safetensors_and_ckpt_load_the_same_tensors(tmp_path, motion_sd):
    st, ck = tmp_path / "mm.safetensors", tmp_path / "mm.ckpt"
    save_file(motion_sd, str(st))
    torch.save({"state_dict": motion_sd, "animatediff_config": {"version": "v2", "frames": 32}}, str(ck))
    a, b = checkpoint.load_state_dict(str(st)), checkpoint.load_state_dict(str(ck))
    assert a.keys() == b.keys() == motion_sd.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _loaded_tensors(kind, path):
    from kinema.models import lora

    if kind == "motion module":
        return checkpoint.load_motion_module(str(path), dtype=torch.float32).state_dict()
    if kind == "checkpoint":  # the UNet and VAE (build_on_meta) and the CLIP text encoder (its own loading)
        b = checkpoint.load_sd15(str(path), dtype=torch.float32)
        return {**b.unet.state_dict(), **b.vae.state_dict(), **b.clip.model.state_dict()}
    return lora.load_motion_lora(str(path))


@pytest.mark.parametrize("kind,ext", [("motion module", "safetensors"), ("motion module", "ckpt"),
                                      ("checkpoint", "safetensors"), ("MotionLoRA", "safetensors")])
def test_a_loaded_model_does_not_read_its_file_again(tmp_path, motion_sd, kind, ext):
    """safetensors and torch.load(mmap=True) give tensors backed by the file's pages, which the loaders would
    assign into the model as they are at the file's own precision: a file rewritten in place afterwards (a
    download over it) must not change the model or LoRA ComfyUI keeps between runs (a truncated one would kill
    the process)."""
    sd = {"motion module": motion_sd, "checkpoint": demo.sd15_state_dict(),
          "MotionLoRA": demo.motion_lora_state_dict()}[kind]
    path = tmp_path / f"model.{ext}"
    if ext == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    tensors = _loaded_tensors(kind, path)
    before = {k: v.clone() for k, v in tensors.items()}
    with open(path, "r+b") as f:  # every byte of the file zeroed in place, as an overwrite of the same size
        f.write(bytes(os.path.getsize(path)))
    assert all(torch.equal(v, before[k]) for k, v in tensors.items())


def test_integer_weights_where_the_model_has_floats_are_named(tmp_path, motion_sd):
    """A file whose tensors have the right shapes but integer values (the positional encoding as int64, a weight
    as int32) is refused naming the weight, not loaded as garbage or failed with torch's requires_grad error."""
    for key in (next(k for k in motion_sd if k.endswith("pos_encoder.pe")),
                next(k for k in motion_sd if k.endswith("proj_in.weight"))):
        path = tmp_path / "int.safetensors"
        save_file({k: (v.long() if k == key else v) for k, v in motion_sd.items()}, str(path))
        with pytest.raises(KinemaError, match=f"'int.safetensors': motion module weight '{re.escape(key)}' holds "
                                              "int64 values where the model has floating-point ones"):
            checkpoint.load_motion_module(str(path), dtype=torch.float32)


def test_a_safetensors_file_under_a_pickle_name_is_told_to_be_renamed(tmp_path, motion_sd):
    path = tmp_path / "mm.ckpt"
    save_file(motion_sd, str(path))
    with pytest.raises(KinemaError, match=r"'mm.ckpt' is a safetensors file under a .ckpt name: rename it to "
                                          r"'mm.safetensors'"):
        checkpoint.load_state_dict(str(path))


def test_fp16_file_loads_into_fp32_model(tmp_path, motion_sd):
    path = tmp_path / "mm16.safetensors"
    save_file({k: v.half() for k, v in motion_sd.items()}, str(path))
    module = checkpoint.load_motion_module(str(path), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert module.version == "v2" and module.cfg.max_len == 32


def test_truncated_safetensors_is_named(tmp_path, motion_sd):
    path = tmp_path / "cut.safetensors"
    save_file(motion_sd, str(path))
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for cut in (len(data) // 2, len(data) - 1, header // 2, 100):  # in the data, its last byte, in the header
        path.write_bytes(data[:cut])
        with pytest.raises(KinemaError, match="'cut.safetensors' is truncated.*Download"):
            checkpoint.load_state_dict(str(path))
    path.write_bytes(data)
    assert checkpoint.load_state_dict(str(path)).keys() == motion_sd.keys()
    for head in (b"\x01\x02", b"\x01" * 7):  # shorter than the header's 8-byte length
        path.write_bytes(head)
        with pytest.raises(KinemaError, match="not a safetensors file"):
            checkpoint.load_state_dict(str(path))


def test_truncated_ckpt_is_named(tmp_path, motion_sd):
    path = tmp_path / "cut.ckpt"
    torch.save(motion_sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KinemaError, match="cut.ckpt"):
        checkpoint.load_state_dict(str(path))


def test_damaged_ckpt_data_is_named(tmp_path, motion_sd):
    """A zip .ckpt with a flipped byte in a tensor's data: its CRC says so (loading with mmap checks none)."""
    path = tmp_path / "flip.ckpt"
    torch.save(motion_sd, str(path))
    data = bytearray(path.read_bytes())
    key = next(k for k, v in motion_sd.items() if v.numel() > 256)
    raw = motion_sd[key].numpy().tobytes()
    at = bytes(data).index(raw) + len(raw) // 2  # inside that tensor's stored bytes
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KinemaError, match="'flip.ckpt' is damaged.*download it again"):
        checkpoint.load_state_dict(str(path))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def _save_lightning_checkpoint(path, sd, zip_format, monkeypatch):
    """A checkpoint as 2022's training scripts saved them: the weights beside PyTorch Lightning's training state
    (a ModelCheckpoint callback, numpy step counter and metric), saved while a stand-in Lightning is importable."""
    name = "pytorch_lightning.callbacks.model_checkpoint"

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", torch.tensor(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = name, "ModelCheckpoint"
    with monkeypatch.context() as m:
        for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
            m.setitem(sys.modules, part, types.ModuleType(part))
        sys.modules[name].ModelCheckpoint = ModelCheckpoint
        torch.save({"state_dict": sd, "epoch": 6, "global_step": np.int64(470000), "dtype": np.dtype("float32"),
                    "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25)}},
                    "checkpoint_callback": ModelCheckpoint()}, str(path), _use_new_zipfile_serialization=zip_format)
    assert "pytorch_lightning" not in sys.modules


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_lightning_checkpoint_loads_without_lightning(tmp_path, motion_sd, monkeypatch, zip_format):
    """Legacy SD checkpoints (e.g. sd-v1-4-full-ema.ckpt) hold Lightning's training state beside the weights: it is
    dropped, without Lightning and without running code."""
    path = tmp_path / "lightning.ckpt"
    _save_lightning_checkpoint(path, motion_sd, zip_format, monkeypatch)
    loaded = checkpoint.load_state_dict(str(path))
    assert loaded.keys() == motion_sd.keys() and all(torch.equal(loaded[k], motion_sd[k]) for k in loaded)
    assert "pytorch_lightning" not in sys.modules


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode()}, str(path))
    refused = r"other than tensors \((posix|os|nt)\.system\), which Kinema will not unpickle"
    with pytest.raises(KinemaError, match=refused):
        checkpoint.load_state_dict(str(path))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    # an old-style (non-zip) pickle is refused the same way
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(_RunsCode(), f)
    with pytest.raises(KinemaError):
        checkpoint.load_state_dict(str(legacy))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(KinemaError, match="not a model file"):
        checkpoint.load_state_dict(str(tmp_path / "model.gguf"))
    with pytest.raises(KinemaError, match="not found"):
        checkpoint.load_state_dict(str(tmp_path / "nope.safetensors"))


def test_detect_formats(motion_sd):
    assert checkpoint.detect_format(motion_sd) == "motion_module"
    sdxl_mm = {k: v for k, v in motion_sd.items() if not k.startswith(("down_blocks.3.", "up_blocks.3."))}
    assert checkpoint.detect_format(sdxl_mm) == "motion_module_sdxl"
    lora = {"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor"
            ".to_q_lora.down.weight": torch.zeros(4, 32)}
    assert checkpoint.detect_format(lora) == "motion_lora"
    assert checkpoint.detect_format({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}) \
        == "lora"
    svd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
           "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight": torch.zeros(1)}
    assert checkpoint.detect_format(svd) == "svd"
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}
    assert checkpoint.detect_format(sdxl) == "sdxl"


_UNET = "model.diffusion_model."
_TO_K = _UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.mark.parametrize("keys,expected", [
    # SDXL LoRAs: kohya's two text encoders, and diffusers' second text encoder alone
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 8)}, "sdxl_lora"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 8)}, "sdxl_lora"),
    # an SDXL LoRA in diffusers' attention-processor layout is SDXL, not the SD1.5 adapter layout
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": (4, 640),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": (4, 1280)},
     "sdxl_lora"),
    # diffusers / peft LoRA keys
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 8)}, "lora"),
    # SD2.x: a 1024-wide cross-attention context, or OpenCLIP's text encoder; SD1.5's is 768 wide
    ({_UNET + "input_blocks.0.0.weight": (8, 4, 3, 3), _TO_K: (8, 1024)}, "sd2"),
    ({_UNET + "input_blocks.0.0.weight": (8, 4, 3, 3), _TO_K: (8, 768)}, "sd15"),
    ({_UNET + "input_blocks.0.0.weight": (8, 4, 3, 3),
      "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8)}, "sd2"),
    # SDXL's UNet alone (no conditioner): its label embedding
    ({_UNET + "input_blocks.0.0.weight": (8, 4, 3, 3), _UNET + "label_emb.0.0.weight": (8, 16)}, "sdxl"),
    # ControlNets: the LDM layout and the bare one (no control_model. prefix)
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "controlnet"),
    ({"input_hint_block.0.weight": (16, 3, 3, 3), "input_blocks.0.0.weight": (8, 4, 3, 3)}, "controlnet"),
    # a VAE has both halves; an encoder alone is nothing a loader takes
    ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3)}, "vae"),
    ({"encoder.conv_in.weight": (8, 3, 3, 3)}, "unknown"),
    # CLIP vision: transformers' layout and OpenCLIP's
    ({"vision_model.embeddings.class_embedding": (8,)}, "clip_vision"),
    ({"visual.class_embedding": (8,), "visual.conv1.weight": (8, 3, 14, 14)}, "clip_vision"),
])
def test_detect_format_by_published_keys(keys, expected):
    assert checkpoint.detect_format({k: torch.zeros(shape) for k, shape in keys.items()}) == expected


@pytest.mark.parametrize("kind,match", [
    ("sdxl_mm", "SDXL motion modules are not supported"),
    ("lora", "is a LoRA, not an AnimateDiff motion module"),
    ("sd15", "is an SD1.5 checkpoint, not an AnimateDiff motion module"),
    ("sparsectrl", "is an AnimateDiff SparseCtrl model .*not an AnimateDiff motion module.*ControlNet"),
])
def test_motion_loader_refuses_other_files(tmp_path, motion_sd, kind, match):
    if kind == "sdxl_mm":
        sd = {k: v for k, v in motion_sd.items() if not k.startswith(("down_blocks.3.", "up_blocks.3."))}
    elif kind == "sparsectrl":  # v3_sd15_sparsectrl_*.ckpt: a diffusers-named ControlNet holding motion modules
        sd = {**{k: v for k, v in motion_sd.items() if k.startswith("down_blocks.")},
              "controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
              "controlnet_down_blocks.0.weight": torch.zeros(32, 32, 1, 1)}
    elif kind == "lora":
        sd = {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)}
    else:
        sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}
    path = tmp_path / f"{kind}.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=match):
        checkpoint.load_motion_module(str(path))


def test_checkpoint_loader_refuses_motion_module_and_svd(tmp_path, motion_sd):
    path = tmp_path / "mm.safetensors"
    save_file(motion_sd, str(path))
    with pytest.raises(KinemaError, match="'mm.safetensors' is an AnimateDiff motion module, not an SD1.5"):
        checkpoint.load_sd15(str(path))
    svd = tmp_path / "svd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.1.0.time_stack.in_layers.0.weight": torch.zeros(1)}, str(svd))
    with pytest.raises(KinemaError, match="Stable Video Diffusion checkpoint, not an SD1.5"):
        checkpoint.load_sd15(str(svd))


def test_incomplete_motion_module_names_the_missing_weight(tmp_path, motion_sd):
    sd = dict(motion_sd)
    sd.pop("up_blocks.1.motion_modules.2.temporal_transformer.proj_out.weight")
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match="missing 1 motion module weights.*up_blocks.1.motion_modules.2"):
        checkpoint.load_motion_module(str(path))


def test_build_on_meta_gives_the_model_weights_of_its_own(motion_sd):
    """The state dict's tensors may be the file's mapped pages: the model gets copies (one each, of the weights it
    uses), never the file's memory (``test_a_loaded_model_does_not_read_its_file_again``)."""
    from kinema.models.motion import MotionModuleSet, infer_motion_config

    module = checkpoint.build_on_meta(lambda: MotionModuleSet(infer_motion_config(motion_sd)), motion_sd, None,
                                      "motion module", "x")
    key = "down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"
    assert module.state_dict()[key].data_ptr() != motion_sd[key].data_ptr()
    assert torch.equal(module.state_dict()[key], motion_sd[key])
    assert not any(p.is_meta for p in module.parameters())


def test_build_on_meta_reshapes_only_across_unit_dimensions():
    """A 1x1 conv's weight stored as a linear one (VAE attention in some files) is the same numbers and is put into
    shape; a weight of the same size in another shape (transposed, or another layer's) is refused, not reshaped."""
    conv = checkpoint.build_on_meta(lambda: torch.nn.Conv2d(2, 3, 1), {"weight": torch.arange(6.).reshape(3, 2),
                                                                       "bias": torch.zeros(3)}, None, "VAE", "v")
    assert torch.equal(conv.weight, torch.arange(6.).reshape(3, 2, 1, 1))
    with pytest.raises(KinemaError, match=r"'v': VAE weight 'weight' has shape \(2, 3\), expected \(3, 2\)"):
        checkpoint.build_on_meta(lambda: torch.nn.Linear(2, 3), {"weight": torch.zeros(2, 3), "bias": torch.zeros(3)},
                                 None, "VAE", "v")


def test_demo_checkpoint_uses_the_published_key_names():
    """Names every real SD1.5 single file and motion module has (read off the published files)."""
    sd = demo.sd15_state_dict()
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "alphas_cumprod",
    ):
        assert key in sd, key
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[0] == 49408
    mm = demo.motion_state_dict("v2")
    for key in (
        "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
        "down_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe",
        "up_blocks.0.motion_modules.2.temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.3.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_out.0.bias",
        "mid_block.motion_modules.0.temporal_transformer.proj_out.weight",
        "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.ff_norm.weight",
    ):
        assert key in mm, key
    per_module = [k for k in mm if k.startswith("down_blocks.0.motion_modules.0.")]
    assert len(per_module) == 28  # as in the published files


@pytest.mark.parametrize("dropped", [
    "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
    "down_blocks.0.motion_modules.1.temporal_transformer.norm.weight",
    "mid_block.motion_modules.0.temporal_transformer.norm.weight",
])
def test_motion_module_missing_a_norm_is_refused_not_loaded_smaller(tmp_path, motion_sd, dropped):
    """The structure is read off every key of a module, so one missing weight is named, never a smaller network."""
    sd = {k: v for k, v in motion_sd.items() if k != dropped}
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=f"missing 1 motion module weights.*'{dropped}'.*download it again"):
        checkpoint.load_motion_module(str(path))


def test_motion_module_missing_a_whole_module_or_with_extra_weights_is_refused(tmp_path, motion_sd):
    gone = "down_blocks.1.motion_modules.0."
    path = tmp_path / "gap.safetensors"
    save_file({k: v for k, v in motion_sd.items() if not k.startswith(gone)}, str(path))
    with pytest.raises(KinemaError, match="no weights for 'down_blocks.1.motion_modules.0'.*download it again"):
        checkpoint.load_motion_module(str(path))
    for extra in ("down_blocks.0.motion_modules.0.temporal_transformer.extra.weight", "stray.weight"):
        path = tmp_path / "extra.safetensors"
        save_file({**motion_sd, extra: torch.zeros(3)}, str(path))
        with pytest.raises(KinemaError, match=f"1 weights the motion module does not use.*'{extra}'.*download it"):
            checkpoint.load_motion_module(str(path))


@pytest.mark.parametrize("change,match", [
    ("drop", r"'te.safetensors': the CLIP text encoder weights lack 'encoder.layers.0.mlp.fc1.weight'"),
    ("int", r"'te.safetensors': the CLIP text encoder weight '.*fc1.weight' holds int32 values where the model has "
            r"floating-point ones"),
])
def test_the_text_encoders_errors_name_the_file(tmp_path, change, match):
    sd = dict(demo.sd15_state_dict())
    key = next(k for k in sd if k.startswith("cond_stage_model.") and k.endswith("layers.0.mlp.fc1.weight"))
    if change == "drop":
        del sd[key]
    else:
        sd[key] = sd[key].to(torch.int32)
    path = tmp_path / "te.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=match):
        checkpoint.load_sd15(str(path))


@pytest.mark.parametrize("dropped,cause", [
    ("model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight", AttributeError),
    ("first_stage_model.encoder.down.0.block.0.conv1.weight", IndexError),
])
def test_malformed_checkpoint_is_named_damaged_not_a_raw_error(tmp_path, dropped, cause):
    """Config inference on a damaged file fails inside unet.py / vae.py: the loader names the file and the fix."""
    sd = {k: v for k, v in demo.sd15_state_dict().items() if k != dropped}
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match=r"'broken.safetensors' is damaged or not an SD1.5 checkpoint: download it "
                                          r"again \(" + cause.__name__) as info:
        checkpoint.load_sd15(str(path))
    assert isinstance(info.value.__cause__, cause)


def test_damaged_file_passes_kinema_errors_and_wraps_raw_ones():
    with pytest.raises(KinemaError, match="^own$"), checkpoint.damaged_file("x.ckpt", "a VAE"):
        raise KinemaError("own")
    with pytest.raises(KinemaError, match=r"'x.ckpt' is damaged or not a VAE: download it again \(TypeError: t\)"), \
            checkpoint.damaged_file("x.ckpt", "a VAE"):
        raise TypeError("t")


def _raw_safetensors(path, header: bytes, data: bytes = b"\0" * 16):
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize("header,match", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": "x"}', "entry 'b' is not a tensor"),
    (b'[1, 2]', "not a JSON object"),
    (b'"text"', "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}', "entry 'a' is not a tensor"),
    (b'{"a": {"dtype": "F32", "shape": [1]}}', "entry 'a' is not a tensor"),
])
def test_safetensors_header_with_bad_entries_is_damaged(tmp_path, header, match):
    path = _raw_safetensors(tmp_path / "odd.safetensors", header)
    with pytest.raises(KinemaError, match=f"'odd.safetensors' has a corrupt safetensors header.*{match}.*download"):
        checkpoint.load_state_dict(path)


def test_safetensors_string_metadata_is_fine(tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file({"x": torch.ones(2)}, str(path), metadata={"format": "pt", "note": "hello"})
    assert torch.equal(checkpoint.load_state_dict(str(path))["x"], torch.ones(2))


@pytest.mark.parametrize("content,match", [
    (b"", "is empty \\(0 bytes\\).*download it again"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1716\n", "is a Git LFS pointer.*not the model"),
    (b"\n<!DOCTYPE html><html><body>Sign in</body></html>", "is a web page \\(HTML\\).*download the file again"),
    (bytes(range(7, 207)), "is not a PyTorch checkpoint \\(neither a zip archive nor a pickle\\).*download it again"),
    (b"\x80\x02" + bytes(range(30, 230)), "is not a PyTorch checkpoint Kinema can read.*damaged.*Download it again"),
])
def test_ckpt_that_is_not_a_checkpoint_says_what_it_is(tmp_path, content, match):
    """Only a real pickle with disallowed globals gets the could-run-code message; the rest say download again."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(KinemaError, match=f"'model.ckpt' {match}") as info:
        checkpoint.load_state_dict(str(path))
    assert "could run code" not in str(info.value)


def test_ip_adapter_given_to_other_loaders_is_named_with_its_node(tmp_path):
    from kinema.models import controlnet, lora

    sd = demo.ip_adapter_state_dict()
    assert checkpoint.detect_format(sd) == "ip_adapter"
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(sd, str(path))
    hint = r"is an IP-Adapter, not .* It belongs in models/ipadapter with the Load IP-Adapter \(Kinema\) node"
    for load in (checkpoint.load_sd15, lora.load_sd15_lora, controlnet.load_controlnet, checkpoint.load_motion_module):
        with pytest.raises(KinemaError, match=f"'ip-adapter_sd15.safetensors' {hint}"):
            load(str(path))


def test_damaged_legacy_pickle_is_named_whatever_the_unpickler_trips_on(tmp_path, motion_sd):
    """Damaged legacy pickles make torch's safe unpickler raise IndexError, KeyError or AssertionError: each is the
    file's own KinemaError, never a raw error."""
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80d\x86\x95(zt\x17\xef\xe93\xf7e\x14\xde\x08")  # IndexError inside torch.load
    with pytest.raises(KinemaError, match="could not read 'bad.pt'.*download it again"):
        checkpoint.load_state_dict(str(path))
    torch.save(motion_sd, str(path), _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    for _ in range(40):  # flipped bytes in the pickle stream
        damaged = bytearray(data)
        for i in rng.integers(2, 400, size=3):
            damaged[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            checkpoint.load_state_dict(str(path))
        except KinemaError:
            pass


def test_inpainting_checkpoint_is_refused_at_load(tmp_path):
    """A 9-channel (inpainting) UNet is named at load, not left to fail inside the sampler."""
    sd = dict(demo.sd15_state_dict())
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.cat([sd[key], torch.zeros(sd[key].shape[0], 5, *sd[key].shape[2:])], dim=1)
    path = tmp_path / "inpaint.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match="'inpaint.safetensors' is an inpainting SD1.5 checkpoint .*takes 9 latent "
                                          "channels, gives 4"):
        checkpoint.load_sd15(str(path))


def test_motion_module_without_the_third_module_of_every_up_block_is_refused(tmp_path, motion_sd):
    """Every up block's last module gone still reads as a consistent layout (two a block): the SD1.5 layout says
    three, so the file is refused rather than run as a smaller network."""
    sd = {k: v for k, v in motion_sd.items() if ".motion_modules.2." not in k}
    path = tmp_path / "no_up2.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match="2 motion modules an up block.*has 3 and 2.*download it again"):
        checkpoint.load_motion_module(str(path))


def test_an_unrecognised_file_gets_a_next_step(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
              str(path))
    with pytest.raises(KinemaError, match="is an unrecognised model, not an SD1.5 checkpoint. It looks like one part "
                                          "of a diffusers folder.*single-file checkpoint"):
        checkpoint.load_sd15(str(path))
    save_file({"some.weight": torch.zeros(2)}, str(path))
    with pytest.raises(KinemaError, match="unrecognised model.*Check that the download is the model file itself"):
        checkpoint.load_sd15(str(path))


def test_sd15_parts_load_in_their_own_precision(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file(demo.sd15_state_dict(), str(path))
    bundle = checkpoint.load_sd15(str(path), dtype=torch.float16, vae_dtype=torch.float32, text_dtype=torch.bfloat16)
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    assert bundle.clip.dtype == torch.bfloat16
    assert {p.dtype for p in checkpoint.load_sd15(str(path), dtype=torch.float16).vae.parameters()} == {torch.float16}


def test_vae_attention_stored_as_linear_weights_loads(tmp_path):
    """Checkpoints converted from diffusers hold the VAE's attention q/k/v/proj_out as [c, c] linear weights, not
    [c, c, 1, 1] convolutions: the same numbers, loaded as the convolutions."""
    sd = demo.sd15_state_dict()
    attn = [k for k in sd if ".mid.attn_1." in k and k.endswith(".weight") and sd[k].dim() == 4]
    assert len(attn) == 8  # q, k, v, proj_out of the encoder's and the decoder's mid block
    linear = {**sd, **{k: sd[k][:, :, 0, 0].clone() for k in attn}}
    path = tmp_path / "linear_attn.safetensors"
    save_file(linear, str(path))
    vae = checkpoint.load_sd15(str(path)).vae.state_dict()
    for k in attn:
        assert torch.equal(vae[k.removeprefix("first_stage_model.")], sd[k])


def test_svd_without_a_conditioning_encoder_encodes_with_its_first_stage(tmp_path):
    """A pruned SVD file without sgm's conditioning-frame encoder (``conditioner.embedders.3.*``): the frames are
    encoded with the first stage's encoder, which has no quant_conv."""
    from kinema.models.vae import SVD_COND_ENCODER_PREFIX

    sd = {k: v for k, v in demo.svd_state_dict().items() if not k.startswith(SVD_COND_ENCODER_PREFIX)}
    path = tmp_path / "svd_pruned.safetensors"
    save_file(sd, str(path))
    vae = checkpoint.load_svd(str(path)).vae
    assert vae.cfg.quant_conv is False
    full = tmp_path / "svd.safetensors"
    save_file(demo.svd_state_dict(), str(full))
    assert checkpoint.load_svd(str(full)).vae.cfg.quant_conv is True


def test_wrapped_state_dicts_are_unwrapped():
    t = torch.zeros(2)
    assert checkpoint.unwrap_state_dict({"module": {"a": t}, "epoch": 1}).keys() == {"a"}  # DeepSpeed's layout
    assert checkpoint.unwrap_state_dict({"state_dict": {"state_dict": {"a": t}}}).keys() == {"a"}
    assert checkpoint.unwrap_state_dict({"state_dict": {"module": {"a": t}, "step": 3}}).keys() == {"a"}
    # a "module" beside more than a couple of other entries is a part of the model, not a wrapper
    many = {"module": {"w": t}, "a": t, "b": t, "c": t}
    assert checkpoint.unwrap_state_dict(many).keys() == {"a", "b", "c"}


def test_an_svd_unet_or_vae_saved_alone_is_named_a_part(tmp_path):
    for name, key in [("svd_unet.safetensors", "input_blocks.1.0.time_stack.in_layers.2.weight"),
                      ("svd_vae.safetensors", "decoder.up.0.block.0.time_stack.in_layers.2.weight")]:
        save_file({key: torch.zeros(2, 2)}, str(tmp_path / name))
        with pytest.raises(KinemaError, match=f"'{name}' holds parts of a Stable Video Diffusion model .* no UNet"):
            checkpoint.load_svd(str(tmp_path / name))


def test_a_motion_module_saved_from_a_ddp_wrapper_loads(tmp_path, motion_sd):
    """Training scripts under DistributedDataParallel save every key behind "module."."""
    save_file({f"module.{k}": v for k, v in motion_sd.items()}, str(tmp_path / "ddp.safetensors"))
    save_file(motion_sd, str(tmp_path / "plain.safetensors"))
    a = checkpoint.load_motion_module(str(tmp_path / "ddp.safetensors")).state_dict()
    b = checkpoint.load_motion_module(str(tmp_path / "plain.safetensors")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- headers, extensions and errors that pass through -------------------------------------------------------------

@pytest.mark.parametrize("offsets", [b"[-4, 4]", b"[false, 4]", b"[4]", b"[0, 4, 8]"])
def test_safetensors_data_offsets_must_be_two_whole_numbers_from_zero(tmp_path, offsets):
    """An entry's data_offsets are exactly two non-negative integers (a JSON false is no 0): anything else is the
    header's damage named, not safetensors' own error or an IndexError from reading the end offset."""
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ' + offsets + b"}}"
    path = _raw_safetensors(tmp_path / "odd.safetensors", header)
    with pytest.raises(KinemaError, match=r"^'odd\.safetensors' has a corrupt safetensors header \(its entry 'a' is "
                                          r"not a tensor description\): the file is damaged, download it again$"):
        checkpoint.load_state_dict(path)


def test_safetensors_header_length_past_100_mib_or_past_the_file_is_named(tmp_path):
    """A header length over 100 MiB is a bad header, not a file cut short (a large checkpoint's header is a few
    hundred KB: no download is that far from done); a file cut within its header's last 8 bytes is named truncated,
    not a header that fails to parse."""
    import struct

    big = tmp_path / "big.safetensors"
    big.write_bytes(struct.pack("<Q", 2**30) + b"{}" * 10)
    with pytest.raises(KinemaError, match=r"^'big\.safetensors' is not a valid safetensors file \(bad header "
                                          r"length\)$"):
        checkpoint.load_state_dict(str(big))
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.ones(10)}, str(path))
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:end - 5])
    with pytest.raises(KinemaError, match=rf"^'cut\.safetensors' is truncated: {end - 5} bytes on disk, its header "
                                          rf"alone is {end}\. Download the file again\.$"):
        checkpoint.load_state_dict(str(path))


def test_running_out_of_memory_while_loading_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """Out of memory in torch.load or in building a model passes as itself (ComfyUI frees memory on it), never as
    'download it again', which would send the user after a file that is fine."""
    path = tmp_path / "model.ckpt"
    torch.save({"a": torch.ones(3)}, str(path))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def load(*args, **kwargs):
        raise oom

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(torch.OutOfMemoryError) as info:
        checkpoint.load_state_dict(str(path))
    assert info.value is oom
    with pytest.raises(torch.OutOfMemoryError) as info, checkpoint.damaged_file("x.safetensors", "a VAE"):
        raise oom
    assert info.value is oom


def test_upper_case_and_sft_extensions_load(tmp_path):
    """Extensions are matched in any case, and ``.sft`` is safetensors (as ComfyUI's ``load_torch_file`` reads)."""
    sd = {"a": torch.arange(3.0)}
    for name in ("model.sft", "MODEL.SafeTensors", "model.SFT"):
        save_file(sd, str(tmp_path / name))
    torch.save(sd, str(tmp_path / "model.CKPT"))
    for name in ("model.sft", "MODEL.SafeTensors", "model.SFT", "model.CKPT"):
        loaded = checkpoint.load_state_dict(str(tmp_path / name))
        assert loaded.keys() == {"a"} and torch.equal(loaded["a"], sd["a"]), name


# -- formats ------------------------------------------------------------------------------------------------------

def test_svd_is_known_by_its_time_mixer_keys_too():
    """sgm's video UNet blends its spatial and temporal paths with ``time_mixer`` weights: beside a conditioner
    they make the file SVD, as ``time_stack`` does; without either it is SDXL."""
    sdxl = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1),
            _UNET + "input_blocks.0.0.weight": torch.zeros(1)}
    assert checkpoint.detect_format(sdxl) == "sdxl"
    svd = {**sdxl, _UNET + "input_blocks.1.1.time_mixer.mix_factor": torch.zeros(1)}
    assert checkpoint.detect_format(svd) == "svd"


def test_an_sd_lora_is_not_taken_for_a_motion_lora():
    """One wanted format is compared whole: an SD LoRA ("lora", a part of "motion_lora") is refused where a
    MotionLoRA is wanted, with where it belongs."""
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(KinemaError, match=r"^'x\.safetensors' is a LoRA, not an AnimateDiff MotionLoRA\. It belongs in "
                                          r"models/loras with the Load LoRA \(Kinema\) node\.$"):
        checkpoint.expect_format(sd, "motion_lora", "x.safetensors", "an AnimateDiff MotionLoRA")
    checkpoint.expect_format(sd, ("motion_lora", "lora"), "x.safetensors", "a LoRA")  # one of several: accepted


# -- building -----------------------------------------------------------------------------------------------------

def test_build_on_meta_casts_only_floating_tensors_and_returns_eval_mode():
    """``dtype`` casts the weights, not integer buffers (indices, step counts); the model comes back in eval mode
    (dropout off) with no gradients."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)
            self.register_buffer("ids", torch.zeros(4, dtype=torch.int64))

    sd = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2), "ids": torch.arange(4)}
    net = checkpoint.build_on_meta(Net, sd, torch.float16, "test net", "n")
    assert net.lin.weight.dtype == torch.float16 and net.ids.dtype == torch.int64
    assert torch.equal(net.ids, torch.arange(4))
    assert not net.training and not net.drop.training and not net.lin.weight.requires_grad


def test_unet_weights_a_checkpoint_has_beyond_its_structure_are_named_in_the_log(tmp_path, caplog):
    """A UNet whose structure was read too small (here a second transformer block the config does not know) loads,
    as ComfyUI loads it, and the log names what was left out, instead of a silently worse video; a file with
    nothing left over logs nothing."""
    sd = dict(demo.sd15_state_dict())
    path = tmp_path / "ok.safetensors"
    save_file(sd, str(path))
    with caplog.at_level("WARNING", logger="kinema"):
        checkpoint.load_sd15(str(path))
    assert "left out" not in caplog.text
    extra = "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight"
    sd[extra] = sd[extra.replace("blocks.1.attn1", "blocks.0.attn1")].clone()
    save_file(sd, str(tmp_path / "deeper.safetensors"))
    with caplog.at_level("WARNING", logger="kinema"):
        checkpoint.load_sd15(str(tmp_path / "deeper.safetensors"))
    assert ("'deeper.safetensors': 1 UNet weight(s) that the structure read from the file does not use were left "
            "out (first: 'input_blocks.1.1.transformer_blocks.1.attn1.to_q.weight')") in caplog.text


def test_a_unet_that_gives_other_than_4_latent_channels_is_refused_at_load(tmp_path):
    """4 latent channels in but 8 out (a learned-variance UNet) is no standard SD1.5 checkpoint either."""
    sd = dict(demo.sd15_state_dict())
    for key in ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"):
        sd[key] = torch.cat([sd[key], sd[key]], dim=0)
    path = tmp_path / "eight_out.safetensors"
    save_file(sd, str(path))
    with pytest.raises(KinemaError, match="'eight_out.safetensors' is a special-purpose SD1.5 checkpoint .*takes 4 "
                                          "latent channels, gives 8"):
        checkpoint.load_sd15(str(path))


def test_an_sd15_checkpoint_without_its_vae_or_text_encoder_is_named_incomplete(tmp_path):
    sd = demo.sd15_state_dict()
    path = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(KinemaError, match="'unet_only.safetensors' has no VAE .*not a full SD1.5 checkpoint"):
        checkpoint.load_sd15(str(path))
    save_file({k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}, str(path))
    with pytest.raises(KinemaError, match="'unet_only.safetensors' has no CLIP text encoder"):
        checkpoint.load_sd15(str(path))


def test_an_svd_conditioning_encoder_of_another_shape_than_its_vae_encoder_is_refused(tmp_path):
    from kinema.models.vae import SVD_COND_ENCODER_PREFIX

    sd = demo.svd_state_dict()
    down = f"{SVD_COND_ENCODER_PREFIX}encoder.down."
    last = max(int(k[len(down):].split(".")[0]) for k in sd if k.startswith(down))
    path = tmp_path / "svd_mixed.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith(f"{down}{last}.")}, str(path))
    with pytest.raises(KinemaError, match="'svd_mixed.safetensors': the conditioning encoder and the VAE encoder "
                                          "have different shapes"):
        checkpoint.load_svd(str(path))


def test_the_demo_tensors_do_not_depend_on_the_processs_string_hashing():
    """The demo files are the same on every machine and in every process (a key's seed is no ``hash()``, which
    Python salts per process)."""
    import subprocess

    code = ("import conftest\nfrom kinema.models import demo\n"
            "print(demo._fill('model.diffusion_model.out.2.weight', (3, 4), 0).tolist())")
    here = os.path.dirname(os.path.abspath(__file__))
    outs = {subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outs) == 1 and outs.pop().strip() == str(demo._fill("model.diffusion_model.out.2.weight", (3, 4), 0)
                                                        .tolist())


def test_current_demo_files_are_kept_and_the_others_written_again(tmp_path):
    """The demo files are written once: kept while they are this version's, written again when asked
    (``overwrite``) or when a part of the depth folder is missing."""
    paths = demo.write_demo_models(str(tmp_path))
    files = [p for key, p in paths.items() if key != "depth_model"]
    files += [os.path.join(paths["depth_model"], name) for name in ("model.safetensors", "preprocessor_config.json")]
    for p in files:
        os.utime(p, ns=(0, 0))
    config = os.path.join(paths["depth_model"], "config.json")
    os.remove(config)
    assert demo.write_demo_models(str(tmp_path)) == paths
    assert os.path.isfile(config)
    assert [os.stat(p).st_mtime_ns for p in files[:-2]] == [0] * (len(files) - 2)  # current: kept
    for p in files:
        os.utime(p, ns=(0, 0))
    demo.write_demo_models(str(tmp_path), overwrite=True)
    assert [p for p in files if os.stat(p).st_mtime_ns == 0] == []
