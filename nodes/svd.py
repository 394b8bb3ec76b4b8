"""Stable Video Diffusion nodes: the checkpoint loader, the image conditioning, per-frame guidance."""
from __future__ import annotations

from ..models import checkpoint, memory, pipelines, placement, svd_model
from ..models.errors import KinemaError
from ..models.guidance import CFG_MODES
from . import host
from .loaders import PRECISION_TOOLTIP

FROM_CHECKPOINT = "(from checkpoint)"


class KinemaSVDLoader:
    DESCRIPTION = (
        "Loads a Stable Video Diffusion checkpoint as published (svd.safetensors, svd_xt.safetensors and their 1.1 "
        "versions) from models/checkpoints: the spatio-temporal UNet, the CLIP image encoder and the VAE with its "
        "temporal decoder. Files with xt as a word of the name (svd_xt, SVD_XT_1_1, img2vidXt) are SVD-XT: its "
        "per-frame guidance starts at {xt.min_cfg:.1f} (SVD's at "
        "{svd.min_cfg:.1f}). The reference settings to give the other nodes: SVD {svd.frames} frames, cfg "
        "{svd.max_cfg:.1f}, 25 steps; SVD-XT {xt.frames} frames, cfg {xt.max_cfg:.1f}, 30 steps; both euler with "
        "scheduler karras (the original's EDM noise levels)."
    ).format(svd=svd_model.VARIANTS["svd"], xt=svd_model.VARIANTS["svd_xt"])
    CATEGORY = "Kinema/loaders"
    RETURN_TYPES = ("KINEMA_MODEL", "KINEMA_CLIP_VISION", "KINEMA_VAE")
    RETURN_NAMES = ("model", "clip_vision", "vae")
    OUTPUT_TOOLTIPS = (
        "The image-to-video model; connect it to the Video Sampler (Kinema).",
        "The CLIP image encoder; connect it to SVD Image Conditioning (Kinema).",
        "The VAE (temporal decoder); connect it to SVD Image Conditioning and VAE Decode Frames.",
    )
    FUNCTION = "load"
    MODEL_INPUTS = {"ckpt_name": "checkpoints", "clip_vision_name": "clip_vision"}

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (host.list_models("checkpoints"), {
                    "tooltip": "An SVD checkpoint in models/checkpoints, e.g. svd_xt.safetensors (SD1.5 files go "
                               "to Load Checkpoint (Kinema))."}),
                "precision": (list(memory.PRECISIONS), {
                    "default": "auto",
                    "tooltip": PRECISION_TOOLTIP}),
            },
            "optional": {
                "clip_vision_name": ([FROM_CHECKPOINT] + host.list_models("clip_vision"), {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "Where the CLIP image encoder comes from: the checkpoint, or a ViT-H/14 file in "
                               "models/clip_vision (e.g. clip_vision_h.safetensors) for checkpoints without it."}),
            },
        }

    def load(self, ckpt_name, precision="auto", clip_vision_name=FROM_CHECKPOINT):
        path = host.resolve_model("checkpoints", ckpt_name)
        clip_path = None
        if clip_vision_name and clip_vision_name != FROM_CHECKPOINT:
            clip_path = host.resolve_model("clip_vision", clip_vision_name)
        dtypes = host.load_dtypes(precision)
        bundle = checkpoint.load_svd(path, dtype=dtypes.weights, vae_dtype=dtypes.vae, encoder_dtype=dtypes.encoders,
                                     clip_vision_path=clip_path)
        video_policy, _ = host.memory_defaults()
        model = bundle.model.with_options(offload=video_policy)
        placement.rest(model, video_policy)
        return (model, host.placed(bundle.image_encoder), host.placed_vae(bundle.vae))


class KinemaSVDConditioning:
    DESCRIPTION = (
        "Image-to-video conditioning for Stable Video Diffusion: the CLIP embedding of the init image, the VAE "
        "latents of the image with a little noise (augmentation), and fps / motion / augmentation "
        "micro-conditioning. The negative side has the embedding and latents zeroed, as in the original."
    )
    CATEGORY = "Kinema/conditioning"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("Connect to positive of the Video Sampler (Kinema).",
                       "Connect to negative of the Video Sampler (Kinema).",
                       "The empty latent video [frames, 4, height/8, width/8] to sample.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip_vision": ("KINEMA_CLIP_VISION", {"tooltip": "From Load SVD Checkpoint (Kinema)."}),
                "vae": ("KINEMA_VAE", {"tooltip": "From Load SVD Checkpoint (Kinema)."}),
                "init_image": ("IMAGE", {"tooltip": "The first frame; scaled to cover width x height and "
                                                    "centre-cropped (only the first image of a batch is used)."}),
                "width": ("INT", {"default": 1024, "min": 8, "max": 8192, "step": 8,
                                  "tooltip": "Video width (SVD was trained at 1024x576)."}),
                "height": ("INT", {"default": 576, "min": 8, "max": 8192, "step": 8,
                                   "tooltip": "Video height."}),
                "video_frames": ("INT", {"default": 14, "min": 1, "max": 4096,
                                         "tooltip": "Frames to make: 14 for SVD, 25 for SVD-XT; more needs Context "
                                                    "Options on the sampler."}),
                "fps": ("INT", {"default": 7, "min": 1, "max": 1024,
                                "tooltip": "The frame rate the motion is made for (the model is given fps - 1, as "
                                           "trained)."}),
                "motion_bucket_id": ("INT", {"default": 127, "min": 0, "max": 1023,
                                             "tooltip": "More motion with higher values (127 as trained)."}),
                "augmentation_level": ("FLOAT", {"default": 0.02, "min": 0.0, "max": 10.0, "step": 0.01,
                                                 "tooltip": "Noise added to the init image before it is encoded: "
                                                            "higher frees the video from the image (more motion, "
                                                            "less likeness)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the augmentation noise."}),
            },
            "optional": {
                "content_image": ("IMAGE", {
                    "tooltip": "Optional content image (Gen-1's content): its CLIP embedding replaces the init "
                               "image's, so the video keeps the init image's first frame but takes its look from "
                               "this image."}),
            },
        }

    def encode(self, clip_vision, vae, init_image, width, height, video_frames, fps, motion_bucket_id,
               augmentation_level, seed=0, content_image=None):
        opts = svd_model.ImageConditioningOptions(width=width, height=height, frames=video_frames, fps=fps,
                                                  motion_bucket_id=motion_bucket_id,
                                                  augmentation_level=augmentation_level, seed=seed)
        opts.validate()
        latent = pipelines.empty_video_latent(video_frames, width, height)
        host.check_interrupt()
        cond, uncond = svd_model.image_conditioning(clip_vision, vae, init_image, opts, content_image)
        positive = [[cond["context"], {"kinema_image_conditioning": cond}]]
        negative = [[uncond["context"], {"kinema_image_conditioning": uncond}]]
        return (positive, negative, {"samples": latent})


CHECKPOINT_MIN_CFG = -1.0  # Per-frame Guidance's min_cfg that keeps the checkpoint's own


class KinemaPerFrameGuidance:
    DESCRIPTION = (
        "Per-frame guidance for image-to-video (Stable Video Diffusion's guiders): the Video Sampler's cfg becomes "
        "the largest scale, and frames get less guidance where they need it less. linear: min_cfg at the first "
        "frame (close to the init image) rising to cfg at the last; triangle: min_cfg at both ends, cfg in the "
        "middle; constant: cfg everywhere. Without this node the checkpoint's defaults apply (linear; "
        "min 1.0 for SVD, 1.5 for SVD-XT)."
    )
    CATEGORY = "Kinema/sampling"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this guidance; connect it to the Video Sampler (Kinema).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "From Load SVD Checkpoint (Kinema)."}),
                "mode": (list(CFG_MODES), {"default": "linear",
                                           "tooltip": "How the guidance scale runs over the frames."}),
                "min_cfg": ("FLOAT", {"default": CHECKPOINT_MIN_CFG, "min": CHECKPOINT_MIN_CFG, "max": 100.0,
                                      "step": 0.05, "round": 0.01,
                                      "tooltip": "The smallest scale (the sampler's cfg is the largest). -1: the "
                                                 "checkpoint's own, 1.0 for SVD, 1.5 for SVD-XT."}),
                "period": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 10.0, "step": 0.05,
                                     "tooltip": "triangle: the wave's period over the video (1 = one peak)."}),
            }
        }

    def apply(self, model, mode="linear", min_cfg=CHECKPOINT_MIN_CFG, period=1.0):
        if not isinstance(model, svd_model.SVDModel):
            raise KinemaError("Per-frame Guidance (Kinema) is for image-to-video models: connect the model of Load "
                              "SVD Checkpoint (Kinema)")
        own = min_cfg == CHECKPOINT_MIN_CFG  # a finite number within the widget's range (nodes/inputs.py)
        if not own and min_cfg < 0:
            raise KinemaError(f"Per-frame Guidance (Kinema): min_cfg is {min_cfg:g}: give 0 or more, or -1 for the "
                              "checkpoint's own")
        return (model.with_options(cfg_mode=mode, min_cfg=None if own else float(min_cfg),
                                   cfg_period=float(period)),)


NODE_CLASS_MAPPINGS = {
    "KinemaSVDLoader": KinemaSVDLoader,
    "KinemaSVDConditioning": KinemaSVDConditioning,
    "KinemaPerFrameGuidance": KinemaPerFrameGuidance,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KinemaSVDLoader": "Load SVD Checkpoint (Kinema)",
    "KinemaSVDConditioning": "SVD Image Conditioning (Kinema)",
    "KinemaPerFrameGuidance": "Per-frame Guidance (Kinema)",
}
