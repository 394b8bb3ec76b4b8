"""Kinema's node classes (V1 API). Each module adds its own mappings."""
from . import (
    animatediff,
    compiling,
    conditioning,
    content,
    context,
    depth,
    guidance,
    latent,
    loaders,
    lora,
    memory,
    sampler,
    structure,
    svd,
    vae,
    video_input,
    video_output,
)
from .inputs import check_widget_inputs

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (loaders, svd, animatediff, lora, context, conditioning, depth, structure, content, guidance, memory,
                compiling, latent, sampler, vae, video_input, video_output):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
for _node_id, _cls in NODE_CLASS_MAPPINGS.items():  # widget values checked before a node runs (nodes/inputs.py)
    check_widget_inputs(_cls, NODE_DISPLAY_NAME_MAPPINGS[_node_id])

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
