"""The SD1.5 spatial UNet in the original LDM names, with slots for temporal modules.

The network is described by a small ``UNetConfig`` inferred from a checkpoint's
tensor shapes. Temporal modules (AnimateDiff motion modules) are not attached
to the UNet: they are passed to ``forward`` as ``temporal``, an object with
``apply(slot, h, opts) -> h``, so applying a motion module never changes the
loaded base model. Slots are ``("input", i)``, ``("middle", 0)`` and
``("output", i)``: after block ``i``'s ResBlock/attention, before its
down/upsampler.

Two more per-call inputs, also never stored on the model: ``control``, the
residuals of ControlNets (one per input block, added to its skip connection,
then one for the middle block's output, as the original ControlledUnetModel
adds them), and ``cross_extra(slot, j)``, extra keys/values for the
cross-attention of transformer block ``j`` in ``slot`` (IP-Adapter's image
tokens).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .errors import KinemaError
from .layers import (
    Downsample,
    ExtraKV,
    ResBlock,
    RunOptions,
    SharedContext,
    SpatialTransformer,
    Upsample,
    group_norm,
    timestep_embedding,
)
from .offload import BlockStreamer, call_directly, stream_blocks

Slot = tuple  # ("input" | "middle" | "output", index)


class Temporal(Protocol):
    def apply(self, slot: Slot, h: torch.Tensor, opts: RunOptions) -> torch.Tensor: ...


CrossExtra = Callable[[Slot, int], ExtraKV]


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int = 8
    linear_proj: bool = False

    @property
    def levels(self) -> int:
        return len(self.channel_mult)


def ldm_blocks(cfg, res, attn) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList, int]:
    """The LDM UNet layout shared by the SD1.5 and the SVD UNets: ``(input_blocks, middle_block,
    output_blocks, channels out)``, named as in the checkpoints.

    ``cfg`` has ``in_channels``, ``model_channels``, ``channel_mult``, ``num_res_blocks`` and
    ``attention_levels``; ``res(ch_in, ch_out)`` and ``attn(ch)`` make a level's ResBlock and transformer.
    """
    mc = cfg.model_channels
    levels = len(cfg.channel_mult)
    input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_channels = [mc]
    ch = mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [res(ch, mc * mult)]
            ch = mc * mult
            if level in cfg.attention_levels:
                layers.append(attn(ch))
            input_blocks.append(nn.ModuleList(layers))
            skip_channels.append(ch)
        if level != levels - 1:
            input_blocks.append(nn.ModuleList([Downsample(ch)]))
            skip_channels.append(ch)

    middle_block = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

    output_blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            layers = [res(ch + skip_channels.pop(), mc * mult)]
            ch = mc * mult
            if level in cfg.attention_levels:
                layers.append(attn(ch))
            if level and i == cfg.num_res_blocks:
                layers.append(Upsample(ch))
            output_blocks.append(nn.ModuleList(layers))
    return input_blocks, middle_block, output_blocks, ch


def sd15_blocks(cfg: UNetConfig) -> tuple[nn.Sequential, nn.ModuleList, nn.ModuleList, nn.ModuleList, int]:
    """``time_embed`` and the ``ldm_blocks`` of an SD1.5 UNet (shared by the UNet and the ControlNet)."""
    mc = cfg.model_channels
    emb = mc * 4
    time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

    def attn(ch: int) -> SpatialTransformer:
        return SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, cfg.linear_proj)

    return (time_embed, *ldm_blocks(cfg, lambda ch_in, ch_out: ResBlock(ch_in, emb, ch_out), attn))


class UNetModel(nn.Module):
    """SD1.5 UNet; keys as in ``model.diffusion_model.*`` of the single-file checkpoint."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed, self.input_blocks, self.middle_block, self.output_blocks, ch = sd15_blocks(cfg)

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def _run_block(self, block, held, emb, context, opts, temporal, slot, up_size=None, cross_extra=None):
        """The layers of ``block`` (and the temporal module of its ``slot``) on the input in ``held``, a list the
        caller hands the input over in: it is emptied here, so the input is freed as soon as the first layer is
        done with it (at the output blocks that is the concatenated skip, the largest tensor of the level)."""
        extra = None if cross_extra is None else (lambda j: cross_extra(slot, j))
        h = held.pop()
        for layer in block:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, opts)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, opts, extra)
            elif isinstance(layer, Upsample):
                if temporal is not None:
                    h = temporal.apply(slot, h, opts)
                    temporal = None
                h = layer(h, up_size)
            elif isinstance(layer, Downsample):
                h = layer(h)
            else:
                h = layer(h)
        if temporal is not None and not isinstance(block[0], Downsample) and slot[0] != "middle":
            h = temporal.apply(slot, h, opts)
        return h

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        opts: RunOptions = RunOptions(),
        temporal: Temporal | None = None,
        control: Sequence[torch.Tensor] | None = None,
        cross_extra: CrossExtra | None = None,
        stream: BlockStreamer | None = None,
        call_block: Callable = call_directly,
    ) -> torch.Tensor:
        """(b f) c h w, timesteps [(b f)], context [(b f), n, d] -> (b f) c h w

        ``control``: one residual per input block then one for the middle block (ControlNet's outputs);
        ``cross_extra(slot, j)``: extra cross-attention keys/values of transformer block j in ``slot``;
        ``stream``: block offload, each block made resident on the compute device just before it runs;
        ``call_block(fn, *args)``: how each block's function is called (a compiled call, one graph per block).
        """
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise KinemaError(f"the ControlNet gives {len(control)} residuals, the UNet takes "
                              f"{len(self.input_blocks) + 1}: the ControlNet was made for another UNet layout")
        if stream is not None:
            stream.use(self.time_embed)
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        context = SharedContext.of(context)  # one prompt for many frames: its keys/values projected once
        hs = []
        h = x
        for i, block in enumerate(stream_blocks(stream, self.input_blocks, "input", temporal)):
            h = call_block(self._run_block, block, [h], emb, context, opts, temporal if i else None, ("input", i),
                           cross_extra=cross_extra)
            hs.append(h if control is None else h + control[i].to(h.dtype))
        for _ in stream_blocks(stream, [self.middle_block], "middle", temporal):
            h = call_block(self._run_middle, h, emb, context, opts, temporal, cross_extra)
        if control is not None:
            h = h + control[-1].to(h.dtype)
        for i, block in enumerate(stream_blocks(stream, self.output_blocks, "output", temporal)):
            held = [torch.cat([h, hs.pop()], dim=1)]
            del h  # the block's input lives in ``held`` only (see _run_block)
            up_size = hs[-1].shape[-2:] if hs else None
            h = call_block(self._run_block, block, held, emb, context, opts, temporal, ("output", i), up_size,
                           cross_extra)
        if stream is not None:
            stream.use(self.out)
        h = group_norm(self.out[0], h, opts)
        return self.out[2](self.out[1](h))

    def _run_middle(self, h, emb, context, opts, temporal, cross_extra=None):
        """The middle block: ResBlock, transformer, the temporal module of ``("middle", 0)``, ResBlock."""
        mid = self.middle_block
        h = mid[0](h, emb, opts)
        h = mid[1](h, context, opts, None if cross_extra is None else (lambda j: cross_extra(("middle", 0), j)))
        if temporal is not None:
            h = temporal.apply(("middle", 0), h, opts)
        return mid[2](h, emb, opts)


def scan_input_blocks(get) -> tuple[list[int], list[int], list[tuple[int, str]]]:
    """Walk the ``input_blocks`` of an LDM UNet state dict through ``get(key) -> tensor | None``.

    Returns (output channels of each level, ResBlocks in each level, ``(level, key prefix)`` of each
    transformer, e.g. ``(0, "input_blocks.1.1.")``). Shared by the SD1.5 and SVD config inference.
    """
    chans, blocks_in_level, attention = [], [], []
    i, level, count = 1, 0, 0
    while get(f"input_blocks.{i}.0.op.weight") is not None or get(f"input_blocks.{i}.0.in_layers.2.weight") is not None:
        if get(f"input_blocks.{i}.0.op.weight") is not None:
            blocks_in_level.append(count)
            level, count = level + 1, 0
        else:
            if count == 0:
                chans.append(get(f"input_blocks.{i}.0.out_layers.3.weight").shape[0])
            count += 1
            if get(f"input_blocks.{i}.1.proj_in.weight") is not None:
                attention.append((level, f"input_blocks.{i}.1."))
        i += 1
    blocks_in_level.append(count)
    return chans, blocks_in_level, attention


def transformer_depth(get, prefix: str) -> int:
    """How many ``transformer_blocks`` the transformer at key ``prefix`` has."""
    d = 0
    while get(f"{prefix}transformer_blocks.{d}.attn2.to_k.weight") is not None:
        d += 1
    return d


def infer_unet_config(sd: dict, prefix: str = "") -> UNetConfig:
    """Read a UNetConfig off the tensor shapes of an LDM UNet state dict."""

    def get(key):
        return sd.get(prefix + key)

    conv_in = get("input_blocks.0.0.weight")
    if conv_in is None:
        raise KinemaError(f"no UNet found: the key '{prefix}input_blocks.0.0.weight' is missing")
    mc, in_ch = conv_in.shape[0], conv_in.shape[1]
    chans, blocks_in_level, attention = scan_input_blocks(get)
    if len(set(blocks_in_level)) != 1 or not chans:
        raise KinemaError("the UNet's block layout is not an SD1.5 layout (uneven levels)")
    if not attention:
        raise KinemaError("the UNet has no cross-attention layers: it is not an SD1.5 UNet")
    last = attention[-1][1]
    out = get("out.2.weight")  # a ControlNet (the encoder half) has none
    return UNetConfig(
        in_channels=in_ch,
        out_channels=in_ch if out is None else out.shape[0],
        model_channels=mc,
        channel_mult=tuple(c // mc for c in chans),
        num_res_blocks=blocks_in_level[0],
        attention_levels=tuple(sorted({level for level, _ in attention})),
        transformer_depth=transformer_depth(get, last),
        context_dim=get(last + "transformer_blocks.0.attn2.to_k.weight").shape[1],
        num_heads=8,
        linear_proj=get(last + "proj_in.weight").ndim == 2,
    )
