"""LoRAs: AnimateDiff MotionLoRAs and SD1.5 LoRAs, merged into copies of the models when these are used.

Formats read
------------
- **MotionLoRA** (``v2_lora_ZoomIn.ckpt`` ...): ``{down_blocks.i|up_blocks.i|mid_block}.motion_modules.j.
  temporal_transformer.transformer_blocks.k.attention_blocks.m.processor.{to_q|to_k|to_v|to_out}_lora.{down|up}
  .weight``, optionally under ``state_dict``. No alpha: the update is ``strength * up @ down``; ``to_out`` is the
  motion module's ``to_out.0``. One converted for diffusers (``unet.``-prefixed, diffusers' motion-module names,
  processor or peft ``lora_A/lora_B`` halves) is renamed into this layout (``motion.published_layout``).
- **SD1.5 LoRA, kohya style**: ``lora_unet_<module path, dots as underscores>.{lora_down,lora_up}.weight`` and
  ``.alpha``; the path may be the diffusers UNet's (``down_blocks_0_attentions_0_proj_in``, the kohya default) or
  the original LDM UNet's (``input_blocks_1_1_proj_in``). Text encoder: ``lora_te_text_model_encoder_layers_N_...``.
  The update is ``strength * alpha / rank * up @ down`` (no alpha: ``alpha = rank``). Linear layers, 1x1 convs and
  3x3 convs (LoCon: ``up [o, r, 1, 1] @ down [r, i, kh, kw]``).
- **diffusers attention-processor style** (the AnimateDiff v3 domain adapter ``v3_sd15_adapter.ckpt``):
  ``<diffusers UNet path>.processor.{to_q|to_k|to_v|to_out}_lora.{down|up}.weight``, no alpha.
- diffusers / peft style (``unet.<path>.lora_A.weight`` / ``lora_B``, ``text_encoder.<path>...``) is read too,
  and diffusers' earlier text-encoder names (``...q_proj.lora_linear_layer.down.weight``; before that
  ``...self_attn.to_q_lora.down.weight``).

Applying
--------
Nothing is changed in place (design rule: node outputs are never mutated). ``merge`` returns a *structural copy* of
the module tree (``patching``): every module on the way from the root to a patched weight is shallow-copied, every
other module and every unpatched parameter is the original object, and the patched weights are computed when the
copy is first used. Memory grows by the patched weights of the copies that are used: the output of a LoRA node that
only feeds another LoRA node holds none. Updates are summed in fp32 (several LoRAs in one go), added to the weight
in fp32, then cast to the weight's dtype. LoRAs stacked by chained nodes are merged together onto the unpatched
model (the copy remembers it), so an fp16 model is rounded once whatever their number and order.

Mismatches
----------
- A LoRA for another base model is refused: SDXL keys (``lora_te1_``, ``lora_te2_``, ``text_encoder_2.``), or any
  weight whose shape does not fit the layer it names.
- Keys that name no layer: KinemaError when none match; otherwise they are skipped and counted in a warning.
- MotionLoRA rule: updates for motion modules that the loaded motion module does not have (a v2 MotionLoRA's
  ``mid_block`` on v1/v3, which have no mid block) are skipped with a warning; every other mismatch (a module it has,
  with another shape or without that weight) is a KinemaError, and so is a MotionLoRA of which nothing applies.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import checkpoint, patching
from .errors import KinemaError, finite_number
from .motion import published_layout

logger = logging.getLogger("kinema")

MOTION_LORA_NODE = "Load MotionLoRA (Kinema)"
LORA_NODE = "Load LoRA (Kinema)"


# -- one low-rank update ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAPair:
    """``down [r, i(, kh, kw)]``, ``up [o, r(, 1, 1)]`` and the optional ``alpha``: update = alpha/r * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def fits(self, shape: Sequence[int]) -> bool:
        """True when the update has the shape of a weight ``shape`` (a linear or conv layer)."""
        if self.up.ndim < 2 or self.down.ndim < 2 or self.up.shape[1] != self.down.shape[0]:
            return False
        if math.prod(self.up.shape[2:]) != 1:
            return False
        return self.up.shape[0] == shape[0] and math.prod(self.down.shape[1:]) == math.prod(shape[1:]) and (
            self.down.ndim == 2 or len(shape) == 2 or tuple(self.down.shape[2:]) == tuple(shape[2:]))

    def delta(self, shape: Sequence[int], device=None) -> torch.Tensor:
        """The fp32 update ``alpha/r * up @ down`` reshaped to the weight's ``shape``, on ``device``."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # [o, r]
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # [r, i*kh*kw]
        return (up @ down).mul_(self.scale).reshape(tuple(shape))


@dataclass(frozen=True)
class WeightDifference:
    """A whole change of one parameter (ComfyUI's ``.diff`` and ``.diff_b`` keys, as its Extract and Save Lora
    writes them: a full-rank weight difference, a bias or a norm's scale): update = diff."""

    diff: torch.Tensor

    def fits(self, shape: Sequence[int]) -> bool:
        return self.diff.numel() == math.prod(shape) and (self.diff.ndim < 2 or self.diff.shape[0] == shape[0])

    def delta(self, shape: Sequence[int], device=None) -> torch.Tensor:
        """The fp32 difference in the parameter's ``shape``, on ``device`` (a new tensor: callers scale it)."""
        return self.diff.to(device=device, dtype=torch.float32, copy=True).reshape(tuple(shape))


Patch = Mapping[str, LoRAPair | WeightDifference]  # parameter name in the target module -> update


# -- merging -------------------------------------------------------------------------------------------------------

#: where a merged copy keeps what it was merged from: (the unpatched module, its (patch, strength) list)
_MERGED_FROM = "_kinema_merged_from"


def merge(module: nn.Module, patches: Iterable[tuple[Patch, float]]) -> nn.Module:
    """``module`` with ``W += sum(strength * delta)`` for every (patch, strength), as a copy-on-write copy whose
    merged weights are computed when it is first used (``patching.defer``; ``patching.materialize`` does it now).

    Updates are summed in fp32 and added to the weight in fp32, then cast to the weight's dtype, one weight at a
    time (the fp32 work of one weight at once, not of all). A copy made here remembers its unpatched module and
    patches: merging more onto it merges them all onto that module in one go, so LoRAs stacked by chained nodes
    round to an fp16/bf16 weight once, as in one call and as ComfyUI's patching does, in any order, and a copy that
    only feeds another merge never computes its own weights. With no non-zero strength of a patch naming a weight,
    ``module`` itself is returned, untouched.
    """
    patches = [(patch, finite_number(strength, "a LoRA strength")) for patch, strength in patches]
    patches = [(patch, strength) for patch, strength in patches if strength != 0.0 and len(patch) > 0]
    if not patches:  # nothing to change (e.g. the v3 adapter's LoRA, which has no text-encoder weights)
        return module
    merged_from = module.__dict__.get(_MERGED_FROM)
    if merged_from is not None:
        module, earlier = merged_from
        patches = [*earlier, *patches]
    patches = tuple(patches)

    def merged_weights(current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        new = {}
        for name, weight in current.items():
            total = None
            for patch, strength in patches:
                if name in patch:
                    d = patch[name].delta(weight.shape, weight.device).mul_(strength)
                    total = d if total is None else total.add_(d)
            new[name] = (weight.detach().float() + total).to(weight.dtype)
        return new

    merged = patching.defer(module, (name for patch, _ in patches for name in patch), merged_weights)
    object.__setattr__(merged, _MERGED_FROM, (module, patches))  # a plain attribute, not a submodule
    return merged


# -- reading LoRA keys ---------------------------------------------------------------------------------------------

_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),  # diffusers 0.18-0.21
    (".alpha", "alpha"),
)
_PROCESSOR_SUFFIXES = (("_lora.down.weight", "down"), ("_lora.up.weight", "up"))
_PROCESSOR_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out")


def _split_key(key: str) -> tuple[str, str] | None:
    """``key`` -> (target module name as written in the file, role) or None when it is not a LoRA tensor.

    Processor style (``X.processor.to_q_lora.down.weight``; diffusers' early text-encoder LoRAs without the
    ``processor.``) becomes ``X.to_q`` (``to_out`` -> ``to_out.0``).
    """
    for suffix, role in _PROCESSOR_SUFFIXES:
        if not key.endswith(suffix):
            continue
        base = key[: -len(suffix)]
        if ".processor." in base or base.endswith(_PROCESSOR_PROJECTIONS):
            base = base.replace(".processor.", ".")
            if base.endswith(".to_out"):
                base += ".0"
            return base, role
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def read_pairs(sd: Mapping[str, torch.Tensor], name: str) -> tuple[dict[str, LoRAPair], list[str]]:
    """Group a LoRA file's tensors into {target: LoRAPair}; also returns the keys that are not LoRA tensors."""
    unsupported = [k for k in sd if ".dora_scale" in k or k.endswith(".lora_mid.weight")]
    if unsupported:
        kind = "DoRA" if ".dora_scale" in unsupported[0] else "LoCon with Tucker decomposition ('lora_mid')"
        raise KinemaError(f"'{name}' is a {kind} LoRA, which Kinema does not merge yet (key '{unsupported[0]}')")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in sd.items():
        split = _split_key(key)
        if split is None:
            other.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = tensor
    pairs = {}
    for target, p in parts.items():
        if "down" not in p or "up" not in p:
            if set(p) == {"alpha"}:
                other.append(f"{target}.alpha")
                continue
            missing = "up" if "down" in p else "down"
            raise KinemaError(f"'{name}' is incomplete: the LoRA weight '{target}' has no '{missing}' half. "
                              "Download the file again.")
        if "alpha" in p and p["alpha"].numel() != 1:
            raise KinemaError(f"'{name}': the LoRA weight '{target}' has an alpha of {p['alpha'].numel()} values "
                              "where it takes one: the file is damaged, download it again")
        alpha = float(p["alpha"].float().reshape(-1)[0]) if "alpha" in p else None
        if not (p["down"].is_floating_point() and p["up"].is_floating_point()):
            raise KinemaError(f"'{name}': the LoRA weight '{target}' holds {p['down'].dtype} / {p['up'].dtype} "
                              "values where a LoRA has floating-point ones: the file is damaged or not a LoRA, "
                              "download it again")
        pair = LoRAPair(p["down"], p["up"], alpha)
        if pair.up.ndim < 2 or pair.down.ndim < 2 or pair.up.shape[1] != pair.down.shape[0] or not pair.rank:
            raise KinemaError(f"'{name}': the LoRA weight '{target}' has inconsistent halves "
                              f"(down {tuple(pair.down.shape)}, up {tuple(pair.up.shape)})")
        pairs[target] = pair
    return pairs, other


# -- MotionLoRA ----------------------------------------------------------------------------------------------------

def load_motion_lora(path: str) -> dict[str, torch.Tensor]:
    """Read a MotionLoRA file safely; KinemaError (naming the file and the node to use) for any other kind."""
    sd = checkpoint.own_copies(checkpoint.load_state_dict(path))
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    checkpoint.expect_format(sd, "motion_lora", path, "an AnimateDiff MotionLoRA")
    return published_layout(sd)


def motion_lora_patch(motion, sd: Mapping[str, torch.Tensor], name: str = "the MotionLoRA") -> dict[str, LoRAPair]:
    """The MotionLoRA ``sd`` as {parameter of ``motion`` (a MotionModuleSet): update}; see the module rule."""
    pairs, other = read_pairs(sd, name)
    if not pairs:
        raise KinemaError(f"'{name}' holds no MotionLoRA weights ('...processor.to_q_lora.down.weight')")
    params = dict(motion.named_parameters())
    modules = {n for n, m in motion.named_modules() if type(m).__name__ == "MotionModule"}
    patch, absent = {}, []
    for target, pair in pairs.items():
        if ".motion_modules." not in target:
            raise KinemaError(f"'{name}' has a weight '{target}' outside the motion modules: it is not a MotionLoRA")
        owner = target.split(".temporal_transformer.")[0]
        param = f"{target}.weight"
        if owner not in modules:
            absent.append(owner)
            continue
        weight = params.get(param)
        if weight is None:
            raise KinemaError(f"'{name}' changes '{param}', which the motion module does not have: the MotionLoRA was "
                              "made for another motion module family")
        if not pair.fits(weight.shape):
            raise KinemaError(
                f"'{name}' does not fit this motion module: '{param}' is {tuple(weight.shape)}, the MotionLoRA's "
                f"update is up {tuple(pair.up.shape)} @ down {tuple(pair.down.shape)}. Use an SD1.5 MotionLoRA with "
                "an SD1.5 motion module.")
        patch[param] = pair
    if not patch:
        raise KinemaError(f"none of the MotionLoRA '{name}' weights match the motion module "
                          f"({motion.version}): it was made for another motion module")
    if absent:
        where = sorted({o.split(".motion_modules.")[0] for o in absent})
        logger.warning("MotionLoRA '%s': %d weights for motion modules that this %s motion module does not have (%s) "
                       "were skipped", name, len(absent), motion.version, ", ".join(where))
    if other:
        logger.warning("MotionLoRA '%s': %d keys that are not LoRA weights were ignored", name, len(other))
    return patch


def apply_motion_loras(motion, loras: Sequence[tuple[Mapping[str, torch.Tensor], float, str]]):
    """A copy of the MotionModuleSet ``motion`` with the MotionLoRAs ``[(state dict, strength, name)]`` merged.

    ``motion`` is never changed; unpatched tensors are shared. The copy records the LoRAs in ``.loras``.
    """
    patches = [(motion_lora_patch(motion, sd, name), strength) for sd, strength, name in loras]
    merged = merge(motion, patches)
    if merged is not motion:
        merged.loras = tuple(getattr(motion, "loras", ())) + tuple(
            (name, float(s)) for (_, s, name) in loras if float(s) != 0.0)
    return merged


# -- SD1.5 LoRA ----------------------------------------------------------------------------------------------------

_RES_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def ldm_to_diffusers_blocks(cfg) -> dict[str, str]:
    """Block-level module paths of the LDM UNet (``UNetConfig`` ``cfg``) -> the diffusers UNet2DConditionModel's.

    ResBlock prefixes map to ``...resnets.j`` (their inner names differ: see ``_RES_RENAMES``); spatial transformer
    prefixes to ``...attentions.j`` (same inner names); samplers to ``...downsamplers.0.conv`` / ``upsamplers.0.conv``.
    """
    nrb, levels = cfg.num_res_blocks, cfg.levels
    out = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
           "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
           "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
           "middle_block.2": "mid_block.resnets.1"}
    for level in range(levels):
        for j in range(nrb):
            i = 1 + level * (nrb + 1) + j
            out[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{j}"
            if level in cfg.attention_levels:
                out[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level != levels - 1:
            out[f"input_blocks.{(level + 1) * (nrb + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for u in range(levels):  # diffusers' up_blocks.0 is the deepest level
        level = levels - 1 - u
        attn = level in cfg.attention_levels
        for j in range(nrb + 1):
            o = u * (nrb + 1) + j
            out[f"output_blocks.{o}.0"] = f"up_blocks.{u}.resnets.{j}"
            if attn:
                out[f"output_blocks.{o}.1"] = f"up_blocks.{u}.attentions.{j}"
            if level and j == nrb:
                out[f"output_blocks.{o}.{2 if attn else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
    return out


def diffusers_module_name(ldm_name: str, blocks: Mapping[str, str]) -> str | None:
    """The diffusers name of LDM UNet module ``ldm_name`` (None where diffusers has no such module)."""
    parts = ldm_name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in blocks:
            rest = ".".join(parts[n:])
            if ".resnets." in blocks[prefix]:
                if not rest:
                    return blocks[prefix]
                head = next((k for k in _RES_RENAMES if rest == k or rest.startswith(k + ".")), None)
                if head is None:
                    return None
                rest = _RES_RENAMES[head] + rest[len(head):]
            return f"{blocks[prefix]}.{rest}" if rest else blocks[prefix]
    return None


def _weight_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def unet_lora_targets(unet) -> dict[str, str]:
    """Every name a LoRA may use for a layer of our LDM UNet -> its weight parameter name."""
    blocks = ldm_to_diffusers_blocks(unet.cfg)
    table = {}
    for ldm in _weight_layers(unet):
        param = f"{ldm}.weight"
        names = [ldm]
        diff = diffusers_module_name(ldm, blocks)
        if diff is not None:
            names.append(diff)
            table[f"unet.{diff}"] = param
        for n in names:
            table[n] = param
            table["lora_unet_" + n.replace(".", "_")] = param
    return table


def text_encoder_lora_targets(model: nn.Module) -> dict[str, str]:
    """Every name a LoRA may use for a layer of a transformers CLIPTextModel -> its weight parameter name."""
    table = {}
    for real in _weight_layers(model):
        bare = real.removeprefix("text_model.")
        param = f"{real}.weight"
        table["lora_te_text_model_" + bare.replace(".", "_")] = param
        table["lora_te_" + bare.replace(".", "_")] = param
        table[f"text_encoder.text_model.{bare}"] = param
        table[f"text_encoder.{bare}"] = param
        table[f"{COMFY_TEXT_ENCODER}{bare}"] = param
        head, _, leaf = bare.rpartition(".")
        if head.endswith(".self_attn") and leaf in _EARLY_DIFFUSERS_TEXT_ATTENTION:  # diffusers <= 0.17
            early = f"{head}.{_EARLY_DIFFUSERS_TEXT_ATTENTION[leaf]}"
            table[f"text_encoder.text_model.{early}"] = table[f"text_encoder.{early}"] = param
    return table


#: diffusers' early text-encoder LoRAs (attention processors): ``self_attn.to_q_lora`` ... for ``q_proj`` ...
_EARLY_DIFFUSERS_TEXT_ATTENTION = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}


#: ComfyUI's name of an SD1.5 text encoder's layers in the LoRAs it extracts (its CLIP model's state dict keys)
COMFY_TEXT_ENCODER = "text_encoders.clip_l.transformer.text_model."
#: ComfyUI's whole-parameter differences: key suffix -> the parameter of the layer it changes
_DIFF_SUFFIXES = ((".diff_b", "bias"), (".diff", "weight"))


def _difference(key: str, unet_params: Mapping, te_params: Mapping) -> tuple[str, str] | None:
    """("unet" or "clip", parameter name) that a ``.diff`` / ``.diff_b`` key changes, or None."""
    for suffix, part in _DIFF_SUFFIXES:
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            name = f"{base.removeprefix('model.diffusion_model.').removeprefix('diffusion_model.')}.{part}"
            if name in unet_params:
                return "unet", name
            if base.startswith(COMFY_TEXT_ENCODER):
                bare = f"{base[len(COMFY_TEXT_ENCODER):]}.{part}"
                for name in (f"text_model.{bare}", bare):
                    if name in te_params:
                        return "clip", name
            return None
    return None


_SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "unet.add_embedding.")


@dataclass(frozen=True)
class SD15LoRAPatch:
    """An SD1.5 LoRA resolved against a model: updates for the UNet and the text encoder, and what was skipped."""

    unet: dict
    clip: dict
    unmatched: tuple


def sd15_lora_patch(sd: Mapping[str, torch.Tensor], unet, text_model: nn.Module | None,
                    name: str = "the LoRA") -> SD15LoRAPatch:
    """Resolve a kohya / LDM / diffusers-style SD1.5 LoRA against ``unet`` (ours) and ``text_model``
    (a transformers CLIPTextModel, or None). KinemaError for SDXL LoRAs, shapes that do not fit, or no match."""
    sdxl = next((k for k in sd if k.startswith(_SDXL_PREFIXES)), None)
    if sdxl is not None:
        raise KinemaError(f"'{name}' is an SDXL LoRA (key '{sdxl}'): Kinema runs SD1.5 models, use a LoRA made for "
                          "SD1.5")
    pairs, other = read_pairs(sd, name)
    differences = [k for k in other if k.endswith(tuple(suffix for suffix, _ in _DIFF_SUFFIXES))]
    if not pairs and not differences:
        raise KinemaError(f"'{name}' holds no LoRA weights Kinema can read (LoHa, LoKr and other LyCORIS types are "
                          "not supported)")
    unet_targets = unet_lora_targets(unet)
    te_targets = text_encoder_lora_targets(text_model) if text_model is not None else {}
    unet_params = dict(unet.named_parameters())
    te_params = dict(text_model.named_parameters()) if text_model is not None else {}
    patch_unet, patch_te, unmatched = {}, {}, list(other)
    for target, pair in pairs.items():
        # LDM names, with the checkpoint's prefix or (ComfyUI's Extract and Save Lora) without its "model."
        key = target.removeprefix("model.diffusion_model.").removeprefix("diffusion_model.")
        if key in unet_targets:
            param, weight, out = unet_targets[key], unet_params[unet_targets[key]], patch_unet
        elif target in te_targets:
            param, weight, out = te_targets[target], te_params[te_targets[target]], patch_te
        else:
            unmatched.append(target)
            continue
        if not pair.fits(weight.shape):
            raise KinemaError(
                f"'{name}' does not fit this SD1.5 model: it changes '{target}' with up {tuple(pair.up.shape)} @ down "
                f"{tuple(pair.down.shape)}, the layer's weight is {tuple(weight.shape)}. The LoRA was made for another "
                "base model (SDXL, SD2, ...): use a LoRA made for SD1.5.")
        out[param] = pair
    for key in differences:  # ComfyUI's whole differences (biases, norms, full-rank weights)
        found = _difference(key, unet_params, te_params)
        if found is None:
            continue
        part, param = found
        weight = (unet_params if part == "unet" else te_params)[param]
        change = WeightDifference(sd[key])
        if not change.fits(weight.shape):
            raise KinemaError(f"'{name}' does not fit this SD1.5 model: it changes '{param}' by a difference of shape "
                              f"{tuple(sd[key].shape)}, the parameter is {tuple(weight.shape)}: use a LoRA made for "
                              "SD1.5")
        (patch_unet if part == "unet" else patch_te)[param] = change
        unmatched.remove(key)
    if not patch_unet and not patch_te:
        te_note = "" if text_model is not None else " (no text encoder was given)"
        raise KinemaError(f"none of the {len(pairs) + len(differences)} weights of '{name}' name a layer of the SD1.5 "
                          f"UNet or text encoder{te_note}: it was made for another model (first key: "
                          f"'{next(iter(pairs), differences[0] if differences else '')}')")
    if unmatched:
        logger.warning("LoRA '%s': %d of its keys name no layer of the SD1.5 model and were skipped (first: '%s')",
                       name, len(unmatched), unmatched[0])
    return SD15LoRAPatch(unet=patch_unet, clip=patch_te, unmatched=tuple(unmatched))


def load_sd15_lora(path: str) -> dict[str, torch.Tensor]:
    """Read an SD1.5 LoRA file safely; KinemaError (naming the file and the node to use) for any other kind."""
    sd = checkpoint.own_copies(checkpoint.load_state_dict(path))
    checkpoint.expect_format(sd, ("lora", "sd15_adapter_lora"), path, "an SD1.5 LoRA")
    return sd


def apply_sd15_loras(unet, text_encoder, loras: Sequence[tuple[Mapping[str, torch.Tensor], float, float, str]]):
    """(unet, text_encoder) with the SD1.5 LoRAs ``[(state dict, strength_model, strength_clip, name)]`` merged.

    ``text_encoder`` is a ``models.encoders.TextEncoder`` (or None). Copy-on-write: the inputs are never changed;
    where every strength of a part is 0 (or nothing applies to it) that part is returned as it was.
    """
    text_model = text_encoder.model if text_encoder is not None else None
    resolved = [(sd15_lora_patch(sd, unet, text_model, name), sm, sc) for sd, sm, sc, name in loras]
    new_unet = merge(unet, [(p.unet, sm) for p, sm, _ in resolved])
    new_te = text_encoder
    if text_encoder is not None:
        new_model = merge(text_model, [(p.clip, sc) for p, _, sc in resolved])
        if new_model is not text_model:
            new_te = copy.copy(text_encoder)
            new_te.model = new_model
    return new_unet, new_te
