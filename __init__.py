"""Kinema: video diffusion nodes for ComfyUI (AnimateDiff, SVD, Gen-1 style guidance).

ComfyUI imports this file as a package; so do the tests and the headless runner.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
