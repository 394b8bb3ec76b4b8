"""Depth estimation for structure guidance, and Gen-1's structure-fidelity process.

**Depth models** are transformers model folders, as published on the Hugging Face hub and kept
under ``models/depth_models/<name>/``: ``config.json``, ``model.safetensors`` (or a sharded
``model.safetensors.index.json``) and usually ``preprocessor_config.json``. Two model types run:

- ``dpt`` (``DPTForDepthEstimation``): DPT-Large (ViT), DPT-Hybrid / MiDaS v3 hybrid (BiT + ViT,
  fixed 384x384 input) and the DPT heads on other backbones;
- ``depth_anything`` (``DepthAnythingForDepthEstimation``): Depth Anything v1 and v2 (one class),
  relative or metric.

The weights are loaded by transformers itself (``from_pretrained`` on the folder, local files
only, safetensors only: a pickle-only ``pytorch_model.bin`` is refused), then copied out of the file's mapped
pages (a file rewritten or truncated later leaves the loaded model alone). Everything around the
network is done here in torch, batched, on the model's device:

- **preprocessing** reproduces transformers' ``DPTImageProcessor`` (the torch backend) with the
  folder's ``preprocessor_config.json``: the target ``size``, ``keep_aspect_ratio`` (scale both
  sides by the factor closest to 1), ``ensure_multiple_of`` (each side rounded to a multiple,
  Python's round), ``resample`` (bicubic / bilinear with antialiasing, or nearest; PIL's lanczos,
  box and hamming fall back to bicubic), ``rescale_factor``, ``image_mean`` / ``image_std`` and
  ``do_pad`` + ``size_divisor`` (centred zero padding). Frames are ComfyUI ``IMAGE`` floats in
  [0, 1], i.e. an 8-bit frame already divided by 255: they are resized as floats, not quantised
  back to 8 bits, and the resampling overshoot is clipped to [0, 1] as the processor's 8-bit
  resize clips it (so the pixel values differ from the processor's on the same 8-bit frame by
  its rounding, about one level on natural images). Without ``preprocessor_config.json`` the
  published defaults are used: DPT 384x384, no aspect ratio, mean/std 0.5; Depth Anything 518,
  keep_aspect_ratio, multiples of 14, ImageNet mean/std.
- **post-processing** is ``post_process_depth_estimation``'s: the predicted map is resized to the
  frame size with bicubic interpolation (``align_corners=False``, no antialiasing).

DPT (MiDaS) and relative Depth Anything predict relative *inverse* depth (disparity): larger is
nearer. Metric Depth Anything predicts metres (larger is farther); ``estimate`` turns it into
inverse depth (1 / metres, at the network's resolution, before the resize to the frame size) so
that every model gives near = bright. ``estimate`` normalises with
one minimum and maximum over the whole video, so the normalisation adds no flicker from frame to
frame (the network's own frame-to-frame changes of scale and shift, for relative depth, remain).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from .errors import KinemaError, is_out_of_memory
from .memory import FrameBatch, run_with_oom_retry
from .placement import on_device
from .video_io import check_images

logger = logging.getLogger("kinema")

#: config.json ``model_type`` -> the transformers class that runs it
DEPTH_MODEL_CLASSES: dict[str, str] = {
    "dpt": "DPTForDepthEstimation",
    "depth_anything": "DepthAnythingForDepthEstimation",
}
#: depth models transformers has that Kinema does not run (yet): named in the error
OTHER_DEPTH_TYPES = ("zoedepth", "glpn", "depth_pro", "prompt_depth_anything")
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
#: PIL resampling codes (as stored in preprocessor_config.json) -> torch interpolation modes
_RESAMPLE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bicubic", 5: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
#: Gen-1's structure fidelity: blur + 2x downsample steps (0 = the depth maps as they are)
MAX_FIDELITY_STEPS = 7
FIDELITY_FRAMES = 4  # frames degraded at a time: the working copies are a few frames', whatever the video's length
_HINT = ("A depth model is a transformers model folder with config.json and model.safetensors, e.g. "
         "Intel/dpt-hybrid-midas, Intel/dpt-large, LiheYoung/depth-anything-small-hf or "
         "depth-anything/Depth-Anything-V2-Small-hf downloaded whole (huggingface-cli download <repo> "
         "--local-dir models/depth_models/<name>).")


@dataclass(frozen=True)
class DepthPreprocess:
    """What ``DPTImageProcessor`` does to a frame before the network, read from preprocessor_config.json."""

    height: int = 384
    width: int = 384
    do_resize: bool = True
    keep_aspect_ratio: bool = False
    multiple: int = 1
    resample: int = 3  # PIL code: 3 bicubic, 2 bilinear, 0 nearest
    scale: float = 1.0  # model input = frame in [0, 1] * scale (the processor's rescale of 8-bit values)
    do_normalize: bool = True
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    pad_multiple: int = 0  # do_pad with size_divisor: centred zero padding to a multiple (0 = none)

    @classmethod
    def default(cls, model_type: str) -> DepthPreprocess:
        """The published processors' settings, for folders without preprocessor_config.json."""
        if model_type == "depth_anything":
            return cls(518, 518, keep_aspect_ratio=True, multiple=14, mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD)
        return cls()

    @classmethod
    def from_config(cls, cfg: dict, where: str = "preprocessor_config.json") -> DepthPreprocess:
        """Read a ``DPTImageProcessor`` config (missing keys: the processor class's defaults, as transformers)."""
        base = cls()  # DPTImageProcessor's class defaults (mean/std 0.5, 384, bicubic)
        if not isinstance(cfg, dict):
            raise KinemaError(f"{where} is not a JSON object: download the model's preprocessor_config.json again")
        try:
            size = cfg.get("size", (base.height, base.width))
            if isinstance(size, (int, float)) and not isinstance(size, bool):
                height = width = int(size)
            elif isinstance(size, dict) and "height" in size and "width" in size:
                height, width = int(size["height"]), int(size["width"])
            elif isinstance(size, (list, tuple)) and len(size) == 2:
                height, width = int(size[0]), int(size[1])
            else:
                raise KinemaError(f"{where}: size {size!r} is not what a DPT image processor takes (an int, "
                                  "[height, width] or {'height': .., 'width': ..}): fix the file or remove it")
            resample = cfg.get("resample", base.resample)
            if isinstance(resample, str):
                resample = _RESAMPLE_NAMES.get(resample.lower(), -1)
            resample = int(resample)
            if resample not in _RESAMPLE:
                raise KinemaError(f"{where}: resample {cfg.get('resample')!r} is not a PIL resampling filter (0-5)")
            if resample in (1, 4, 5):
                logger.info("%s: PIL resample %d is done as bicubic (as transformers does without it)", where, resample)
            rescale = float(cfg.get("rescale_factor", 1 / 255))
            scale = 255.0 * rescale if cfg.get("do_rescale", True) else 255.0
            scale = 1.0 if abs(scale - 1.0) < 1e-9 else scale  # 255 * (1/255): the usual case, exactly
            mean = _three(cfg.get("image_mean", base.mean), where, "image_mean")
            std = _three(cfg.get("image_std", base.std), where, "image_std")
            pad = int(cfg.get("size_divisor") or 0) if cfg.get("do_pad", False) else 0
            multiple = int(cfg.get("ensure_multiple_of", 1) or 1)
        except (TypeError, ValueError) as e:
            raise KinemaError(f"{where}: unreadable value ({e}): download the model's preprocessor_config.json "
                              "again") from None
        if height < 1 or width < 1 or multiple < 1 or any(s == 0 for s in std):
            raise KinemaError(f"{where}: size {height}x{width}, ensure_multiple_of {multiple} or image_std {std} "
                              "is not usable: fix the file or remove it (the model type's defaults are used then)")
        return cls(height, width, bool(cfg.get("do_resize", True)), bool(cfg.get("keep_aspect_ratio", False)),
                   multiple, resample, scale, bool(cfg.get("do_normalize", True)), mean, std, pad)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The network's input size for a ``height`` x ``width`` frame (before padding)."""
        if not self.do_resize:
            return height, width
        scale_h, scale_w = self.height / height, self.width / width
        if self.keep_aspect_ratio:  # the factor closest to 1 for both sides: scale as little as possible
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return (round(scale_h * height / self.multiple) * self.multiple,
                round(scale_w * width / self.multiple) * self.multiple)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The network's input size for a ``height`` x ``width`` frame, padding included."""
        return self._pad_size(*self.output_size(height, width))

    def _pad_size(self, h: int, w: int) -> tuple[int, int]:
        if not self.pad_multiple:
            return h, w
        return math.ceil(h / self.pad_multiple) * self.pad_multiple, math.ceil(w / self.pad_multiple) * self.pad_multiple

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[f, h, w, 3] frames in [0, 1] -> [f, 3, H, W] float32 pixel values for the network."""
        x = rearrange(images.float(), "f h w c -> f c h w")
        if self.do_resize:
            size = self.output_size(x.shape[-2], x.shape[-1])
            mode = _RESAMPLE[self.resample]
            if mode == "nearest-exact":
                x = F.interpolate(x, size=size, mode=mode)
            else:
                x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
                x = x.clamp(0.0, 1.0)  # bicubic overshoot, clipped as the processor's 8-bit resize clips it
        if self.scale != 1.0:
            x = x * self.scale
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
            x = (x - rearrange(mean, "c -> c 1 1")) / rearrange(std, "c -> c 1 1")
        if self.pad_multiple:
            h, w = x.shape[-2:]
            ph, pw = self._pad_size(h, w)
            top, left = (ph - h) // 2, (pw - w) // 2
            x = F.pad(x, (left, pw - w - left, top, ph - h - top))
        return x


def _three(value, where: str, key: str) -> tuple:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise KinemaError(f"{where}: {key} has {len(value)} values; an RGB model needs 3")
    return value


@dataclass(frozen=True)
class DepthModelInfo:
    """What the folder's config says about the network: type, output kind, input constraints."""

    name: str
    model_type: str
    metric: bool = False  # predicts metres (larger = farther) instead of relative inverse depth
    patch: int = 16  # the smallest input side the network takes
    fixed_size: tuple | None = None  # the only input size it takes (DPT-Hybrid), else None


class DepthEstimator:
    """A transformers depth network with its preprocessing: frames in, depth maps out."""

    def __init__(self, model: torch.nn.Module, preprocess: DepthPreprocess, info: DepthModelInfo):
        self.model = model.eval()
        self.preprocess = preprocess
        self.info = info

    def __repr__(self) -> str:
        return f"DepthEstimator({self.info.name!r}, {self.info.model_type}, {self.dtype}, {self.device})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> DepthEstimator:
        """Move the network (in place, like ``nn.Module.to``); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The network's input size for frames of ``height`` x ``width``; KinemaError if it cannot take them."""
        h, w = self.preprocess.padded_size(height, width)
        if self.info.fixed_size is not None and (h, w) != tuple(self.info.fixed_size):
            fh, fw = self.info.fixed_size
            raise KinemaError(
                f"Depth model '{self.info.name}' (DPT-Hybrid) takes exactly {fh}x{fw} inputs, but its "
                f"preprocessor_config.json makes {h}x{w} from {height}x{width} frames: set keep_aspect_ratio to "
                f"false and size to {fh}x{fw} in that file (or delete it to use the defaults)")
        if min(h, w) < self.info.patch:
            raise KinemaError(
                f"Frames of {width}x{height} (width x height) become a {w}x{h} input for depth model "
                f"'{self.info.name}', smaller than one {self.info.patch}-pixel patch: the aspect ratio is too "
                "extreme; crop or pad the frames closer to square")
        return h, w

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 4,
                on_batch: Callable[[int, int], None] | None = None, inverse: bool = False) -> torch.Tensor:
        """[f, h, w, 3] frames in [0, 1] -> [f, h, w] float32 raw prediction at the frame size.

        The network's ``predicted_depth`` after ``post_process_depth_estimation`` (relative inverse
        depth, or metres for metric models), on the frames' device. ``inverse``: a metric model's
        metres as inverse depth (1 / metres), taken at the network's resolution, before the resize
        (the bicubic resize of metres dips below the nearest surface at a sharp edge, to 0 or
        negative metres: their inverse would outshine everything), clipped to each frame's range at
        that resolution (the resize's overshoot would darken the rest). ``on_batch(done, total)`` is
        called after each batch of ``batch_size`` frames (progress; it may raise to stop).
        """
        check_images(images, "Depth estimation")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise KinemaError(f"batch_size must be a whole number of frames >= 1, got {batch_size!r}")
        frames, height, width, _ = images.shape
        self.input_size(height, width)
        out, start, setting = [], 0, FrameBatch(batch_size)
        with on_device(self):
            device, dtype = self.device, self.dtype
            while start < frames:
                def run(b: FrameBatch, start=start) -> torch.Tensor:
                    frames_in = images[start:start + b.frames].to(device)
                    if not bool(torch.isfinite(frames_in).all()):
                        raise KinemaError(f"Depth estimation: frames {start + 1} to {start + len(frames_in)} hold NaN or "
                                          "infinite values: check the node that made the frames")
                    pixels = self.preprocess(frames_in).to(dtype)
                    raw = self.model(pixel_values=pixels).predicted_depth.float()
                    invert = inverse and self.info.metric
                    if invert:
                        raw = 1.0 / raw.clamp_min(1e-6)
                    resized = F.interpolate(rearrange(raw, "f h w -> f 1 h w"), size=(height, width),
                                            mode="bicubic", align_corners=False)
                    resized = rearrange(resized, "f 1 h w -> f h w")
                    if invert:  # and the resize's overshoot at those edges clipped to what the network said
                        lo, hi = raw.amin(dim=(1, 2), keepdim=True), raw.amax(dim=(1, 2), keepdim=True)
                        resized = torch.minimum(torch.maximum(resized, lo), hi)
                    return resized.to(images.device)

                raw, setting = run_with_oom_retry(run, setting, lambda b, left=frames - start: b.smaller(left),
                                                  "depth estimation", "lower batch_size on Depth Estimate (Kinema)")
                out.append(raw)
                start += raw.shape[0]
                if on_batch is not None:
                    on_batch(start, frames)
        return torch.cat(out)

    def estimate(self, images: torch.Tensor, batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """[f, h, w, 3] frames in [0, 1] -> [f, h, w] depth in [0, 1], near = bright, one scale for the video."""
        # a metric model's metres as inverse depth, the way relative models see it
        return normalize_depth(self.predict(images, batch_size, on_batch, inverse=True), self.info.name, self.dtype)

    def estimate_image(self, images: torch.Tensor, batch_size: int = 4,
                       on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """[f, h, w, 3] frames -> [f, h, w, 3] gray depth maps (an ``IMAGE``), near = bright."""
        return depth_to_image(self.estimate(images, batch_size, on_batch))


def normalize_depth(depth: torch.Tensor, name: str = "depth", dtype: torch.dtype | None = None) -> torch.Tensor:
    """[f, h, w] -> [f, h, w] in [0, 1] with one min/max over all frames (a flat map gives zeros)."""
    lo, hi = depth.min(), depth.max()
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        hint = (" in fp16: load it with precision fp32 or bf16" if dtype == torch.float16
                else ": its weights may be damaged, download the folder again")
        raise KinemaError(f"Depth model '{name}' predicted non-finite values{hint}")
    if hi <= lo:
        return torch.zeros_like(depth)
    return (depth - lo) / (hi - lo)


def depth_to_image(depth: torch.Tensor) -> torch.Tensor:
    """[f, h, w] depth -> [f, h, w, 3] gray IMAGE."""
    return repeat(depth, "f h w -> f h w c", c=3).contiguous()


# --- loading -------------------------------------------------------------------------------
def _found(folder: str) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return "nothing readable"
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"only {shown}"


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of the folder (one file or the shards of an index); KinemaError if none."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise KinemaError(f"Depth model folder '{folder}': model.safetensors.index.json is unreadable ({e}); "
                              "download it again") from None
        paths = [os.path.join(folder, s) for s in shards]
        missing = [s for s, p in zip(shards, paths) if not os.path.isfile(p)]
        if missing:
            raise KinemaError(f"Depth model folder '{folder}' lacks the weight shards {', '.join(missing)} that "
                              "model.safetensors.index.json lists: download them")
        return paths
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json")):
        raise KinemaError(f"Depth model folder '{folder}' holds only pickle weights (pytorch_model.bin), which Kinema "
                          "does not load (a pickle can run code): download the repository's model.safetensors "
                          "instead (most depth repositories have one), or convert the file to safetensors")
    raise KinemaError(f"Depth model folder '{folder}' has a config.json but no weights (model.safetensors); found "
                      f"{_found(folder)}. {_HINT}")


def _check_safetensors(path: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:  # a cut download, or not a safetensors file at all
        raise KinemaError(f"Depth model weights '{path}' are damaged or truncated ({e}): download the file "
                          "again") from None


def _read_json(path: str, folder: str, fix: str):
    """The JSON in ``path`` (a file of the depth model ``folder``), or KinemaError saying ``fix``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KinemaError(f"Depth model folder '{folder}': {os.path.basename(path)} is not valid JSON ({e}); "
                          f"{fix}") from None


def _transformers_at_least(major: int, minor: int) -> bool:
    import transformers

    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return found is None or (int(found.group(1)), int(found.group(2))) >= (major, minor)


def _weights_absent(cls, folder: str) -> list[str]:
    """The weights a ``cls`` built from the folder's config.json needs and none of its weight files holds (under
    the model's names or without its base-model prefix), sorted; [] where that cannot be told."""
    from safetensors import safe_open

    try:
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            wanted = set(cls(config).state_dict())
        held = set()
        for path in _weight_files(folder):
            with safe_open(path, "pt") as f:
                held.update(f.keys())
    except Exception:  # noqa: BLE001 - the folder's own error is the one to report then
        return []
    prefix = getattr(cls, "base_model_prefix", "") + "."
    held |= {prefix + k for k in held} | {k.removeprefix(prefix) for k in held}
    return sorted(wanted - held)


@torch.no_grad()
def _own_memory(model: torch.nn.Module) -> None:
    """Every weight of ``model`` in memory of its own, in place. transformers loads a safetensors file at its own
    precision as tensors that read the file's mapped pages: a file rewritten in place later (a download over it)
    would change the model ComfyUI keeps between runs, and one truncated would kill the process at its next read
    (SIGBUS), as ``checkpoint.own_copies`` says of the pack's own loaders. One tensor copied at a time."""
    for t in (*model.parameters(), *model.buffers()):
        t.data = t.data.clone()


def load_depth_model(folder: str, dtype: torch.dtype | None = None) -> DepthEstimator:
    """Load a transformers depth model folder (``dpt`` or ``depth_anything``) as a ``DepthEstimator``.

    ``dtype`` defaults to float32; the model is on the CPU (move it with ``.to(device)``).
    KinemaError, naming the folder, what was found and the fix, for anything that is not such a folder.
    """
    folder = os.fspath(folder)
    name = os.path.basename(os.path.normpath(folder))
    if not os.path.exists(folder):
        raise KinemaError(f"Depth model folder '{folder}' does not exist. {_HINT}")
    if not os.path.isdir(folder):
        raise KinemaError(f"'{folder}' is a file, not a depth model folder. {_HINT}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise KinemaError(f"'{folder}' is not a transformers model folder: no config.json, found "
                          f"{_found(folder)}. {_HINT}")
    config = _read_json(config_path, folder, "download it again")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in DEPTH_MODEL_CLASSES:
        if model_type in OTHER_DEPTH_TYPES:
            what = f"a '{model_type}' depth model, which Kinema does not run"
        else:
            what = f"a '{model_type}' model, not a depth model" if model_type else "a config.json without model_type"
        raise KinemaError(f"'{folder}' holds {what}. Kinema's depth nodes run DPT (model_type 'dpt': "
                          f"DPT-Large, DPT-Hybrid/MiDaS) and Depth Anything v1/v2 ('depth_anything'). {_HINT}")
    class_name = DEPTH_MODEL_CLASSES[model_type]
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise KinemaError(f"'{folder}': its config.json's 'architectures' is {architectures!r}, not a list of class "
                          f"names: the file is damaged; download the model folder again. {_HINT}")
    if architectures and class_name not in architectures:
        raise KinemaError(f"'{folder}' holds a {', '.join(map(str, architectures))}, not a depth estimator "
                          f"({class_name}): pick the depth version of the model (e.g. Intel/dpt-large, not "
                          f"Intel/dpt-large-ade). {_HINT}")
    for path in _weight_files(folder):
        _check_safetensors(path)

    import transformers

    cls = getattr(transformers, class_name)
    # the precision: "dtype" from transformers 4.56 on, "torch_dtype" before (4.56+ still take it, with a warning)
    precision = {"dtype" if _transformers_at_least(4, 56) else "torch_dtype": dtype or torch.float32}
    def mismatch(missing: int, mismatched: int, first: str) -> KinemaError:
        return KinemaError(
            f"Depth model folder '{folder}': model.safetensors does not match its config.json "
            f"({missing} weights missing, {mismatched} of the wrong shape; first: {first}). The weights "
            f"and config come from different models: download the folder again, all of it")

    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                          output_loading_info=True, **precision)
    except Exception as e:  # transformers' config validation, shape mismatches, unreadable files
        if isinstance(e, KinemaError) or is_out_of_memory(e):
            raise
        absent = _weights_absent(cls, folder)  # transformers 4 can fail on another model's weights before saying so
        if absent:
            raise mismatch(len(absent), 0, absent[0]) from None
        raise KinemaError(f"Depth model folder '{folder}' could not be loaded as {class_name}: {e}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise mismatch(len(missing), len(mismatched), (missing or mismatched)[0])
    unexpected = info.get("unexpected_keys") or []
    if unexpected:
        logger.warning("Depth model '%s': %d weights that %s does not use were ignored", name, len(unexpected),
                       class_name)
    _own_memory(model)

    cfg = model.config
    backbone = getattr(cfg, "backbone_config", None)
    hybrid = model_type == "dpt" and bool(getattr(cfg, "is_hybrid", False))
    patch = getattr(backbone, "patch_size", None) if backbone is not None and not hybrid else None
    patch = patch or getattr(cfg, "patch_size", 16) or 16
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    fixed = None
    if hybrid:
        size = cfg.image_size
        fixed = tuple(int(s) for s in size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    metric = model_type == "depth_anything" and getattr(cfg, "depth_estimation_type", "relative") == "metric"

    pre_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        pre_cfg = _read_json(pre_path, folder, "download it again or delete it (the model type's defaults are used "
                             "then)")
        preprocess = DepthPreprocess.from_config(pre_cfg, where=pre_path)
    else:
        preprocess = DepthPreprocess.default(model_type)
    return DepthEstimator(model, preprocess, DepthModelInfo(name, model_type, metric, patch, fixed))


# --- structure fidelity -------------------------------------------------------------------
_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # Burt & Adelson's Gaussian pyramid kernel (sigma ~ 1 px)


def _reduce(x: torch.Tensor) -> torch.Tensor:
    """[n, 1, h, w] -> [n, 1, ceil(h/2), ceil(w/2)]: Gaussian blur (replicate borders), then half size.

    The half-size grid is sampled at its pixel centres (bilinear, ``align_corners=False``: for an
    even size, the mean of each 2x2 block), the convention the final upsampling uses too, so the
    map does not drift by half a pixel per step.
    """
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device)
    k = k / k.sum()
    x = F.pad(x, (2, 2, 0, 0), mode="replicate")
    x = F.conv2d(x, rearrange(k, "t -> 1 1 1 t"))
    x = F.pad(x, (0, 0, 2, 2), mode="replicate")
    x = F.conv2d(x, rearrange(k, "t -> 1 1 t 1"))
    return F.interpolate(x, size=(-(-x.shape[-2] // 2), -(-x.shape[-1] // 2)), mode="bilinear", align_corners=False)


def structure_fidelity(depth: torch.Tensor, t_s: int) -> torch.Tensor:
    """Gen-1's information-destroying process on depth maps: [f, h, w] or [f, h, w, c] -> the same shape.

    Gen-1 (Esser et al. 2023, "Structure and Content-Guided Video Synthesis with Diffusion
    Models", sec. 3) controls how closely a video follows its source's structure by degrading the
    depth maps ``t_s`` times: each step blurs and downsamples. Here one step is one level of a
    Gaussian pyramid: a separable 5-tap binomial blur [1, 4, 6, 4, 1] / 16 (a Gaussian of about one
    pixel; borders replicated) followed by halving the size (rounded up), sampling the half-size
    grid at its pixel centres (for even sizes: the mean of each 2x2 block). After ``t_s`` steps the
    map is resized back to its size with bilinear interpolation (``align_corners=False``, the same
    pixel-centre convention, so nothing shifts), so the result lines up with the frames but holds
    only the detail a ``2**t_s`` times smaller map can: ``t_s = 0`` returns the input itself (exact structure), each
    step removes the finer half of the remaining frequencies (coarser shapes), a constant map
    stays constant. Frames and channels are processed independently; values stay within the
    input's range.
    """
    if isinstance(t_s, bool) or not isinstance(t_s, int) or not 0 <= t_s <= MAX_FIDELITY_STEPS:
        raise KinemaError(f"structure fidelity t_s must be a whole number from 0 (exact structure) to "
                          f"{MAX_FIDELITY_STEPS} (coarsest), got {t_s!r}")
    if not isinstance(depth, torch.Tensor) or depth.dim() not in (3, 4) or not depth.is_floating_point():
        shape = list(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise KinemaError(f"structure fidelity takes depth maps [frames, height, width] or an IMAGE "
                          f"[frames, height, width, channels] of floats, got {shape}")
    if depth.numel() == 0:
        raise KinemaError(f"structure fidelity got empty depth maps of shape {list(depth.shape)}")
    if t_s == 0:
        return depth
    out = torch.empty_like(depth)
    for start in range(0, depth.shape[0], FIDELITY_FRAMES):
        chunk = depth[start:start + FIDELITY_FRAMES]
        if depth.dim() == 3:
            out[start:start + FIDELITY_FRAMES] = _degrade(chunk.unsqueeze(-1), t_s).squeeze(-1)
        elif bool((chunk == chunk[..., :1]).all()):  # a gray IMAGE: one channel degraded, copied to the others
            out[start:start + FIDELITY_FRAMES] = _degrade(chunk[..., :1], t_s)
        else:
            out[start:start + FIDELITY_FRAMES] = _degrade(chunk, t_s)
    return out


def _degrade(maps: torch.Tensor, t_s: int) -> torch.Tensor:
    """[f, h, w, c] -> [f, h, w, c]: ``t_s`` pyramid steps down and back up to the size, each map on its own."""
    c = maps.shape[-1]
    x = rearrange(maps.float(), "f h w c -> (f c) 1 h w")
    size = x.shape[-2:]
    for _ in range(t_s):
        x = _reduce(x)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return rearrange(x, "(f c) 1 h w -> f h w c", c=c)
