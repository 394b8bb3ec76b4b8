"""Context options: how the sampler splits a long video into windows of frames."""
from __future__ import annotations

from ..models.context import FUSE_METHODS, SCHEDULES, ContextOptions


class KinemaContextOptions:
    DESCRIPTION = (
        "Lets the Video Sampler render videos longer than the motion module sees at once (16 to 32 frames): "
        "each step runs the model on overlapping windows of frames and blends them, so memory stays the same "
        "whatever the frame count."
    )
    CATEGORY = "Kinema/animatediff"
    RETURN_TYPES = ("KINEMA_CONTEXT_OPTIONS",)
    RETURN_NAMES = ("context_options",)
    OUTPUT_TOOLTIPS = ("Connect to context_options of the Video Sampler (Kinema).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "context_length": ("INT", {
                    "default": 16, "min": 1, "max": 128,
                    "tooltip": "Frames in one window. 16 for the SD1.5 motion modules (v1 sees at most 24, "
                               "v2/v3 at most 32)."}),
                "context_overlap": ("INT", {
                    "default": 4, "min": 0, "max": 127,
                    "tooltip": "Frames shared by neighbouring windows (less than the context length). More "
                               "overlap: smoother transitions, more windows to run."}),
                "context_schedule": (list(SCHEDULES), {
                    "default": "uniform_standard",
                    "tooltip": "uniform_standard: windows shift from step to step so seams do not stay put; "
                               "uniform_looped: the same, and the end wraps around to the start (looping "
                               "videos); static: the same windows at every step."}),
                "context_stride": ("INT", {
                    "default": 1, "min": 1, "max": 8,
                    "tooltip": "Uniform schedules: 1 = contiguous windows only; 2 also adds windows of every "
                               "2nd frame, 3 of every 4th, ... (ties distant frames together; more windows). A "
                               "spacing is used only where its window fits: every 2nd frame needs twice the "
                               "context length in frames, every 4th four times."}),
                "fuse_method": (list(FUSE_METHODS), {
                    "default": "pyramid",
                    "tooltip": "How overlapping windows are blended per frame: pyramid (weights rise towards a "
                               "window's centre), flat (plain mean), gauss (a bell curve)."}),
                "freenoise": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "FreeNoise: repeat the starting noise from window to window (shuffled within each "
                               "block) so distant windows agree on content."}),
            }
        }

    def build(self, context_length, context_overlap, context_schedule, context_stride=1, fuse_method="pyramid",
              freenoise=True):
        opts = ContextOptions(context_length=context_length, overlap=context_overlap, stride=context_stride,
                              schedule=context_schedule, fuse=fuse_method, freenoise=bool(freenoise))
        opts.validate()
        return (opts,)


NODE_CLASS_MAPPINGS = {"KinemaContextOptions": KinemaContextOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaContextOptions": "Context Options (Kinema)"}
