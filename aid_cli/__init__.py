"""aid: inpaint images with frozen diffusion backbones and a small learned guidance module (AID).

The library's front door is what `aid inpaint` runs: `inpaint_files(images, mask, output, InpaintSettings(...),
InpaintHooks(...)) -> records` (jobs.py). Importing it loads neither torch nor Pillow; the call does.
"""

from .jobs import InpaintHooks, InpaintSettings, inpaint_files

__all__ = ["InpaintHooks", "InpaintSettings", "inpaint_files"]
