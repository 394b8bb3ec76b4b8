"""AnimateDiff motion modules (v1, v2, v3) for SD1.5, in the published key layout.

A file holds ``{down_blocks.i|up_blocks.i|mid_block}.motion_modules.j.temporal_transformer.*``. Files in
diffusers' layout (a ``MotionAdapter``'s weights, a MotionLoRA converted for diffusers) are renamed into it
(``published_layout``).
Each module is a temporal transformer: per-frame GroupNorm, a linear projection,
blocks of two temporal self-attentions (with a sinusoidal positional table
``pos_encoder.pe``, stored in the published files; AnimateDiff's own training code
since July 2024 keeps it out of its checkpoints and recomputes it, as its loader
always does: ``with_positional_tables``) and a GEGLU feed-forward, a linear
projection out, and a residual. Attention runs across the frames of each
spatial position.

``MotionModel`` pairs a (never modified) SD1.5 UNet with a ``MotionModuleSet``
and a motion scale; it is what the sampler calls.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import nn

from . import compiling
from .addons import ControlReuse, content_cross_extra, control_residuals, video_frames
from .compiling import CompileOptions
from .errors import KinemaError
from .layers import FeedForward, RunOptions, SharedContext, attention, by_rows, row_step
from .offload import NO_OFFLOAD, OffloadOptions, compute_device
from .patching import materialize
from .sampling import DiscreteSchedule

logger = logging.getLogger("kinema")
from .unet import Slot, UNetConfig, UNetModel


class TemporalAttention(nn.Module):
    """Self-attention over frames, with the positional table added to its input."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[r, f, c] -> [r, f, c]: attention across the f frames of each row (one pixel position of a video)"""
        x = self.pos_encoder(x)
        return self.to_out(attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.register_buffer("pe", torch.zeros(1, max_len, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[b, f, c] -> [b, f, c] + pe[:, :f]"""
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


#: the positional table length given to a file that stores none (v2's and v3's 32; the values of the frames it
#: covers do not depend on the length)
COMPUTED_TABLE_LENGTH = 32


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The table AnimateDiff trains with (sin on even, cos on odd channels): [1, max_len, dim]."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-torch.log(torch.tensor(10000.0)) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, num_attn: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_len) for _ in range(num_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attn)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[r, f, c] -> [r, f, c] (rows: pixel positions, each the frames of one video)"""
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = x + attn(norm(x))
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    """``temporal_transformer``: GroupNorm per frame, proj_in, blocks, proj_out (returns the update)."""

    def __init__(self, channels: int, heads: int, max_len: int, depth: int = 1, num_attn: int = 2):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, max_len, num_attn) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int, chunk: int = 0) -> torch.Tensor:
        """(b f) c h w -> (b f) c h w: the update the module adds to its input

        After the per-frame GroupNorm every operation is per pixel position (attention across its frames,
        projections and feed-forward per token), so the positions run in slices (``chunk`` of them at most, and
        within ``ROW_SLICE_BYTES``): the same result, with the intermediates of one slice.
        """
        h, w = x.shape[-2:]
        rows = rearrange(self.norm(x), "(b f) c h w -> (b h w) f c", f=num_frames)
        y = by_rows(lambda part, _: self._rows(part), rows, row_step(rows, chunk))
        return rearrange(y, "(b h w) f c -> (b f) c h w", h=h, w=w)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """[r, f, c] -> [r, f, c]: proj_in, the blocks, proj_out"""
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        return self.proj_out(y)


class MotionModule(nn.Module):
    def __init__(self, channels: int, heads: int, max_len: int, depth: int = 1, num_attn: int = 2):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, heads, max_len, depth, num_attn)

    def forward(self, x: torch.Tensor, num_frames: int, scale: float | torch.Tensor = 1.0,
                chunk: int = 0) -> torch.Tensor:
        """(b f) c h w -> (b f) c h w; scale (a float, or [f] one per frame) multiplies the temporal update, which
        the module computes in its weights' precision, whatever the UNet's (a precision set on the UNet alone, or
        loaders set apart), and adds in ``x``'s"""
        dtype = self.temporal_transformer.proj_out.weight.dtype
        update = self.temporal_transformer(x.to(dtype), num_frames, chunk).to(x.dtype)
        if isinstance(scale, torch.Tensor):
            b = x.shape[0] // num_frames
            scale = rearrange(scale.to(x.device, x.dtype).repeat(b), "bf -> bf 1 1 1")
        if not isinstance(scale, torch.Tensor) and scale == 1.0:
            return x + update
        return x + update.mul_(scale)  # the update is this call's own tensor


class _Level(nn.Module):
    def __init__(self, modules: list[MotionModule]):
        super().__init__()
        self.motion_modules = nn.ModuleList(modules)


@dataclass(frozen=True)
class MotionConfig:
    down_channels: tuple          # channels of each down level's modules
    modules_per_down: int         # 2 for SD1.5
    modules_per_up: int           # 3 for SD1.5
    has_mid: bool
    max_len: int                  # positional table length: frames at once
    heads: int = 8
    depth: int = 1
    num_attn: int = 2

    @property
    def version(self) -> str:
        if self.has_mid:
            return "v2"
        return "v1" if self.max_len <= 24 else "v3"


class MotionModuleSet(nn.Module):
    """All motion modules of one file, in its names: ``down_blocks``, ``up_blocks``, ``mid_block``."""

    def __init__(self, cfg: MotionConfig):
        super().__init__()
        self.cfg = cfg

        def make(ch: int) -> MotionModule:
            return MotionModule(ch, cfg.heads, cfg.max_len, cfg.depth, cfg.num_attn)

        self.down_blocks = nn.ModuleList(
            [_Level([make(ch) for _ in range(cfg.modules_per_down)]) for ch in cfg.down_channels]
        )
        self.up_blocks = nn.ModuleList(
            [_Level([make(ch) for _ in range(cfg.modules_per_up)]) for ch in reversed(cfg.down_channels)]
        )
        if cfg.has_mid:
            self.mid_block = _Level([make(cfg.down_channels[-1])])

    @property
    def version(self) -> str:
        return self.cfg.version

    def module_for(self, slot: Slot, unet_cfg: UNetConfig) -> MotionModule | None:
        """The motion module that follows UNet block ``slot`` (None where the file has none)."""
        kind, index = slot
        nrb = unet_cfg.num_res_blocks
        if kind == "middle":
            return self.mid_block.motion_modules[0] if self.cfg.has_mid else None
        if kind == "input":
            if index == 0 or index % (nrb + 1) == 0:  # conv_in and the downsamplers
                return None
            level, j = divmod(index - 1, nrb + 1)
            levels, count = self.down_blocks, self.cfg.modules_per_down
        else:
            level, j = divmod(index, nrb + 1)
            levels, count = self.up_blocks, self.cfg.modules_per_up
        if level >= len(levels) or j >= count:
            return None
        return levels[level].motion_modules[j]

    def check_unet(self, unet_cfg: UNetConfig) -> None:
        """Raise KinemaError unless this motion module fits the UNet."""
        unet_channels = tuple(unet_cfg.model_channels * m for m in unet_cfg.channel_mult)
        fix = "use an SD1.5 motion module with an SD1.5 checkpoint"
        if tuple(self.cfg.down_channels) != unet_channels[: len(self.cfg.down_channels)]:
            raise KinemaError(
                f"this motion module was made for a UNet with channels {tuple(self.cfg.down_channels)}, "
                f"the checkpoint's UNet has {unet_channels}: {fix}"
            )
        if self.cfg.modules_per_down != unet_cfg.num_res_blocks:
            raise KinemaError(
                f"this motion module has {self.cfg.modules_per_down} temporal modules a down block, the "
                f"checkpoint's UNet has {unet_cfg.num_res_blocks} ResBlocks a block: {fix}"
            )


_CHANNEL_KEYS = ("norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias")


def _motion_key_place(key: str) -> tuple[str, int, int, str] | None:
    """``('down'|'up', level, j, rest)`` / ``('mid', 0, j, rest)`` for a key under ``...motion_modules.j.``;
    None for any other key."""
    parts = key.split(".")
    if len(parts) >= 5 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "motion_modules" \
            and parts[1].isdigit() and parts[3].isdigit():
        return parts[0].removesuffix("_blocks"), int(parts[1]), int(parts[3]), ".".join(parts[4:])
    if len(parts) >= 4 and parts[0] == "mid_block" and parts[1] == "motion_modules" and parts[2].isdigit():
        return "mid", 0, int(parts[2]), ".".join(parts[3:])
    return None


#: diffusers' names of a temporal transformer block's parts -> the published ones
_DIFFUSERS_BLOCK_PARTS = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1", "norm1": "norms.0",
                          "norm2": "norms.1", "norm3": "ff_norm"}


def published_layout(sd: dict) -> dict:
    """A motion module or MotionLoRA state dict in the published AnimateDiff key layout.

    diffusers' layout is renamed: a ``MotionAdapter``'s ``diffusion_pytorch_model.safetensors`` (the guoyww
    ``animatediff-motion-adapter-*`` repositories, AnimateLCM, AnimateDiff-Lightning's ``_diffusers`` files) and a
    MotionLoRA converted for diffusers (``unet.``-prefixed, processor or peft ``lora_A/lora_B`` names). There a
    module's keys lack ``temporal_transformer.``, a block's parts are ``attn1/attn2/norm1/norm2/norm3`` and its one
    positional table ``pos_embed.pe`` serves both attentions (the published file stores it in each). Keys in the
    published layout, and keys outside the motion modules, are kept as they are.
    """
    out = {}
    for key, value in sd.items():
        bare = key.removeprefix("unet.")
        place = _motion_key_place(bare)
        if place is None or place[3].startswith("temporal_transformer."):
            out[key if place is None else bare] = value
            continue
        rest = place[3]
        head = bare[: len(bare) - len(rest)] + "temporal_transformer."
        parts = rest.split(".")
        if parts[0] == "transformer_blocks" and len(parts) > 3 and parts[1].isdigit():
            block = ".".join(parts[:2])
            if parts[2] == "pos_embed":
                for attn in ("attention_blocks.0", "attention_blocks.1"):
                    out[f"{head}{block}.{attn}.pos_encoder.{'.'.join(parts[3:])}"] = value
                continue
            rest = ".".join([block, _DIFFUSERS_BLOCK_PARTS.get(parts[2], parts[2]), *parts[3:]])
        out[head + rest] = value
    return out


def with_positional_tables(sd: dict, cfg: MotionConfig, name: str = "the motion module") -> dict:
    """``sd`` with the sinusoidal tables of every attention block where the file stores none at all (AnimateDiff's
    training code since July 2024 saves them as non-persistent buffers; its loader recomputes them for every
    file, stored or not, and the stored ones of the published files equal them). A file with some tables
    but not others is left as it is: the strict load names the missing ones."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MotionModuleSet(cfg).state_dict().items()
                  if k.endswith("pos_encoder.pe")}
    if any(k in sd for k in shapes):
        return sd
    logger.info("%s stores no positional tables: the sinusoidal ones AnimateDiff computes are used (%d frames; a "
                "module without a mid block is taken as v3)", name, cfg.max_len)
    return {**sd, **{k: sinusoidal_table(shape[1], shape[2]) for k, shape in shapes.items()}}


def infer_motion_config(sd: dict, name: str = "the motion module") -> MotionConfig:
    """Read a MotionConfig off the key layout and shapes of a motion-module state dict in the published layout
    (``published_layout``).

    The structure comes from every key under ``...motion_modules.j.`` (not one key per module), so a file with a
    weight missing is built at its full structure and refused by the loader as incomplete, never loaded as a
    smaller network. ``name``: how errors call the file.
    """
    modules: dict[str, dict[int, set]] = {"down": {}, "up": {}, "mid": {}}
    channels: dict[int, dict[int, int]] = {}  # down level -> {module j: channels}
    max_len, depth, num_attn = None, 0, 0
    for key, value in sd.items():
        place = _motion_key_place(key)
        if place is None:
            continue
        kind, level, j, rest = place
        modules[kind].setdefault(level, set()).add(j)
        rest = rest.removeprefix("temporal_transformer.")
        if kind == "down" and rest in _CHANNEL_KEYS and isinstance(value, torch.Tensor) and value.dim() >= 1:
            channels.setdefault(level, {}).setdefault(j, int(value.shape[0]))
        if key.endswith("pos_encoder.pe") and isinstance(value, torch.Tensor) and value.dim() == 3:
            max_len = value.shape[1]
        if ".transformer_blocks." in key:
            after = key.split(".transformer_blocks.")[1].split(".")
            if after[0].isdigit():
                depth = max(depth, int(after[0]) + 1)
            if len(after) > 2 and after[1] == "attention_blocks" and after[2].isdigit():
                num_attn = max(num_attn, int(after[2]) + 1)
    down = modules["down"]
    if not down:
        raise KinemaError(f"{name} has no AnimateDiff motion modules (no 'down_blocks.N.motion_modules' keys)")
    if max_len is None:  # tables not stored (recomputed by ``with_positional_tables``): v2/v3's length
        max_len = COMPUTED_TABLE_LENGTH
    damaged = "the file is incomplete or damaged: download it again"
    levels = sorted(down)
    if levels != list(range(len(levels))):
        raise KinemaError(f"{name} has down_blocks {levels} (a level is missing): {damaged}")
    for kind in ("down", "up", "mid"):
        for level, js in modules[kind].items():
            if sorted(js) != list(range(len(js))):
                where = "mid_block" if kind == "mid" else f"{kind}_blocks.{level}"
                missing = min(set(range(max(js) + 1)) - js)
                raise KinemaError(f"{name} has no weights for '{where}.motion_modules.{missing}': {damaged}")
    down_channels = []
    for level in levels:
        if level not in channels:
            raise KinemaError(
                f"{name} has no norm/proj_in/proj_out weights for 'down_blocks.{level}.motion_modules': {damaged}")
        down_channels.append(channels[level][min(channels[level])])
    per_down = max(len(js) for js in down.values())
    per_up = max((len(js) for js in modules["up"].values()), default=0) or per_down + 1
    if per_up != per_down + 1:  # the UNet's up levels have one block more than its down levels, each a module
        raise KinemaError(f"{name} has {per_up} motion modules an up block and {per_down} a down block, where the "
                          f"SD1.5 layout has {per_down + 1} and {per_down}: {damaged}")
    return MotionConfig(
        down_channels=tuple(down_channels),
        modules_per_down=per_down,
        modules_per_up=per_up,
        has_mid=bool(modules["mid"]),
        max_len=max_len,
        depth=depth or 1,
        num_attn=num_attn or 2,
    )


MOTION_SCALE_RANGE = (0.0, 2.0)  # what the motion_scale input of Apply Motion Module allows


def parse_scale(text: str) -> tuple[float, ...]:
    """Per-frame motion scales from text: ``"1.0, 1.0, 0.8"`` (one value per frame, commas or spaces), each a
    finite number in ``MOTION_SCALE_RANGE``."""
    values = []
    low, high = MOTION_SCALE_RANGE
    for part in text.replace(",", " ").split():
        try:
            value = float(part)
        except ValueError:
            raise KinemaError(
                f"motion_scale_per_frame: '{part}' is not a number; write one number per frame, e.g. '1.0, 1.0, 0.8'"
            ) from None
        if not low <= value <= high:  # also false for nan
            raise KinemaError(
                f"motion_scale_per_frame: '{part}' is outside {low:g}..{high:g}, the range motion_scale allows "
                "(1 = as trained, 0 = frames drawn independently); write one such number per frame, e.g. "
                "'1.0, 1.0, 0.8'"
            )
        values.append(value)
    return tuple(values)


def scale_for_frames(scale: float | tuple[float, ...], frames: Sequence[int]) -> float | torch.Tensor:
    """The motion scale of ``frames`` (video frame indices): a float stays a float; per-frame values
    are looked up, the last value holding for frames past the end of the list."""
    if not isinstance(scale, tuple):
        return float(scale)
    if not scale:
        return 1.0
    last = len(scale) - 1
    values = [scale[min(i, last)] for i in frames]
    if len(set(values)) == 1:
        return values[0]
    return torch.tensor(values, dtype=torch.float32)


class _Binding:
    """Routes the UNet's temporal slots to a motion module set, with a scale (and block offload's streamer)."""

    def __init__(self, motion: MotionModuleSet, unet_cfg: UNetConfig, scale: float | torch.Tensor):
        self.motion, self.unet_cfg, self.scale = motion, unet_cfg, scale

    def modules(self, slot: Slot) -> list[nn.Module]:
        """The modules ``apply`` runs at ``slot`` (block offload streams them with the UNet block)."""
        module = self.motion.module_for(slot, self.unet_cfg)
        return [] if module is None else [module]

    def apply(self, slot: Slot, h: torch.Tensor, opts: RunOptions) -> torch.Tensor:
        module = self.motion.module_for(slot, self.unet_cfg)
        if module is None:
            return h
        return module(h, opts.num_frames, self.scale, opts.attn_chunk)


@dataclass(frozen=True)
class MotionModel:
    """An SD1.5 UNet with a motion module applied, by composition (neither is modified).

    ``temporal=False`` runs the same network with the motion modules bypassed
    (frames independent), which temporal guidance needs. ``controls`` (``addons.ControlHint``) and
    ``contents`` (``addons.ImageContent``) are ControlNets and IP-Adapters applied on every call.
    """

    unet: UNetModel
    motion: MotionModuleSet | None = None
    scale: float | tuple[float, ...] = 1.0  # a float, or one value per video frame (the last one holds)
    cross_frame_norm: bool | None = None  # None: as the motion module's version was trained (v1 only)
    beta_schedule: str = "linear"  # AnimateDiff samples with linear betas; plain SD1.5 with scaled_linear
    name: str = ""
    controls: tuple = ()
    contents: tuple = ()
    temporal_scale: float = 1.0  # Gen-1 temporal guidance w_t (1: the plain video model), see guidance.CFGDenoiser
    offload: OffloadOptions = NO_OFFLOAD  # the memory policy: model or block offload (offload.OffloadOptions)
    compile: CompileOptions | None = None  # the UNet through torch.compile (compiling.CompileOptions)

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes: the offload device under model or block offload, else where its weights are."""
        return compute_device(self.unet, self.offload)

    def with_options(self, **changes) -> MotionModel:
        return replace(self, **changes)

    @property
    def max_frames(self) -> int | None:
        return None if self.motion is None else self.motion.cfg.max_len

    def check_frames(self, num_frames: int, context_length: int | None = None) -> None:
        """Raise KinemaError unless the model can see ``num_frames`` at once (or windows of ``context_length``)."""
        if num_frames < 1:
            raise KinemaError("a video needs at least 1 frame")
        if self.max_frames is None:
            return
        name = self.name or self.motion.version
        if context_length is not None and min(context_length, num_frames) > self.max_frames:
            raise KinemaError(
                f"the motion module '{name}' sees at most {self.max_frames} frames at once and the context length is "
                f"{context_length}: set the context length to {self.max_frames} or less (16 is the usual choice)"
            )
        if context_length is None and num_frames > self.max_frames:
            raise KinemaError(
                f"the motion module '{name}' sees at most {self.max_frames} frames at once and {num_frames} were "
                f"asked for: connect a Context Options (Kinema) node to the sampler for longer videos, or lower the "
                f"frame count to {self.max_frames} or less"
            )

    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        attn_chunk: int = 0,
        temporal: bool = True,
        window=None,
        sigma: float | None = None,
        uncond=None,
        control_reuse: ControlReuse | None = None,
    ) -> torch.Tensor:
        """(b f) c h w, timesteps [(b f)], context [(b f), n, d] -> eps (b f) c h w

        ``window`` (a ``context.ContextWindow``): the frames are those of the window's ``sub_idxs`` in a longer
        video; per-frame options (the motion scale, ControlNet hints) are taken for those frames. ``sigma``: the
        step's noise level (add-ons keep to their start/end range; None: always on); ``uncond``: one flag per
        video of the batch, True for the unconditional side of guidance. ``control_reuse``: ControlNet residuals
        shared with another evaluation at the same inputs (``addons.ControlReuse``).
        """
        use_motion = temporal and self.motion is not None
        materialize(self.unet)  # a deferred LoRA merge (done already where the call is placed: sampling)
        if use_motion:
            materialize(self.motion)
        cross = self.cross_frame_norm
        if cross is None:
            cross = use_motion and self.motion.version == "v1"
        opts = RunOptions(num_frames=num_frames, cross_frame_norm=bool(cross), attn_chunk=attn_chunk)
        binding = None
        frames = video_frames(window, num_frames)
        if use_motion:
            binding = _Binding(self.motion, self.unet.cfg, scale_for_frames(self.scale, frames))
        control = cross_extra = None
        if self.controls or self.contents:
            schedule = DiscreteSchedule(self.beta_schedule)
            videos = x.shape[0] // num_frames
            flags = tuple(uncond) if uncond is not None else (False,) * videos

            def residuals():
                return control_residuals(self.controls, x, timesteps, context, frames, sigma, schedule,
                                         replace(opts, cross_frame_norm=False))

            control = residuals() if control_reuse is None else control_reuse.residuals_for(residuals, flags,
                                                                                             num_frames)
            cross_extra = content_cross_extra(self.contents, self.unet.cfg, num_frames, flags, sigma, schedule)
        if self.compile is not None:  # found here: inside the UNet it is a data-dependent branch, a graph break
            context = SharedContext.checked(context)
        return compiling.run_unet(self.unet, self.offload, self.compile, x, timesteps, context, opts, binding,
                                  control=control, cross_extra=cross_extra)
