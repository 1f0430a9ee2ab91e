"""Inpainting methods, one small module each, all on the hooks of the one sampler loop (sampling/heun.py)."""

from . import aid, copaint, ddnm, dps, gradpaint, mcg, oracles, repaint, replace, unguided  # noqa: F401  (registration)
from .base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
