"""Prompt encoding: one prompt, or a prompt schedule (prompt travel)."""
from __future__ import annotations

import functools

from ..models import embeddings, prompt_travel
from . import host


def embedding_lookup(clip):
    """``name -> vectors | None`` for the ``embedding:name`` references of prompts encoded by ``clip``: the files
    of ComfyUI's embeddings folders, each read once per node run."""

    @functools.cache
    def lookup(name: str):
        path = host.find_embedding(name)
        return None if path is None else embeddings.load_embedding(path, clip.width)

    return lookup


class KinemaTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with the checkpoint's CLIP. Weights work as in ComfyUI: (word:1.2), ((word)); "
        "prompts longer than 75 tokens are encoded in chunks of 77; embedding:name puts a textual-inversion "
        "embedding from ComfyUI's models/embeddings in the prompt."
    )
    CATEGORY = "Kinema/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt's conditioning; connect to positive or negative of the Video Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("KINEMA_CLIP", {"tooltip": "The CLIP text encoder from Load Checkpoint (Kinema)."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                    "tooltip": "The prompt. (word:1.2) raises a word's weight; embedding:name inserts a "
                                               "textual-inversion embedding (models/embeddings)."}),
            },
            "optional": {
                "clip_skip": ("INT", {"default": 1, "min": 1, "max": 12,
                                      "tooltip": "1 = last CLIP layer (SD1.5 default); 2 = penultimate."}),
            },
        }

    def encode(self, clip, text, clip_skip=1):
        cond, pooled = clip.encode(text, clip_skip=clip_skip, embeddings=embedding_lookup(clip))
        return ([[cond, {"pooled_output": pooled}]],)


class KinemaPromptSchedule:
    DESCRIPTION = (
        "Prompt travel: a prompt per keyframe, blended frame by frame. Write one keyframe a line "
        "('0: a cat walking', '16: a cat running'), or on one line separated by commas; the FizzNodes form "
        "'\"0\": \"...\", \"16\": \"...\"' works too. Frames before the first keyframe use its prompt, frames after "
        "the last use the last one. The sampler's latent decides the number of frames; keyframes past the end "
        "are fine (the last frames move towards them). Each keyframe prompt is encoded once."
    )
    CATEGORY = "Kinema/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The scheduled conditioning; connect to positive (or negative) of the Video Sampler (Kinema), "
                       "which gives each frame its blend.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("KINEMA_CLIP", {"tooltip": "The CLIP text encoder from Load Checkpoint (Kinema)."}),
                "text": ("STRING", {
                    "multiline": True, "dynamicPrompts": True,
                    "default": "0: a cat walking in a garden\n8: a cat running in a garden\n"
                               "16: a cat jumping in a garden, (motion blur:1.2)",
                    "tooltip": "The schedule: '<frame>: <prompt>', one keyframe a line or separated by commas; "
                               "frames count from 0. Weights work as in Text Encode: (word:1.2). Text without "
                               "any '<frame>:' is one prompt for every frame."}),
                "interpolation": (list(prompt_travel.INTERPOLATIONS), {
                    "default": "lerp",
                    "tooltip": "How frames between two keyframes blend: lerp = straight mix; slerp = along the arc "
                               "between the token vectors, keeping their length; none = hold each keyframe's "
                               "prompt until the next one."}),
            },
            "optional": {
                "pre_text": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Put before every keyframe's prompt (joined with ', ')."}),
                "app_text": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "Put after every keyframe's prompt (joined with ', '), "
                                                   "e.g. quality words."}),
                "clip_skip": ("INT", {"default": 1, "min": 1, "max": 12,
                                      "tooltip": "1 = last CLIP layer (SD1.5 default); 2 = penultimate."}),
            },
        }

    def encode(self, clip, text, interpolation="lerp", pre_text="", app_text="", clip_skip=1):
        keyframes = prompt_travel.parse_schedule(text)
        lookup = embedding_lookup(clip)
        cond, pooled = prompt_travel.encode_schedule(lambda p: clip.encode(p, clip_skip=clip_skip, embeddings=lookup),
                                                     keyframes, pre_text, app_text)
        options = {"pooled_output": pooled, "kinema_keyframes": [f for f, _ in keyframes],
                   "kinema_interpolation": interpolation}
        return ([[cond, options]],)


NODE_CLASS_MAPPINGS = {"KinemaTextEncode": KinemaTextEncode, "KinemaPromptSchedule": KinemaPromptSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaTextEncode": "Text Encode (Kinema)",
                              "KinemaPromptSchedule": "Prompt Schedule (Kinema)"}
