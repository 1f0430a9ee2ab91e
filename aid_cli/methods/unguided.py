"""Unguided: plain EDM Heun from noise; the visible pixels are pasted back only at the end (method.md §10)."""

from ..sampling.heun import Method
from .base import register


@register
class Unguided(Method):
    name = "unguided"
