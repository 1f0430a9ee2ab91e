"""What a benchmark measures besides quality: synchronised wall time, peak memory (of the kind the device allows), and
the device and version it was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import threading

import torch

MEM_POLL_S = 0.01


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    return "process_rss_peak_sampled" if _rss_bytes() is not None else "process_maxrss_lifetime"


PEAK_MEMORY_DEFINITIONS = {
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated during the cell's sampler calls (every PyTorch "
                                 "tensor on the GPU, backbone and the metric networks' weights included: LPIPS "
                                 "AlexNet and VGG16, the Inception of FID/KID; not the caching allocator's reserve "
                                 "nor the CUDA context), MiB, max over processes",
    "process_rss_peak_sampled": "peak resident set size of the whole process during the cell's sampler calls, sampled "
                                "every 10 ms from /proc/self/statm (Python, backbone, dataset, the metric networks "
                                "(LPIPS AlexNet and VGG16, Inception) and memory freed but kept by the allocator "
                                "included; short spikes can be missed; GPU memory of MPS not included), MiB, max "
                                "over processes",
    "process_maxrss_lifetime": "getrusage ru_maxrss: the process's lifetime peak RSS at the end of the cell (never "
                               "decreases from cell to cell), MiB, max over processes",
}


class PeakMemory:
    """One cell's peak memory in MiB (`.mib`), of the kind `peak_memory_kind` names, over the sampler calls only:
    `with mem.measure(): sample(...)` for each batch; metrics computed between them are outside the windows."""

    def __init__(self, device: torch.device):
        self.device, self.kind, self.mib = device, peak_memory_kind(device), None
        self._peak = 0

    def _poll(self, stop: threading.Event):
        while not stop.wait(MEM_POLL_S):
            self._peak = max(self._peak, _rss_bytes() or 0)

    @contextlib.contextmanager
    def measure(self):
        stop, thread = threading.Event(), None
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process_rss_peak_sampled":
            self._peak = max(self._peak, _rss_bytes() or 0)
            thread = threading.Thread(target=self._poll, args=(stop,), daemon=True)
            thread.start()
        try:
            yield self
        finally:
            if self.kind == "cuda_max_memory_allocated":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            elif self.kind == "process_rss_peak_sampled":
                stop.set()
                thread.join()
                peak = max(self._peak, _rss_bytes() or 0)
            else:
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = rss if platform.system() == "Darwin" else rss * 1024  # bytes on macOS, KiB on Linux
            self._peak = max(self._peak, peak)
            self.mib = round(self._peak / 2 ** 20, 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return str(device)


def aid_version() -> str:
    try:
        from importlib.metadata import version

        return version("aid-inpaint")
    except Exception:
        return "unknown"
