"""Kinema engine: pure PyTorch, imports nothing from ComfyUI or from ``nodes``."""
from .errors import KinemaError

__all__ = ["KinemaError"]
