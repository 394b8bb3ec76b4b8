"""VAE frame encoding and decoding, a chunk of frames at a time."""
from __future__ import annotations

from ..models import vae as vae_ops
from ..models.errors import KinemaError
from ..models.tiling import TileOptions
from ..models.vae import MIN_TILE_PIXELS
from ..models.video_io import check_images
from . import host
from .checks import latent_samples


def _tile_inputs(what: str) -> dict:
    return {
        "tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                              "tooltip": f"0 = off. Otherwise {what} square tiles of this many pixels (64 or more) that overlap "
                                         "and cross-fade: much less memory for large frames, close to the untiled "
                                         "result (the VAE's normalisation sees one tile at a time). 512 is a good "
                                         "start on small GPUs. An out-of-memory error starts tiling by itself."}),
        "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 8,
                                 "tooltip": "Pixels neighbouring tiles share and blend over (less than half the tile "
                                            "size; one that is not is lowered to a quarter of the tile, as "
                                            "ComfyUI's tiled VAE nodes do, and the log says so)."}),
    }


def _pixel_tiles(tile_size, tile_overlap, node: str) -> tuple[int, int]:
    """Check the tile inputs in the pixels the user entered (multiples of 8): (tile_size, tile_overlap) as ints,
    or KinemaError naming ``node``. An overlap of half the tile or more (the default 64 with a tile under 136) is
    lowered to a quarter of the tile, a multiple of 8, and the log says so."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v for v in (tile_size, tile_overlap)):
        raise KinemaError(f"{node}: tile_size and tile_overlap must be whole numbers of pixels, got {tile_size!r} and "
                          f"{tile_overlap!r}")
    tile, overlap = int(tile_size), int(tile_overlap)
    if tile < 0 or overlap < 0:
        raise KinemaError(f"{node}: tile_size and tile_overlap must be 0 or more pixels, got {tile} and {overlap}")
    if not tile:
        return 0, overlap
    if tile < MIN_TILE_PIXELS:
        raise KinemaError(f"{node}: tile_size must be 0 (off) or at least {MIN_TILE_PIXELS} pixels, got {tile}: "
                          "smaller tiles see too little of the image and leave visible seams")
    if tile % 8 or overlap % 8:
        raise KinemaError(f"{node}: tile_size and tile_overlap must be multiples of 8 pixels (a latent pixel is 8 "
                          f"image pixels), got {tile} and {overlap}")
    if overlap * 2 >= tile:
        lowered = tile // 4 // 8 * 8
        host.logger.warning("%s: tile_overlap %d pixels is not under half of tile_size %d; using %d", node, overlap,
                            tile, lowered)
        overlap = lowered
    return tile, overlap


class KinemaVAEDecodeFrames:
    DESCRIPTION = (
        "Decodes a latent video into frames, a chunk of frames at a time (smaller chunks use less memory). With "
        "Stable Video Diffusion's temporal decoder the frames of a chunk are decoded together, so the chunk size "
        "changes the result (the original decodes 14 frames at a time; fewer can flicker at chunk borders)."
    )
    CATEGORY = "Kinema/vae"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The frames as an IMAGE batch [frames, height, width, 3].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("KINEMA_VAE", {"tooltip": "The VAE from Load Checkpoint or Load SVD Checkpoint (Kinema)."}),
                "samples": ("LATENT", {"tooltip": "The latent video from the Video Sampler."}),
                "frame_chunk": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Frames decoded at once; lower it if the GPU runs out of memory. "
                                                   "0 = the VAE's default: SD1.5 as many as fit in 4 frames of "
                                                   "512x512 (at most 8), SVD's temporal decoder 14 (as the "
                                                   "original; the chunk size changes its output)."}),
            },
            "optional": _tile_inputs("decode"),
        }

    def decode(self, vae, samples, frame_chunk=0, tile_size=0, tile_overlap=64):
        latent = latent_samples(samples, "VAE Decode Frames (Kinema)")
        tile_size, tile_overlap = _pixel_tiles(tile_size, tile_overlap, "VAE Decode Frames (Kinema)")
        bar = host.ProgressBar(latent.shape[0])

        tiles = TileOptions(tile_size // 8, tile_overlap // 8) if tile_size else TileOptions()
        host.check_interrupt()  # Cancel pressed before the first chunk (a chunk can take a while)
        images = vae_ops.decode_frames(vae, latent, frame_chunk or None, on_chunk=bar.update_absolute, tiles=tiles)
        return (images,)


class KinemaVAEEncodeFrames:
    DESCRIPTION = ("Encodes frames (an IMAGE batch, e.g. from Load Video) into a latent video for video-to-video, "
                   "a chunk of frames at a time (smaller chunks use less memory). Width and height must be "
                   "multiples of 8.")
    CATEGORY = "Kinema/vae"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent video [frames, 4, height/8, width/8]; sample it with denoise below 1.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("KINEMA_VAE", {"tooltip": "The VAE from Load Checkpoint (Kinema)."}),
                "pixels": ("IMAGE", {"tooltip": "The frames to encode, e.g. from Load Video (Kinema); "
                                                "sides must be multiples of 8."}),
                "frame_chunk": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Frames encoded at once; lower it if the GPU runs out of memory. "
                                                   "0 = as many as fit in 4 frames of 512x512 (at most 8)."}),
            },
            "optional": _tile_inputs("encode"),
        }

    def encode(self, vae, pixels, frame_chunk=0, tile_size=0, tile_overlap=64):
        check_images(pixels, "VAE Encode Frames (Kinema)", channels=(3, 4))
        tile_size, tile_overlap = _pixel_tiles(tile_size, tile_overlap, "VAE Encode Frames (Kinema)")
        host.check_interrupt()
        bar = host.ProgressBar(pixels.shape[0])

        tiles = TileOptions(tile_size, tile_overlap) if tile_size else TileOptions()
        latent = vae_ops.encode_frames(vae, pixels, frame_chunk or None, on_chunk=bar.update_absolute, tiles=tiles)
        return ({"samples": latent},)


NODE_CLASS_MAPPINGS = {"KinemaVAEDecodeFrames": KinemaVAEDecodeFrames, "KinemaVAEEncodeFrames": KinemaVAEEncodeFrames}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaVAEDecodeFrames": "VAE Decode Frames (Kinema)",
                              "KinemaVAEEncodeFrames": "VAE Encode Frames (Kinema)"}
