"""Prompt encoding."""
from __future__ import annotations


class KinemaTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with the checkpoint's CLIP. Weights work as in ComfyUI: (word:1.2), ((word)); "
        "prompts longer than 75 tokens are encoded in chunks of 77."
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
                                    "tooltip": "The prompt. (word:1.2) raises a word's weight."}),
            },
            "optional": {
                "clip_skip": ("INT", {"default": 1, "min": 1, "max": 12,
                                      "tooltip": "1 = last CLIP layer (SD1.5 default); 2 = penultimate."}),
            },
        }

    def encode(self, clip, text, clip_skip=1):
        cond, pooled = clip.encode(text, clip_skip=clip_skip)
        return ([[cond, {"pooled_output": pooled}]],)


NODE_CLASS_MAPPINGS = {"KinemaTextEncode": KinemaTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"KinemaTextEncode": "Text Encode (Kinema)"}
