"""The demo Stable Video Diffusion checkpoint in the engine and in diffusers, shared by the tests and the bench.

``svd_state_dict()`` is the pack's demo SVD (``models/demo.py``: the published key layout at a tiny width,
random weights). ``diffusers_svd_pipeline(bundle)`` builds diffusers' ``StableVideoDiffusionPipeline`` on the same
tensors through the tests' own key mappings (``fixtures_svd_unet``, ``fixtures_temporal_vae``), with sgm's
ResBlock GroupNorm eps (diffusers' differs, see fixtures_svd_unet), the engine's CLIP image tower (its
conversion is checked against open_clip in test_clip_vision) and the scheduler of the published diffusers
SVD repositories.

The sizes are the demo's (``TINY``) unless the bench switches to ``MEDIUM`` with ``use_sizes``: the real SVD
block structure at a reduced width, as ``fixtures.MEDIUM`` is for AnimateDiff.
"""
from __future__ import annotations

import functools
import os

import torch

from kinema.models import checkpoint, demo, pipelines, svd_model
from kinema.models.vae import SVD_COND_ENCODER_PREFIX, SVD_VAE_PREFIX


#: the demo SVD's sizes (32 model channels, context 64, VAE 32)
TINY = demo.DemoSizes()
#: the real SVD block structure (channel_mult (1, 2, 4, 4), attention at levels 0-2, VAE ch_mult (1, 2, 4, 4)) at
#: reduced width: 128 model channels (SVD: 320; the heads are 64 channels wide, so the width must be a multiple
#: of 64: 2/4/8/8 heads), context 512 (SVD's CLIP ViT-H/14 projection: 1024), VAE 64 (128). The CLIP image tower
#: stays the demo's (it runs once a video).
MEDIUM = demo.DemoSizes(model_channels=128, channel_mult=(1, 2, 4, 4), clip_hidden=512, vae_ch=64,
                        vae_mult=(1, 2, 4, 4))
#: the published SVD widths (VideoUNet 320 channels, context 1024, VAE 128); the CLIP image tower stays the demo's
REAL = demo.DemoSizes(model_channels=320, channel_mult=(1, 2, 4, 4), clip_hidden=1024, vae_ch=128,
                      vae_mult=(1, 2, 4, 4))
#: the sizes ``svd_state_dict`` builds at (``use_sizes`` changes them)
SIZES = TINY


def use_sizes(sizes: demo.DemoSizes) -> None:
    """Build the demo SVD at ``sizes`` from now on (the cache is dropped). For the benches."""
    global SIZES
    SIZES = sizes
    svd_state_dict.cache_clear()


@functools.lru_cache(maxsize=None)
def svd_state_dict() -> dict:
    """The demo SVD checkpoint (fp32, seed 0) at ``SIZES``, published layout. Read-only."""
    return demo.svd_state_dict(0, torch.float32, SIZES)


def write_svd(path: str) -> str:
    demo._save(svd_state_dict(), path)
    return path


def tiny_img2vid(directory: str, frames: int = 3, size: int = 64):
    """The demo-size SVD file written to ``directory`` and loaded, and an image's conditioning for a ``frames``
    video of ``size`` pixels: (bundle, cond, uncond, the empty latent)."""
    bundle = checkpoint.load_svd(write_svd(os.path.join(directory, "svd_tiny.safetensors")))
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(1))
    cond, uncond = svd_model.image_conditioning(
        bundle.image_encoder, bundle.vae, image,
        svd_model.ImageConditioningOptions(width=size, height=size, frames=frames))
    return bundle, cond, uncond, pipelines.empty_video_latent(frames, size, size)


def diffusers_svd_pipeline(bundle, sd: dict | None = None, build_device: str | None = None):
    """diffusers ``StableVideoDiffusionPipeline`` holding the tensors of ``sd`` (default ``svd_state_dict()``, the
    published layout); ``bundle`` is the engine's ``checkpoint.load_svd`` of the same file (its configs and CLIP
    image tower are reused). ``build_device``: where the UNet and VAE are made (their random initialisation is
    slow on the CPU at the real size; the GPU bench makes them on the GPU), else the CPU."""
    import diffusers
    from fixtures_svd_unet import diffusers_svd_config, sgm_resblock_eps, sgm_to_diffusers
    from fixtures_temporal_vae import to_diffusers_keys
    from transformers import CLIPImageProcessor

    sd = svd_state_dict() if sd is None else sd
    cfg = bundle.model.unet.cfg
    with torch.device(build_device or "cpu"):
        unet = diffusers.UNetSpatioTemporalConditionModel(**diffusers_svd_config(cfg))
    unet.load_state_dict(sgm_to_diffusers(checkpoint.sub_state_dict(sd, "model.diffusion_model."), cfg), strict=True)
    sgm_resblock_eps(unet)
    vcfg = bundle.vae.cfg
    widths = tuple(vcfg.ch * m for m in vcfg.ch_mult)
    with torch.device(build_device or "cpu"):
        vae = diffusers.AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
            block_out_channels=widths, layers_per_block=vcfg.num_res_blocks, latent_channels=vcfg.z_channels)
    vae_sd = {k: v for k, v in checkpoint.sub_state_dict(sd, SVD_VAE_PREFIX).items() if k.startswith("decoder.")}
    vae_sd.update({k: v for k, v in checkpoint.sub_state_dict(sd, SVD_COND_ENCODER_PREFIX).items()
                   if k.startswith(("encoder.", "quant_conv."))})
    vae.load_state_dict(to_diffusers_keys(vae_sd, len(widths)), strict=True)
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002,
        sigma_max=700.0, timestep_spacing="leading", timestep_type="continuous", steps_offset=1)
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=vae.eval().requires_grad_(False), image_encoder=bundle.image_encoder.model,
        unet=unet.eval().requires_grad_(False), scheduler=scheduler, feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe
