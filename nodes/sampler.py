"""The video sampler node."""
from __future__ import annotations

from ..models import pipelines, prompt_travel
from ..models.errors import KinemaError
from ..models.preview import contact_sheet
from ..models.sampling import SAMPLERS, SCHEDULERS
from ..models.svd_model import SVDModel
from . import host
from .checks import latent_batch_index, latent_samples, same_tensor

IMAGE_CONDITIONING = "kinema_image_conditioning"
NODE = "Video Sampler (Kinema)"

#: the keys of a CONDITIONING entry's dict the sampler reads (Text Encode's pooled output, Prompt Schedule's
#: keyframes, SVD Image Conditioning's dict); ``attention_mask`` comes with some of core's text encodings and
#: holds nothing for SD1.5's 77-token chunks
HONOURED_KEYS = frozenset({"pooled_output", "attention_mask", "kinema_keyframes", "kinema_interpolation",
                           IMAGE_CONDITIONING})
_WHOLE_FRAMES = "Kinema's sampler conditions whole frames; remove the node"
_EVERY_STEP = ("a timestep range (ConditioningSetTimestepRange): Kinema's sampler uses a conditioning for every "
               "step; remove the node")
#: keys core nodes add that change what a sampler does, which Kinema's does not do: refused, never ignored
#: (key -> (its value that changes nothing, or None: any value does; what it is and what to do))
REFUSED_KEYS = {
    "control": (None, ("a ControlNet from core's Apply ControlNet, which Kinema's video models do not run: use "
                       "Load ControlNet (Kinema) and Apply ControlNet (Kinema) on the model")),
    "area": (None, f"an area (ConditioningSetArea): {_WHOLE_FRAMES}"),
    "mask": (None, f"a mask (ConditioningSetMask): {_WHOLE_FRAMES}"),
    "strength": (1.0, ("a strength other than 1 (ConditioningSetArea/SetMask): remove the node, or weight words "
                       "in the prompt, e.g. (red fox:1.2)")),
    "start_percent": (0.0, _EVERY_STEP),
    "end_percent": (1.0, _EVERY_STEP),
    "gligen": (None, "GLIGEN boxes, which Kinema's sampler does not run: remove the node"),
    "concat_latent_image": (None, ("an image conditioning from a core node (SVD_img2vid_Conditioning, an inpaint or "
                                   "InstructPix2Pix conditioning): for SVD, use SVD Image Conditioning (Kinema)")),
}


def _single_entry(conditioning, what):
    fix = "connect Text Encode (Kinema), Prompt Schedule (Kinema) or SVD Image Conditioning (Kinema)"
    if not isinstance(conditioning, list) or not conditioning:
        raise KinemaError(f"{NODE}: the {what} conditioning is empty or not a CONDITIONING: {fix}")
    if len(conditioning) > 1:
        raise KinemaError(f"{NODE}: the {what} conditioning holds {len(conditioning)} entries (ConditioningCombine "
                          "makes several), and Kinema's sampler takes one: merge prompts with ConditioningConcat or "
                          "ConditioningAverage, or change them over the frames with Prompt Schedule (Kinema)")
    entry = conditioning[0]
    options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    for key, (neutral, meaning) in REFUSED_KEYS.items():
        if key in options and (neutral is None or options[key] != neutral):
            raise KinemaError(f"{NODE}: the {what} conditioning carries {meaning}")
    ignored = sorted(str(k) for k in options if k not in HONOURED_KEYS and k not in REFUSED_KEYS)
    if ignored:
        host.logger.warning("%s: the %s conditioning's %s %s ignored", NODE, what, ", ".join(ignored),
                            "is" if len(ignored) == 1 else "are")
    return entry[0], options


def image_conditioning(conditioning, what):
    """The image-to-video conditioning dict of a CONDITIONING from SVD Image Conditioning (Kinema)."""
    tensor, options = _single_entry(conditioning, what)
    cond = options.get(IMAGE_CONDITIONING)
    if cond is None:
        raise KinemaError(f"{NODE}: the {what} conditioning is a text conditioning, but the model is an image-to-video "
                          "model: connect the outputs of SVD Image Conditioning (Kinema)")
    if tensor is not cond["context"] and not same_tensor(tensor, cond["context"]):
        raise KinemaError(f"{NODE}: the {what} image conditioning was changed by a conditioning node (ConditioningAverage, "
                          "ConditioningZeroOut, ConditioningConcat, ...), which SVD's conditioning cannot follow: "
                          "connect SVD Image Conditioning (Kinema) to the sampler directly")
    return cond


def conditioning_tensor(conditioning, what, num_frames):
    """The context tensor of a CONDITIONING list ([[tensor, dict]]) for a video of ``num_frames``: [1|f, n, d].

    A Prompt Schedule (Kinema) conditioning becomes one context per frame.
    """
    tensor, options = _single_entry(conditioning, what)
    if IMAGE_CONDITIONING in options:
        raise KinemaError(f"{NODE}: the {what} conditioning is an image-to-video conditioning, but the model is a "
                          "text-to-video model: connect Text Encode (Kinema) or Prompt Schedule (Kinema)")
    if "kinema_keyframes" not in options and getattr(tensor, "ndim", 0) == 3 and tensor.shape[0] > 1:
        raise KinemaError(f"{NODE}: the {what} conditioning holds {tensor.shape[0]} prompts but no keyframes (a core "
                          "node mixed a Prompt Schedule into another conditioning, keeping the other's options): "
                          "change prompts over the frames with Prompt Schedule (Kinema) alone, or put the mixing "
                          "node's inputs the other way round")
    return prompt_travel.resolve_conditioning(tensor, options, num_frames)


class KinemaVideoSampler:
    DESCRIPTION = (
        "Samples a video latent with a video model: AnimateDiff (text or video to video) or Stable Video Diffusion "
        "(image to video, EDM; karras is its scheduler). Same seed, steps, sampler and scheduler give the same "
        "starting noise and noise levels as ComfyUI's KSampler."
    )
    CATEGORY = "Kinema/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The sampled latent video; decode it with VAE Decode Frames (Kinema).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "The video model: Apply Motion Module (text/video-to-video) or "
                                                      "Load SVD Checkpoint (image-to-video)."}),
                "positive": ("CONDITIONING", {"tooltip": "What the video should show."}),
                "negative": ("CONDITIONING", {"tooltip": "What it should not show."}),
                "latent": ("LATENT", {"tooltip": "Empty Video Latent, or an encoded video for video-to-video."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Noise seed (the same noise as ComfyUI's KSampler)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                   "tooltip": "Denoising steps (the references: AnimateDiff 25 with ddim + "
                                              "ddim_uniform; SVD 25, SVD-XT 30 with euler + karras)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (1 = no negative pass, unless Temporal "
                                             "Guidance (Kinema) with w_t other than 1 needs it). Image-to-video: "
                                             "the largest per-frame scale (2.5 for SVD, 3.0 for SVD-XT)."}),
                "sampler_name": (list(SAMPLERS), {"default": "euler", "tooltip": "The sampling method. lcm is for consistency-distilled models "
                                  "(AnimateLCM, an LCM-LoRA): 4 to 8 steps, scheduler sgm_uniform, cfg 1 to 2."}),
                "scheduler": (list(SCHEDULERS), {"default": "normal",
                                                  "tooltip": "How noise levels are spaced. ddim_uniform with the "
                                                             "ddim sampler is AnimateDiff's reference; karras is "
                                                             "SVD's (the EDM schedule, rho 7)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = from pure noise; lower keeps more of the input latent."}),
            },
            "optional": {
                "attention_chunk": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64,
                                            "tooltip": "Split attention queries into chunks of this size (the same "
                                                       "video). It saves memory only where PyTorch's attention "
                                                       "holds the whole score matrix (e.g. Apple MPS); on CUDA and "
                                                       "the CPU it never does, and chunks only cost time. 0 = the "
                                                       "model's Memory Policy (Kinema) chunk, off without one; a "
                                                       "nonzero value here wins."}),
                "batch_cond": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: the positive and negative passes run together (faster). Off: one after the "
                               "other, which needs less memory (the result is the same). On runs out of memory: "
                               "the sampler switches to one after the other by itself. A Memory Policy (Kinema) "
                               "with batch_cond off (or --novram) runs them one after the other either way."}),
                "context_options": ("KINEMA_CONTEXT_OPTIONS", {
                    "tooltip": "Context Options (Kinema): sample long videos in overlapping windows of frames."}),
            },
        }

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise,
               attention_chunk=0, context_options=None, batch_cond=True):
        latent_in = latent_samples(latent, "Video Sampler (Kinema)")
        if latent.get("noise_mask") is not None:
            host.logger.warning("Video Sampler (Kinema) does not inpaint: the latent's noise_mask is ignored and every "
                                "pixel of every frame is sampled")
        opts = pipelines.SampleOptions(seed=seed, steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler,
                                       denoise=denoise, attn_chunk=attention_chunk, context=context_options,
                                       batch_cond=bool(batch_cond), batch_index=latent_batch_index(latent, latent_in))
        # progress moves per window with context windows (a step of a long video is many model calls); the
        # schedule's own step count (ddim_uniform can add one)
        steps_run = max(1, pipelines.sampling_steps(model, opts))
        per_step = 1 if context_options is None else pipelines.windows_per_step(latent_in.shape[0],
                                                                                context_options, steps_run)
        total = steps_run * per_step
        bar = host.ProgressBar(total)
        done = [0]
        previewer = host.latent_previewer()

        def on_step(i, _n, x0):
            done[0] = (i + 1) * per_step
            preview = previewer(contact_sheet(x0)) if previewer is not None else None
            bar.update_absolute(done[0], total, preview)

        def on_window():
            done[0] = min(done[0] + 1, total)
            bar.update_absolute(done[0], total)  # also where Cancel is honoured

        host.check_interrupt()
        frames = latent_in.shape[0]
        if isinstance(model, SVDModel):
            samples = pipelines.sample_img2vid(model, image_conditioning(positive, "positive"),
                                               image_conditioning(negative, "negative"), latent_in, opts,
                                               callback=on_step, on_window=on_window)
        else:
            samples = pipelines.sample_video(model, conditioning_tensor(positive, "positive", frames),
                                             conditioning_tensor(negative, "negative", frames), latent_in,
                                             opts, callback=on_step, on_window=on_window)
        out = {k: v for k, v in latent.items() if k != "noise_mask"}
        out["samples"] = samples
        return (out,)


NODE_CLASS_MAPPINGS = {"KinemaVideoSampler": KinemaVideoSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaVideoSampler": "Video Sampler (Kinema)"}
