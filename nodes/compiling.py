"""The compile nodes: a video model whose UNet, or a VAE whose decoder, runs through torch.compile."""
from __future__ import annotations

from ..models.compiling import COMPILE_BACKENDS, COMPILE_MODES, CompileOptions
from ..models.errors import KinemaError
from ..models.vae import AutoencoderKL, TemporalAutoencoder, with_compiled_decode


def _compile_inputs() -> dict:
    return {
        "backend": (list(COMPILE_BACKENDS), {
            "default": "inductor",
            "tooltip": "inductor: generated kernels (the speed-up). eager: the graph is only captured and run as it "
                       "is: a check that compiling works, no faster."}),
        "mode": (list(COMPILE_MODES), {
            "default": "default",
            "tooltip": "inductor's mode. max-autotune-no-cudagraphs tries kernel variants: a much longer first "
                       "run, sometimes faster ones after."}),
    }


def _options(backend: str, mode: str) -> CompileOptions:
    opts = CompileOptions(backend=backend, mode=mode)
    opts.validate()
    return opts


class KinemaCompileModel:
    DESCRIPTION = (
        "Runs the video model's UNet (with its motion modules) through torch.compile, which fuses its many small "
        "GPU operations into fewer kernels: an AnimateDiff step at 16×512×512 took 0.75× the time on an H200. "
        "The first run with new sizes compiles first (about two minutes on a fast GPU; the first step shows it), "
        "later runs with the same sizes reuse it until ComfyUI restarts. The same video, to rounding. Needs a "
        "working Triton (Linux with an NVIDIA GPU; on Windows, triton-windows) or a C++ compiler on the CPU, "
        "where it gains nothing. With block offload (Memory Policy) each UNet block is compiled on its own and "
        "runs between the moves (the speed of this low-memory path is not measured yet). Attention in chunks "
        "(Memory Policy, the Video Sampler) is compiled chunk by chunk: small chunks make the first compile much "
        "longer (several times over at 64), so leave attention_chunk at 0 or large with this node."
    )
    CATEGORY = "Kinema/sampling"
    RETURN_TYPES = ("KINEMA_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with a compiled UNet; connect it to the Video Sampler (Kinema).",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("KINEMA_MODEL", {"tooltip": "An AnimateDiff model (Apply Motion Module) or an SVD model, "
                                                      "before or after a Memory Policy."}),
                **_compile_inputs(),
            },
        }

    def apply(self, model, backend="inductor", mode="default"):
        return (model.with_options(compile=_options(backend, mode)),)


class KinemaCompileVAE:
    DESCRIPTION = (
        "Runs the VAE's decoder through torch.compile when VAE Decode Frames (Kinema) decodes with it: its "
        "normalisations, activations and (SVD's temporal decoder) frame blends fused into fewer GPU kernels. The "
        "first decode with new sizes compiles first (the log says so), later ones reuse it until ComfyUI "
        "restarts; other tile or chunk sizes compile again. The same frames, to rounding. Encoding is not "
        "compiled. Needs what Compile Model (Kinema) needs. Meant for a GPU: on a CPU the decode was slower "
        "compiled."
    )
    CATEGORY = "Kinema/vae"
    RETURN_TYPES = ("KINEMA_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE with a compiled decoder (the same weights); connect it to VAE Decode Frames.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("KINEMA_VAE", {"tooltip": "The VAE from Load Checkpoint or Load SVD Checkpoint (Kinema)."}),
                **_compile_inputs(),
            },
        }

    def apply(self, vae, backend="inductor", mode="default"):
        if not isinstance(vae, (AutoencoderKL, TemporalAutoencoder)):
            raise KinemaError("Compile VAE (Kinema) takes a VAE with a decoder: connect the vae output of Load "
                              "Checkpoint (Kinema) or Load SVD Checkpoint (Kinema)")
        return (with_compiled_decode(vae, _options(backend, mode)),)


NODE_CLASS_MAPPINGS = {"KinemaCompileModel": KinemaCompileModel, "KinemaCompileVAE": KinemaCompileVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaCompileModel": "Compile Model (Kinema)",
                              "KinemaCompileVAE": "Compile VAE (Kinema)"}
