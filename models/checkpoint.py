"""Safe checkpoint loading, format detection by key sniffing, and building models from files.

- ``.safetensors`` is read with safetensors (header checked first, so a truncated
  file is named as such); ``.ckpt/.pt/.pth/.bin`` only through
  ``torch.load(weights_only=True)``, so a pickle that would run code is refused. The training state that
  legacy checkpoints carry beside their weights (a PyTorch Lightning ``ModelCheckpoint`` callback, numpy step
  counters and metrics) is let through that loader as inert values (``training_state_globals``).
- ``state_dict`` wrappers are unwrapped, non-tensor entries dropped.
- Models are built on the meta device from a config inferred from the shapes,
  then the file's tensors are assigned (no second copy of the weights in RAM).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import KinemaError, is_out_of_memory

logger = logging.getLogger("kinema")

TENSOR_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def _check_safetensors_header(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise KinemaError(f"'{os.path.basename(path)}' is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise KinemaError(f"'{os.path.basename(path)}' is not a valid safetensors file (bad header length)")
        if n > size - 8:  # cut off inside its header (a large checkpoint's header is a few hundred KB)
            raise KinemaError(f"'{os.path.basename(path)}' is truncated: {size} bytes on disk, its header alone is "
                              f"{8 + n}. Download the file again.")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise KinemaError(f"'{os.path.basename(path)}' has a corrupt safetensors header: the file is damaged, "
                              "download it again") from e
    end = 0
    for key, entry in header.items() if isinstance(header, dict) else [(None, header)]:
        if key == "__metadata__":  # free-form (a dict of strings)
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            what = f"its entry '{key}' is not a tensor description" if key is not None else "not a JSON object"
            raise KinemaError(f"'{os.path.basename(path)}' has a corrupt safetensors header ({what}): the file is "
                              "damaged, download it again")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise KinemaError(
            f"'{os.path.basename(path)}' is truncated: {size} bytes on disk, {8 + n + end} expected. "
            "Download the file again."
        )


def _last_line(e: Exception) -> str:
    """The telling line of a long torch.load message (its last non-empty line that is not a documentation link)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "documentation" not in ln]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _check_pickle_container(path: str) -> None:
    """Refuse a .ckpt/.pt/.pth/.bin that cannot be a PyTorch checkpoint, saying what it is instead: empty, a Git LFS
    pointer, a web page, or neither a zip archive (torch.save) nor a pickle (the legacy format)."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise KinemaError(f"'{name}' is empty (0 bytes): the download did not finish; download it again")
    if head.startswith(b"PK"):  # a zip archive: torch.save's format (checked entry by entry afterwards)
        return
    if head.startswith(b"version https://git-lfs"):
        raise KinemaError(f"'{name}' is a Git LFS pointer (a small text file standing for the model), not the model: "
                          "download the real file (its download link, or 'git lfs pull' in the cloned repository)")
    if head.lstrip().startswith(b"<"):
        raise KinemaError(f"'{name}' is a web page (HTML), not a model: the download saved an error or login page; "
                          "download the file again from its direct download link")
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path):
        raise KinemaError(f"'{name}' is a safetensors file under a {os.path.splitext(name)[1]} name: rename it to "
                          f"'{os.path.splitext(name)[0]}.safetensors'")
    if not head.startswith(b"\x80"):  # every pickle protocol >= 2 (torch.save's legacy format) starts so
        raise KinemaError(f"'{name}' is not a PyTorch checkpoint (neither a zip archive nor a pickle): the file is "
                          "damaged or another kind of file saved under this name; download it again")


class _DroppedTrainingState:
    """Stands in for a training-state object pickled beside the weights (a PyTorch Lightning callback): built
    without its class's code, its state dropped."""

    def __setstate__(self, state) -> None:
        pass


def training_state_globals() -> list:
    """The globals legacy checkpoints pickle beside their tensors that ``torch.load(weights_only=True)`` may rebuild
    without running any code: Lightning's ``ModelCheckpoint`` callback (as ``_DroppedTrainingState``, so Lightning
    need not be installed), numpy scalars (saved metrics and step counters, under numpy 1's and numpy 2's module
    names), numpy dtypes and their classes, and ``_codecs.encode`` (pickle protocol 2's bytes)."""
    import _codecs

    import numpy as np

    scalar = np.array(0.0)[()].__reduce__()[0]  # numpy's multiarray.scalar, wherever this numpy keeps it
    allowed = [(_DroppedTrainingState, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
               (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               np.dtype, _codecs.encode]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: every dtype instance is of a class of its own
    if dtypes is not None:
        classes = (getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
        allowed += [c for c in classes if isinstance(c, type)]
    return allowed


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file safely; raise KinemaError naming the file and the fix."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise KinemaError(f"model file not found: {path}")
    lower = path.lower()
    if lower.endswith(TENSOR_EXTENSIONS):
        _check_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise KinemaError(f"could not read '{name}' as safetensors: {e}") from e
    elif lower.endswith(PICKLE_EXTENSIONS):
        _check_pickle_container(path)
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                raise KinemaError(f"'{name}' is damaged or truncated ({e}): download it again") from e
            if bad is not None:
                raise KinemaError(f"'{name}' is damaged (bad entry {bad}): download it again")
        try:
            with torch.serialization.safe_globals(training_state_globals()):
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            if "GLOBAL" not in str(e):  # not a class or function the safe unpickler refuses: broken pickle data
                raise KinemaError(
                    f"'{name}' is not a PyTorch checkpoint Kinema can read: its pickle data is damaged or in a form "
                    f"the safe loader does not read ({_last_line(e)}). Download it again, or use a .safetensors "
                    "version of this model."
                ) from e
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise KinemaError(
                f"'{name}' holds Python objects other than tensors{f' ({found.group(1)})' if found else ''}, which "
                "Kinema will not unpickle (they could run code). Use a .safetensors version of this model, or "
                "convert it on a machine you trust."
            ) from e
        except Exception as e:  # damaged pickle data raises whatever the unpickler trips on (IndexError, KeyError)
            if is_out_of_memory(e):
                raise
            raise KinemaError(f"could not read '{name}': {str(e) or type(e).__name__}. The file may be truncated: "
                              "download it again.") from e
    else:
        raise KinemaError(
            f"'{name}' is not a model file Kinema reads: use .safetensors (or .ckpt/.pt/.pth holding only tensors)"
        )
    return unwrap_state_dict(sd, name)


def own_copies(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict's tensors as copies in memory of their own, for the small files a node's output keeps as
    tensors (LoRAs, embeddings). ``load_state_dict`` gives tensors that read the file's pages (safetensors and
    ``torch.load(mmap=True)`` map it): a file rewritten in place later (a download over it) would change what
    ComfyUI keeps between runs, and one truncated would kill the process at its next read (SIGBUS). The models
    get copies where they are built (``build_on_meta``), of the weights they use only."""
    return {k: v.clone() for k, v in sd.items()}


def unwrap_state_dict(sd, name: str = "the file") -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``module`` wrappers and keep only tensors (a dict of dicts of tensors, as IP-Adapter's
    ``.bin``, is flattened to ``outer.inner`` keys)."""
    for _ in range(3):
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        elif isinstance(sd, dict) and "module" in sd and isinstance(sd["module"], dict) and len(sd) <= 3:
            sd = sd["module"]
    if not isinstance(sd, dict):
        raise KinemaError(f"{name} does not hold a state dict (found {type(sd).__name__})")
    out = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:  # nested parts, as IP-Adapter's .bin {"image_proj": {...}, "ip_adapter": {...}}: "part.key"
        out = {f"{part}.{k}": v for part, sub in sd.items() if isinstance(part, str) and isinstance(sub, dict)
               for k, v in sub.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise KinemaError(f"{name} holds no tensors")
    return out


# -- format detection -------------------------------------------------------------------------------------------

def detect_format(sd: dict) -> str:
    """Name the kind of model a state dict holds (key sniffing).

    One of: ``sd15``, ``sd2``, ``sdxl``, ``svd``, ``motion_module``, ``motion_module_sdxl``, ``motion_lora``,
    ``hotshotxl`` (HotshotXL's temporal layers, ``...temporal_attentions.j...``),
    ``sparsectrl`` (AnimateDiff's SparseCtrl: a ControlNet with motion modules), ``lora`` (an SD LoRA in the kohya /
    LDM / diffusers-peft layouts; whether it fits SD1.5 is checked against the
    model's shapes when applied), ``sd15_adapter_lora`` (an SD1.5 UNet LoRA in the diffusers attention-processor
    layout, like the AnimateDiff v3 adapter), ``sdxl_lora``, ``controlnet``, ``ip_adapter``, ``vae``, ``clip_vision``,
    ``unknown``.
    """
    keys = sd.keys()
    if any(".motion_modules." in k for k in keys):
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            return "sparsectrl"
        if any("lora" in k for k in keys):
            return "motion_lora"
        if not any(k.startswith("down_blocks.3.") for k in keys):
            return "motion_module_sdxl"
        return "motion_module"
    if any(".temporal_attentions." in k for k in keys):  # HotshotXL's temporal layers (SDXL)
        return "hotshotxl"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl_lora"
    if any(".processor." in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in keys):
        return "sd15_adapter_lora"
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_down." in k or ".lora_up." in k
           or "_lora.down." in k or ".lora_A." in k or ".lora.down." in k or ".lora_linear_layer.down." in k
           or k.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders."))
           and k.endswith((".diff", ".diff_b")) for k in keys):
        return "lora"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if any(".time_stack." in k or "time_mixer" in k for k in keys):
            return "svd"
        return "sdxl"
    if any(".time_stack." in k for k in keys):
        return "svd"
    if "model.diffusion_model.input_blocks.0.0.weight" in sd:
        if "model.diffusion_model.label_emb.0.0.weight" in sd:
            return "sdxl"
        k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if k in sd and sd[k].shape[1] == 1024:
            return "sd2"
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd2"
        return "sd15"
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in keys):
        return "controlnet"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "ip_adapter"
    if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd:
        return "vae"
    if any(k.startswith(("vision_model.", "visual.")) for k in keys):
        return "clip_vision"
    return "unknown"


FORMAT_NAMES = {
    "sd15": "an SD1.5 checkpoint",
    "sd2": "an SD2.x checkpoint",
    "sdxl": "an SDXL checkpoint",
    "svd": "a Stable Video Diffusion checkpoint",
    "motion_module": "an AnimateDiff motion module",
    "motion_module_sdxl": "an SDXL AnimateDiff motion module",
    "motion_lora": "an AnimateDiff MotionLoRA",
    "hotshotxl": "a HotshotXL temporal-layers file (a motion model for SDXL)",
    "sparsectrl": "an AnimateDiff SparseCtrl model (a ControlNet with motion modules, for sparse keyframe hints)",
    "lora": "a LoRA",
    "sd15_adapter_lora": "an SD1.5 UNet LoRA in the diffusers attention-processor layout (like the AnimateDiff v3 "
                         "adapter v3_sd15_adapter.ckpt)",
    "sdxl_lora": "an SDXL LoRA",
    "controlnet": "a ControlNet",
    "ip_adapter": "an IP-Adapter",
    "vae": "a standalone VAE",
    "clip_vision": "a CLIP vision model",
    "unknown": "an unrecognised model",
}

FORMAT_HOME = {
    "sd15": "models/checkpoints with the Kinema checkpoint loader",
    "svd": "models/checkpoints with the Load SVD Checkpoint (Kinema) node",
    "motion_module": "models/animatediff_models with the Kinema motion-module loader",
    "motion_lora": "models/animatediff_motion_lora with the Load MotionLoRA (Kinema) node",
    "lora": "models/loras with the Load LoRA (Kinema) node",
    "sd15_adapter_lora": "models/loras with the Load LoRA (Kinema) node",
    "controlnet": "models/controlnet",
    "ip_adapter": "models/ipadapter with the Load IP-Adapter (Kinema) node",
    "vae": "models/vae",
    "clip_vision": "models/clip_vision",
}


def expect_format(sd: dict, wanted: str | tuple[str, ...], path: str, what: str) -> None:
    """Raise KinemaError naming the file, what it is and where it belongs unless its format is ``wanted``
    (one format name, or a tuple of accepted ones)."""
    found = detect_format(sd)
    if found == wanted or (isinstance(wanted, tuple) and found in wanted):
        return
    name = os.path.basename(path)
    where = FORMAT_HOME.get(found)
    hint = f" It belongs in {where}." if where else ""
    if found == "motion_module_sdxl":
        hint = " SDXL motion modules are not supported yet: use an SD1.5 motion module (v1, v2 or v3)."
    elif found == "hotshotxl":
        hint = " Kinema runs SD1.5 motion modules only: use an AnimateDiff SD1.5 motion module (v1, v2 or v3)."
    elif found == "sdxl_lora":
        hint = " Kinema runs SD1.5 models: use a LoRA made for SD1.5."
    elif found == "unknown":
        diffusers_unet = "conv_in.weight" in sd and any(k.startswith("down_blocks.") for k in sd)
        hint = (" It looks like one part of a diffusers folder (a UNet's diffusion_pytorch_model.safetensors): use "
                "the single-file checkpoint of the model (one .safetensors holding the UNet, VAE and text encoder)."
                if diffusers_unet else " Check that the download is the model file itself (.safetensors or .ckpt) "
                "and that it is made for SD1.5 / Stable Video Diffusion.")
    elif found == "sparsectrl":
        hint = (" Kinema does not run SparseCtrl yet: for hints on every frame use an SD1.5 ControlNet "
                "(models/controlnet) with Apply ControlNet (Kinema).")
    raise KinemaError(f"'{name}' is {FORMAT_NAMES[found]}, not {what}.{hint}")


# -- building -----------------------------------------------------------------------------------------------------

#: what reading a structure off malformed tensors raises (a key missing, a tensor of the wrong rank or dtype)
MALFORMED_ERRORS = (KeyError, IndexError, AttributeError, ValueError, TypeError, RuntimeError)


@contextmanager
def damaged_file(name: str, what: str):
    """Turn the raw errors that config inference and building raise on malformed tensors into a KinemaError:
    ``'<name>' is damaged or not <what>: download it again (<detail>)``, the original as ``__cause__``.
    A KinemaError passes unchanged; so does running out of memory."""
    try:
        yield
    except MALFORMED_ERRORS as e:
        if isinstance(e, KinemaError) or is_out_of_memory(e):
            raise
        detail = " ".join(str(e).split())[:200]
        detail = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise KinemaError(f"'{name}' is damaged or not {what}: download it again ({detail})") from e


def sub_state_dict(sd: dict, prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _same_but_unit_dims(a: torch.Size, b: torch.Size) -> bool:
    """Whether two shapes differ only by dimensions of size 1 (a linear weight [o, i] and a 1x1 conv's [o, i, 1, 1])."""
    return [n for n in a if n != 1] == [n for n in b if n != 1]


def build_on_meta(factory, sd: dict, dtype: torch.dtype | None, what: str, name: str,
                  strict: bool | str = False) -> nn.Module:
    """Make ``factory()`` on the meta device and assign the state dict's tensors (cast to dtype).

    ``strict``: also refuse a state dict holding weights the built module does not use (for files that hold one
    module and nothing else, as a motion module: an unused weight means the structure was read wrong off a damaged
    file); ``"warn"``: load, and say in the log which weights are left out (a UNet's part of a checkpoint, which
    ComfyUI loads the same way: a structure read too small shows there instead of as a worse video). Off by
    default: loaders pass sub-dicts of files with parts they deliberately leave out.
    """
    with torch.device("meta"):
        module = factory()
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise KinemaError(
            f"'{name}' is missing {len(missing)} {what} weights (first: '{missing[0]}'): the file is incomplete "
            "(download it again) or not the format its loader expects"
        )
    unused = [k for k in sd if k not in expected] if strict else []
    if unused and strict == "warn":
        logger.warning("'%s': %d %s weight(s) that the structure read from the file does not use were left out "
                       "(first: '%s')", name, len(unused), what, unused[0])
    elif unused:
        raise KinemaError(
            f"'{name}' has {len(unused)} weights the {what} does not use (first: '{unused[0]}'): the file is "
            "damaged or not the format its loader expects: download it again"
        )
    loaded = {}
    for k, ref in expected.items():
        t = sd[k]
        if t.shape != ref.shape:
            if _same_but_unit_dims(t.shape, ref.shape):  # e.g. VAE attention stored as linear, not 1x1 conv
                t = t.reshape(ref.shape)
            else:  # a transposed or mislaid weight of the same size included: never reshaped into place
                raise KinemaError(
                    f"'{name}': {what} weight '{k}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
                )
        if ref.is_floating_point() and not t.is_floating_point():
            raise KinemaError(f"'{name}': {what} weight '{k}' holds {str(t.dtype).removeprefix('torch.')} values "
                              "where the model has floating-point ones: the file is damaged or not this kind of "
                              "model; download it again")
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        else:  # a copy of its own, not the file's mapped pages (``own_copies``)
            t = t.clone()
        loaded[k] = t
    module.load_state_dict(loaded, strict=True, assign=True)
    return module.eval().requires_grad_(False)


@dataclass
class SD15Bundle:
    """The three parts of an SD1.5 single-file checkpoint."""

    unet: nn.Module
    vae: nn.Module
    clip: object
    name: str


def load_sd15(path: str, dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
              text_dtype: torch.dtype | None = None) -> SD15Bundle:
    """Load an SD1.5 single-file checkpoint into (UNet, VAE, CLIP text encoder); the VAE in ``vae_dtype`` and the
    text encoder in ``text_dtype`` where given, else in ``dtype``."""
    from .unet import UNetModel, infer_unet_config
    from .vae import AutoencoderKL, infer_vae_config

    name = os.path.basename(path)
    sd = load_state_dict(path)
    expect_format(sd, "sd15", path, "an SD1.5 checkpoint")
    unet_sd = sub_state_dict(sd, "model.diffusion_model.")
    vae_sd = sub_state_dict(sd, "first_stage_model.")
    if not any(k.startswith("cond_stage_model.transformer.") for k in sd):
        raise KinemaError(f"'{name}' has no CLIP text encoder ('cond_stage_model.transformer.*'): it is not a full "
                          "SD1.5 checkpoint")
    if not vae_sd:
        raise KinemaError(f"'{name}' has no VAE ('first_stage_model.*'): it is not a full SD1.5 checkpoint")
    from .encoders import TextEncoder

    with damaged_file(name, "an SD1.5 checkpoint"):
        ucfg = infer_unet_config(unet_sd)
        if ucfg.in_channels != 4 or ucfg.out_channels != 4:
            kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(ucfg.in_channels, "a special-purpose")
            raise KinemaError(f"'{name}' is {kind} SD1.5 checkpoint (its UNet takes {ucfg.in_channels} latent "
                              f"channels, gives {ucfg.out_channels}): Kinema animates standard text-to-image SD1.5 "
                              "checkpoints (4 latent channels); choose one of those")
        unet = build_on_meta(lambda: UNetModel(ucfg), unet_sd, dtype, "UNet", name, strict="warn")
        vcfg = infer_vae_config(vae_sd)
        vae = build_on_meta(lambda: AutoencoderKL(vcfg), vae_sd, vae_dtype or dtype, "VAE", name)
        try:
            clip = TextEncoder.from_state_dict(sd, prefix="cond_stage_model.transformer.", dtype=text_dtype or dtype)
        except KinemaError as e:  # the text encoder's errors name the weights, not the file
            raise KinemaError(f"'{name}': {e}") from e
    return SD15Bundle(unet=unet, vae=vae, clip=clip, name=name)


def load_motion_module(path: str, dtype: torch.dtype | None = None):
    """Load an AnimateDiff SD1.5 motion module (v1, v2 or v3) from its published layout or diffusers' (a
    ``MotionAdapter``'s weights, or a whole ``UNetMotionModel``'s, of which the motion modules are taken)."""
    from .motion import (
        MotionModuleSet,
        infer_motion_config,
        published_layout,
        with_positional_tables,
    )

    name = os.path.basename(path)
    sd = load_state_dict(path)
    sd = published_layout({k.removeprefix("module."): v for k, v in sd.items()})
    if "conv_in.weight" in sd and "time_embedding.linear_1.weight" in sd:
        sd = {k: v for k, v in sd.items() if ".motion_modules." in k}
        logger.info("'%s' is a whole diffusers UNetMotionModel: its motion modules are loaded, its UNet is not "
                    "(the UNet comes from the checkpoint loader)", name)
    expect_format(sd, "motion_module", path, "an AnimateDiff motion module")
    with damaged_file(name, "an AnimateDiff motion module"):
        cfg = infer_motion_config(sd, f"'{name}'")
        sd = with_positional_tables(sd, cfg, f"'{name}'")
        module = build_on_meta(lambda: MotionModuleSet(cfg), sd, dtype, "motion module", name, strict=True)
    module.source = name
    return module


SVD_UNET_PREFIX = "model.diffusion_model."
SVD_CLIP_VISION_PREFIX = "conditioner.embedders.0.open_clip.model.visual."


@dataclass
class SVDBundle:
    """The parts of a Stable Video Diffusion checkpoint: the model as the sampler sees it, the CLIP image
    encoder and the autoencoder (temporal decoder)."""

    model: object
    image_encoder: object
    vae: nn.Module
    name: str


def load_clip_vision(path: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """A CLIP vision file (models/clip_vision: transformers or open_clip layout, e.g. clip_vision_h.safetensors)
    as a ``clip_vision.ImageEncoder``."""
    from .clip_vision import load_image_encoder

    sd, name = load_state_dict(path), os.path.basename(path)
    with damaged_file(name, "a CLIP vision model"):
        return load_image_encoder(sd, None, dtype, name, device=device)


def load_svd(path: str, dtype: torch.dtype | None = None, vae_dtype: torch.dtype | None = None,
             clip_vision_path: str | None = None, device: torch.device | str = "cpu",
             encoder_dtype: torch.dtype | None = None) -> SVDBundle:
    """Load a Stable Video Diffusion single-file checkpoint (svd, svd_xt, the 1.1 releases and the image-decoder
    variants, svd_image_decoder / svd_xt_image_decoder) as published.

    The VAE encodes with the conditioning encoder (``conditioner.embedders.3.encoder.*``: encoder + quant_conv)
    where the file has it, as the original conditions on that one, else with ``first_stage_model.encoder``;
    it decodes with ``first_stage_model.decoder``: the temporal decoder (a ``TemporalAutoencoder``), or in the
    image-decoder variants the SD VAE's (an ``AutoencoderKL`` with its ``post_quant_conv``, frames decoded
    independently). The CLIP image encoder comes from
    ``clip_vision_path`` when given (any CLIP vision file, e.g. ComfyUI's clip_vision_h.safetensors), else from
    the checkpoint. The VAE is made in ``vae_dtype``, the image encoder in ``encoder_dtype`` where given, else in
    ``dtype``.
    """
    from .clip_vision import load_image_encoder
    from .svd import SVD_ADM_CHANNELS, SVDUNet, infer_svd_unet_config
    from .svd_model import SVDModel, variant_of
    from .vae import (
        SVD_COND_ENCODER_PREFIX,
        SVD_VAE_PREFIX,
        AutoencoderKL,
        TemporalAutoencoder,
        infer_encoder_config,
        infer_temporal_vae_config,
        infer_vae_config,
        is_temporal_vae,
    )

    name = os.path.basename(path)
    sd = load_state_dict(path)
    found = detect_format(sd)
    if found == "svd" and not any(k.startswith(SVD_UNET_PREFIX) for k in sd):
        raise KinemaError(f"'{name}' holds parts of a Stable Video Diffusion model (temporal layers) but no UNet "
                          f"('{SVD_UNET_PREFIX}*'): it is a UNet or VAE saved on its own, or in diffusers' layout. "
                          "Load SVD Checkpoint (Kinema) takes the single-file release (svd.safetensors, "
                          "svd_xt.safetensors, ...) holding the UNet, VAE and image encoder.")
    if found != "svd":
        where = FORMAT_HOME.get(found, "")
        hint = ""
        if found == "sd15":
            hint = " Load it with Load Checkpoint (Kinema)."
        elif where:
            hint = f" It belongs in {where}."
        raise KinemaError(f"'{name}' is {FORMAT_NAMES[found]}, not a Stable Video Diffusion checkpoint.{hint}")
    with damaged_file(name, "a Stable Video Diffusion checkpoint"):
        unet_sd = sub_state_dict(sd, SVD_UNET_PREFIX)
        ucfg = infer_svd_unet_config(unet_sd)
        if ucfg.adm_in_channels != SVD_ADM_CHANNELS:
            raise KinemaError(
                f"'{name}' is not a Stable Video Diffusion image-to-video checkpoint: its UNet takes a "
                f"{ucfg.adm_in_channels}-wide conditioning vector where SVD's takes {SVD_ADM_CHANNELS} (fps, motion "
                "bucket, augmentation). SV3D files (orbital views of an object: 256 or 1280) are of this kind; "
                "Kinema does not run them. Use svd, svd_xt or their 1.1 / image-decoder releases.")
        unet = build_on_meta(lambda: SVDUNet(ucfg), unet_sd, dtype, "UNet", name, strict="warn")

        first = sub_state_dict(sd, SVD_VAE_PREFIX)
        if not first:
            raise KinemaError(f"'{name}' has no VAE ('{SVD_VAE_PREFIX}*'): it is not a full SVD checkpoint")
        decoder = ("decoder.", "post_quant_conv.")
        vae_sd = {k: v for k, v in first.items() if k.startswith(decoder)}
        cond_sd = sub_state_dict(sd, SVD_COND_ENCODER_PREFIX)
        encoder_from = first
        if any(k.startswith("encoder.") for k in cond_sd):
            if infer_encoder_config(cond_sd) != infer_encoder_config(first):
                raise KinemaError(f"'{name}': the conditioning encoder and the VAE encoder have different shapes")
            encoder_from = cond_sd
        vae_sd.update({k: v for k, v in encoder_from.items() if k.startswith(("encoder.", "quant_conv."))})
        if is_temporal_vae(first):
            vcfg = replace(infer_temporal_vae_config(first), quant_conv="quant_conv.weight" in vae_sd)
            vae = build_on_meta(lambda: TemporalAutoencoder(vcfg), vae_sd, vae_dtype or dtype, "VAE", name)
        else:  # svd_image_decoder / svd_xt_image_decoder: sgm's AutoencoderKL, every frame decoded on its own
            vcfg = infer_vae_config(first)
            vae = build_on_meta(lambda: AutoencoderKL(vcfg), vae_sd, vae_dtype or dtype, "VAE", name)

        if clip_vision_path is not None:
            image_encoder = load_clip_vision(clip_vision_path, encoder_dtype or dtype, device)
            if image_encoder.embed_dim != ucfg.context_dim:
                raise KinemaError(
                    f"'{os.path.basename(clip_vision_path)}' gives {image_encoder.embed_dim}-wide image embeddings "
                    f"and the UNet of '{name}' takes {ucfg.context_dim}-wide ones: choose the ViT-H/14 image encoder "
                    "SVD was trained with (clip_vision_h.safetensors), or the checkpoint's own")
        elif any(k.startswith(SVD_CLIP_VISION_PREFIX) for k in sd):
            image_encoder = load_image_encoder(sd, SVD_CLIP_VISION_PREFIX, encoder_dtype or dtype, name, device=device)
        else:
            raise KinemaError(f"'{name}' has no CLIP image encoder ('{SVD_CLIP_VISION_PREFIX}*'): choose a ViT-H/14 "
                              "file from models/clip_vision (e.g. clip_vision_h.safetensors) in Load SVD Checkpoint")
    model = SVDModel(unet=unet, variant=variant_of(name), name=name)
    return SVDBundle(model=model, image_encoder=image_encoder, vae=vae, name=name)
