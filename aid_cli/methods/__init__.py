"""Inpainting methods, one small module each, all on the hooks of the one sampler loop (sampling/heun.py)."""

from . import (  # noqa: F401  (registration)
    aid, classical, copaint, ddnm, dps, gradpaint, mcg, oracles, repaint, replace, unguided, vipaint,
)
from .base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
