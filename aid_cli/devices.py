"""Devices and how the backbone runs on them.

`--device auto|cpu|cuda|mps`: auto picks cuda, then mps, then cpu; a named device that is missing is an error.
`--precision auto|fp32|fp16|bf16` and `--compile` wrap the loaded backbone (`prepare_backbone`); the sampler calls the
wrapper exactly as it calls the network, D = net(x, σ, labels), and always gets float32 back.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
COMPILE_BACKEND = "inductor"  # torch.compile's default


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if has_mps:
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                            f"built for CUDA {torch.version.cuda or 'none'})")
        return torch.device(name)
    if name == "mps":
        if not has_mps:
            raise UserError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}")


def _autocast_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a convolution runs under autocast to `dtype` on `device` (a few microseconds)."""
    try:
        with torch.autocast(device.type, dtype=dtype):
            x = torch.ones(1, 2, 4, 4, device=device)
            return torch.nn.functional.conv2d(x, torch.ones(2, 2, 3, 3, device=device)).dtype == dtype
    except (RuntimeError, TypeError, ValueError):
        return False


def check_precision(precision: str, device: torch.device) -> str:
    """`--precision` checked against the device; one line where it cannot run there."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU (--device cuda or mps); on CPU use fp32 or bf16")
    if precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
        if not _autocast_runs(device, dtype):
            raise UserError(f"--precision {precision} does not run on {device.type} with torch {torch.__version__}; "
                            f"use fp32")
    return precision


def training_precision(precision: str, device: torch.device) -> str:
    """The precision ("fp32" or "bf16") a training loop runs its networks' forward passes in.

    auto: bf16 autocast on a CUDA device that has it (no loss scaling needed; the optimizer, the weights, the EMA and
    the loss stay float32), fp32 elsewhere. fp16 would need loss scaling, so training refuses it. On CUDA, float32
    matrix products may use TF32 (as cuDNN convolutions already do by default)."""
    precision = (precision or "auto").lower()
    if precision == "fp16":
        raise UserError("--precision fp16 is not offered for training (it needs loss scaling); use bf16 or fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    check_precision(precision, device)
    return precision


def prepare_backbone(net: torch.nn.Module, device: torch.device, precision: str = "auto", compile: bool = False,
                     notice: Callable[[str], None] | None = None,
                     channels_last: bool = True) -> Callable[..., torch.Tensor]:
    """The denoiser the sampler calls: `net` at `precision`, optionally through torch.compile; float32 out.

    `channels_last` (on CPU and CUDA) stores the network's convolution weights NHWC, the layout oneDNN and cuDNN run
    fastest, with outputs equal to the NCHW ones up to float32 summation order (~2e-6). The sampler's tensors keep
    their own layout.

    auto: as the checkpoint says (an EDM network with `use_fp16` runs its UNet in float16 on CUDA, as NVIDIA's code
    does). fp32: float32 throughout. fp16: that official float16 path on CUDA when the network has one, else autocast.
    bf16: autocast to bfloat16. The preconditioning (c_skip, c_out, c_in) and the sampler stay in float32.
    """
    precision = check_precision(precision, device)
    if channels_last and device.type in ("cpu", "cuda"):
        net = net.to(memory_format=torch.channels_last)  # 4-D parameters only; the rest are left as they are
    official_fp16 = hasattr(net, "use_fp16") and device.type == "cuda"
    if precision != "auto" and hasattr(net, "use_fp16"):
        net.use_fp16 = precision == "fp16" and official_fp16
    autocast = {"bf16": torch.bfloat16, "fp16": None if official_fp16 else torch.float16}.get(precision)
    forward = _compiled(net, notice) if compile else net
    if autocast is None:
        return forward

    def denoise(x, sigma, class_labels=None):
        with torch.autocast(device.type, dtype=autocast):
            D = forward(x, sigma, class_labels)
        return D.to(torch.float32)

    return denoise


def _compiled(net: torch.nn.Module, notice: Callable[[str], None] | None) -> Callable[..., torch.Tensor]:
    """torch.compile(net); where compiling fails (no compiler, an unsupported platform) it says so once and runs eagerly."""
    say = notice or (lambda message: None)
    if not hasattr(torch, "compile"):
        say(f"--compile: torch {torch.__version__} has no torch.compile; running without it")
        return net
    state = {"forward": torch.compile(net, backend=COMPILE_BACKEND)}

    def forward(*args, **kwargs):
        if state["forward"] is net:
            return net(*args, **kwargs)
        try:
            return state["forward"](*args, **kwargs)
        except Exception as e:  # a compiler failure surfaces at the call; a genuine error fails again eagerly below
            state["forward"] = net
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            why = next((line for line in lines if "Error:" in line), lines[0])[:200]
            say(f"--compile: torch.compile failed ({type(e).__name__}: {why}); running without it")
            return net(*args, **kwargs)

    return forward
