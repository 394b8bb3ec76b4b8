"""SD1.5 ControlNet in the original (lllyasviel) layout, with one hint image per frame.

A ControlNet is a copy of the UNet's encoder half: ``time_embed``, ``input_blocks`` and ``middle_block`` (the
UNet's own blocks, built by ``unet.sd15_blocks``), plus ``input_hint_block`` (convolutions and SiLU that bring the
hint image down to the latent size; its last convolution was initialised at zero), ``zero_convs.N.0`` (a 1x1
convolution after every input block) and ``middle_block_out.0`` (one after the middle block). The hint's
embedding is added to the output of the first input block; the outputs of the 1x1 convolutions are the
residuals ``UNetModel.forward(control=...)`` adds to its skip connections and to its middle block's output.

The network is an image model: the frames of ``(b f)`` are independent (each its own hint), so a video's
residuals can be computed for any subset of its frames (a context window) with the hints of those frames.

Files: ``control_model.*`` (lllyasviel's ``.pth``; the v1.0 files also hold the whole SD1.5 model, which is
ignored), bare keys (the fp16 ``.safetensors`` repacks), or the diffusers layout
(``diffusion_pytorch_model.safetensors``: ``controlnet_cond_embedding.*``, ``down_blocks.*``), converted here.
Hints are images in [0, 1], as the original, ComfyUI and diffusers feed them to SD1.5 ControlNets. A shuffle
ControlNet (its file named ``*_shuffle``) averages each residual over the image, as its original config and
ComfyUI do (``pools_residuals``).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
from einops import repeat
from torch import nn

from .checkpoint import build_on_meta, damaged_file, expect_format, load_state_dict, sub_state_dict
from .errors import KinemaError
from .layers import ResBlock, RunOptions, SharedContext, SpatialTransformer, timestep_embedding
from .unet import UNetConfig, infer_unet_config, sd15_blocks

PREFIX = "control_model."
DEFAULT_OPTS = RunOptions()
USE_INSTEAD = "use an SD1.5 ControlNet (for example control_v11f1p_sd15_depth from lllyasviel/ControlNet-v1-1)"


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A ``UNetConfig`` (the encoder half the ControlNet copies; ``out_channels`` unused) and the hint block's:
    ``hint_channels`` are the widths of its levels (16, 32, 96, 256 in the published SD1.5 ControlNets),
    ``hint_in_channels`` the hint image's."""

    hint_channels: tuple = (16, 32, 96, 256)
    hint_in_channels: int = 3

    @property
    def hint_scale(self) -> int:
        """How many hint pixels a latent pixel is (each hint level after the first halves the size)."""
        return 2 ** (len(self.hint_channels) - 1)

    @classmethod
    def for_unet(cls, unet_cfg: UNetConfig, hint_channels: tuple = (16, 32, 96, 256)) -> ControlNetConfig:
        """The config of a ControlNet made for the UNet ``unet_cfg``."""
        return cls(**asdict(unet_cfg), hint_channels=tuple(hint_channels))


def _hint_convs(get) -> list[tuple[int, int]]:
    """(in, out) channels of the convolutions ``input_hint_block.0, .2, .4, ...`` of a state dict."""
    convs, i = [], 0
    while (w := get(f"input_hint_block.{i}.weight")) is not None:
        convs.append((w.shape[1], w.shape[0]))
        i += 2
    return convs


def infer_controlnet_config(sd: dict, name: str = "the ControlNet") -> ControlNetConfig:
    """Read a ControlNetConfig off the tensor shapes of an original-layout ControlNet (prefix stripped)."""
    get = sd.get
    if get("input_blocks.0.0.weight") is None or get("zero_convs.0.0.weight") is None:
        raise KinemaError(f"'{name}' is not a ControlNet in the original layout: 'input_blocks.0.0.weight' or "
                          f"'zero_convs.0.0.weight' is missing; {USE_INSTEAD}")
    try:
        base = infer_unet_config(sd)
    except KinemaError as e:
        raise KinemaError(f"'{name}': the ControlNet's block layout is not an SD1.5 layout ({e}); {USE_INSTEAD}") from None
    mc = base.model_channels
    convs = _hint_convs(get)
    # conv(in -> c0), then per level: conv(c_i -> c_i), conv(c_i -> c_i+1, stride 2); last conv(c_last -> mc)
    widths = [c for _, c in convs[:-1:2]]
    layout = [(convs[0][0] if convs else 0, widths[0] if widths else 0)]
    for a, b in pairwise(widths):
        layout += [(a, a), (a, b)]
    layout.append((widths[-1] if widths else 0, mc))
    if len(convs) < 2 or convs != layout:
        raise KinemaError(f"'{name}': the input_hint_block is not the ControlNet layout (convolutions {convs}); "
                          f"{USE_INSTEAD}")
    return ControlNetConfig(**asdict(base), hint_channels=tuple(widths), hint_in_channels=convs[0][0])


def hint_block(in_channels: int, widths: tuple, out_channels: int) -> nn.Sequential:
    """The original ``input_hint_block``: convolutions (SiLU between them), stride 2 into each next level."""
    layers = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
    for a, b in pairwise(widths):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
    seq = []
    for conv in layers[:-1]:
        seq += [conv, nn.SiLU()]
    return nn.Sequential(*seq, layers[-1])


def _out_channels(block: nn.ModuleList) -> int:
    last = block[-1]
    if isinstance(last, SpatialTransformer):
        return last.norm.num_channels
    if isinstance(last, ResBlock):
        return last.out_layers[3].out_channels
    conv = getattr(last, "op", last)
    return conv.out_channels


def _base(context_dim: int, linear_proj: bool) -> str:
    """What a cross-attention width (and projection kind) says about the base model: 'an SDXL ', 'an SD2.x ', ..."""
    if context_dim == 2048:
        return "an SDXL "
    if context_dim == 1024 or linear_proj:
        return "an SD2.x "
    if context_dim == 768:
        return "an SD1.5 "
    return "a "


class ControlNet(nn.Module):
    """SD1.5 ControlNet; keys as in the published files without the ``control_model.`` prefix."""

    def __init__(self, cfg: ControlNetConfig, name: str = "", global_average_pooling: bool = False):
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.global_average_pooling = global_average_pooling  # shuffle ControlNets: see ``pools_residuals``
        mc = cfg.model_channels
        # the UNet's layout; a ControlNet has no decoder half, so the output blocks are dropped
        self.time_embed, self.input_blocks, self.middle_block, _, _ = sd15_blocks(cfg)
        self.zero_convs = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, c, 1)) for c in map(_out_channels, self.input_blocks)])
        self.input_hint_block = hint_block(cfg.hint_in_channels, cfg.hint_channels, mc)
        ch = _out_channels(self.input_blocks[-1])
        self.middle_block_out = nn.Sequential(nn.Conv2d(ch, ch, 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].weight.dtype

    def check_unet(self, unet_cfg: UNetConfig) -> None:
        """Raise KinemaError unless this ControlNet was made for a UNet like ``unet_cfg``."""
        c, name = self.cfg, self.name or "the ControlNet"
        if (c.context_dim, c.linear_proj) != (unet_cfg.context_dim, unet_cfg.linear_proj):
            raise KinemaError(
                f"'{name}' is {_base(c.context_dim, c.linear_proj)}ControlNet (cross-attention width {c.context_dim}"
                f"{', linear projections' if c.linear_proj else ''}) and the model is "
                f"{_base(unet_cfg.context_dim, unet_cfg.linear_proj)}UNet (width {unet_cfg.context_dim}): "
                f"{USE_INSTEAD}, or one made for the same base model as the checkpoint")
        names = ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
                 "transformer_depth")
        diff = [f"{f} {getattr(c, f)} (the model's: {getattr(unet_cfg, f)})" for f in names
                if getattr(c, f) != getattr(unet_cfg, f)]
        if diff:
            raise KinemaError(f"'{name}' was made for another UNet: its {', '.join(diff)}; use a ControlNet made for "
                              "the same base model as the checkpoint")

    def _check_inputs(self, x: torch.Tensor, hint: torch.Tensor, num_frames: int) -> None:
        name, s = self.name or "the ControlNet", self.cfg.hint_scale
        want = (x.shape[0], self.cfg.hint_in_channels, x.shape[-2] * s, x.shape[-1] * s)
        shared = num_frames < x.shape[0] and x.shape[0] % num_frames == 0 and hint.shape[0] == num_frames
        if hint.ndim != 4 or (tuple(hint.shape[1:]) != want[1:]) or not (hint.shape[0] == want[0] or shared):
            raise KinemaError(
                f"'{name}': the hint is {tuple(hint.shape)}, expected {want} (one {want[1]}-channel image a frame, "
                f"{want[3]}x{want[2]} pixels: {s}x the latent's {x.shape[-1]}x{x.shape[-2]}); resize the hint "
                "images to the video size")

    def _run(self, block, h, emb, context, opts):
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, opts)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, opts)
            else:
                h = layer(h)
        return h

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                opts: RunOptions = DEFAULT_OPTS) -> list[torch.Tensor]:
        """(b f) c h w, hint (b f)|f 3 8h 8w in [0, 1], timesteps [(b f)], context [(b f), n, d] -> residuals

        A hint batch of ``opts.num_frames`` images is shared by the b videos of the batch (cond and uncond): its
        embedding is computed once. The ControlNet computes in its weights' precision, whatever the UNet's (a
        precision set on the video model alone, or loaders set apart); the residuals come back in ``x``'s.
        """
        self._check_inputs(x, hint, opts.num_frames)
        dtype, out_dtype = self.dtype, x.dtype
        x = x.to(dtype)
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))
        context = SharedContext.of(context)
        guide = self.input_hint_block(hint.to(dtype))
        if guide.shape[0] != x.shape[0]:
            guide = repeat(guide, "f c h w -> (b f) c h w", b=x.shape[0] // guide.shape[0])
        outs = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context, opts)
            if i == 0:
                h = h + guide
            outs.append(zero_conv(h))
        h = self._run(self.middle_block, h, emb, context, opts)
        outs.append(self.middle_block_out(h))
        if self.global_average_pooling:  # each residual's spatial mean, everywhere
            outs = [o.mean(dim=(2, 3), keepdim=True).expand_as(o) for o in outs]
        return [o.to(out_dtype) for o in outs]


# -- files ---------------------------------------------------------------------------------------------------------

def diffusers_to_original(sd: dict, name: str = "the ControlNet") -> dict[str, torch.Tensor]:
    """A diffusers-layout SD1.5 ControlNet (``controlnet_cond_embedding.*``, ``down_blocks.*``, ...) in the
    original key names, through the UNet's LDM <-> diffusers module map (``lora.ldm_to_diffusers_blocks``)."""
    from .lora import diffusers_module_name, ldm_to_diffusers_blocks

    def count(pattern: str) -> int:
        n = 0
        while any(k.startswith(pattern.format(n)) for k in sd):
            n += 1
        return n

    levels, nrb = count("down_blocks.{}.resnets.0."), count("down_blocks.0.resnets.{}.")
    attention = tuple(lv for lv in range(levels) if f"down_blocks.{lv}.attentions.0.proj_in.weight" in sd)
    structure = ControlNetConfig(channel_mult=(1,) * levels, num_res_blocks=nrb, attention_levels=attention)
    blocks = ldm_to_diffusers_blocks(structure)
    with torch.device("meta"):
        res_parts = [n for n, m in ResBlock(32, 8, 64).named_modules() if isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                             nn.GroupNorm))]
    modules = {}  # diffusers module path -> original
    for ldm, diff in blocks.items():
        if ldm.startswith(("output_blocks.", "out.")):
            continue
        if ".resnets." in diff:
            modules.update({diffusers_module_name(f"{ldm}.{p}", blocks): f"{ldm}.{p}" for p in res_parts})
        else:
            modules[diff] = ldm
    hints = count("controlnet_cond_embedding.blocks.{}.")
    modules["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    modules.update({f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * i + 2}" for i in range(hints)})
    modules["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * hints + 2}"
    modules.update({f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(count("controlnet_down_blocks.{}."))})
    modules["controlnet_mid_block"] = "middle_block_out.0"
    out, unknown = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in modules:
                out[".".join([modules[head], *parts[n:]])] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KinemaError(f"'{name}' is a diffusers-layout ControlNet with keys Kinema does not know (first: "
                          f"'{unknown[0]}'): it is not a plain SD1.5 ControlNet; {USE_INSTEAD}")
    return out


def _original_layout(sd: dict, name: str, path: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors in the original names without prefix, or KinemaError saying what the file is."""
    keys = sd.keys()
    if any("lora_controlnet" in k for k in keys):  # first: a Control-LoRA holds its hint block and zero convs whole
        raise KinemaError(f"'{name}' is a Control-LoRA (an SDXL ControlNet stored as a LoRA); {USE_INSTEAD}")
    if any(k.startswith(PREFIX) for k in keys):
        sd = sub_state_dict(sd, PREFIX)  # the v1.0 .pth files also hold the SD1.5 model: ignored
    elif "controlnet_cond_embedding.conv_in.weight" in sd:
        if any(".motion_modules." in k for k in keys):
            raise KinemaError(f"'{name}' is an AnimateDiff SparseCtrl model, which Kinema does not run yet; "
                              f"{USE_INSTEAD}")
        if any(k.startswith(("add_embedding.", "class_embedding.")) for k in keys):
            raise KinemaError(f"'{name}' is an SDXL ControlNet (diffusers layout); {USE_INSTEAD}")
        sd = diffusers_to_original(sd, name)
    elif "zero_convs.0.0.weight" not in sd and "input_hint_block.0.weight" not in sd:
        if any(k.startswith(("body.", "adapter.body.")) for k in keys):
            raise KinemaError(f"'{name}' is a T2I-Adapter, not a ControlNet: Kinema does not run T2I-Adapters; "
                              f"{USE_INSTEAD}")
        expect_format(sd, "controlnet", path, "an SD1.5 ControlNet")  # says what it is and where it belongs
        raise KinemaError(f"'{name}' is not a ControlNet Kinema reads; {USE_INSTEAD}")
    if any(k.startswith("label_emb.") for k in sd):
        raise KinemaError(f"'{name}' is an SDXL ControlNet (it has 'label_emb'); {USE_INSTEAD}")
    return sd


def pools_residuals(filename: str) -> bool:
    """True for a shuffle ControlNet (``control_v11e_sd15_shuffle``): its residuals are averaged over the image
    (``global_average_pooling: True`` in lllyasviel's config for it). Told by the file name, ``*_shuffle`` or
    ``*_shuffle_fp16``, as ComfyUI tells it: the weights do not say."""
    stem = os.path.splitext(os.path.basename(filename))[0]
    return stem.endswith(("_shuffle", "_shuffle_fp16"))


def controlnet_from_state_dict(sd: dict, name: str = "the ControlNet", dtype: torch.dtype | None = None,
                               path: str | None = None) -> ControlNet:
    """A ControlNet from the tensors of a ControlNet file (any of the layouts in the module doc); ``name`` (the
    file's) also says whether it pools its residuals (``pools_residuals``)."""
    sd = _original_layout(sd, name, path or name)
    with damaged_file(name, "an SD1.5 ControlNet"):
        cfg = infer_controlnet_config(sd, name)
        return build_on_meta(lambda: ControlNet(cfg, name, pools_residuals(name)), sd, dtype, "ControlNet", name)


def load_controlnet(path: str, dtype: torch.dtype | None = None) -> ControlNet:
    """Load an SD1.5 ControlNet file safely (``.safetensors``, or ``.pth/.ckpt`` holding only tensors)."""
    return controlnet_from_state_dict(load_state_dict(path), os.path.basename(path), dtype, path)
