"""Peak memory for `cheers-deploy bench`: host RSS of this process and GPU memory, per backend.

Host: the kernel's high-water mark VmHWM (/proc/self/status), reset per backend through /proc/self/clear_refs
("5") so that each backend's peak is its own; where that is not possible, resource.getrusage's ru_maxrss (the
peak since the process started, flagged as such). psutil only gives the current RSS (used for the baseline).
GPU: torch.cuda.max_memory_allocated for the torch backend on CUDA (the caching allocator's peak), and NVML's
device memory in use, sampled in a background thread (covers onnxruntime/TensorRT allocations too).
Anything that cannot be read is reported as unavailable with the reason, never as a number.
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
NVML_PERIOD_S = 0.01


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])            # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss() -> Optional[int]:
    """Resident set size now, bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where not supported."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> Dict[str, object]:
    """{'bytes': int, 'source': str} or {'status': 'unavailable', 'reason': str}."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return {"bytes": kib * 1024, "source": "/proc/self/status VmHWM"}
    try:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        scale = 1 if sys.platform == "darwin" else 1024     # bytes on macOS, KiB elsewhere
        if r > 0:
            return {"bytes": int(r) * scale, "source": "getrusage ru_maxrss (peak since process start)"}
    except (OSError, ValueError):
        pass
    return {"status": "unavailable", "reason": "neither /proc/self/status nor getrusage readable"}


class HostMemory:
    """Peak RSS over a phase: start() resets the high-water mark where the kernel allows it."""

    def start(self) -> None:
        self.before = current_rss()
        self.resettable = reset_peak_rss()

    def stop(self) -> Dict[str, object]:
        out = dict(peak_rss())
        if "bytes" in out:
            if not self.resettable:
                out["source"] = str(out["source"]).replace("VmHWM", "VmHWM (not resettable: peak since start)")
            out["baseline_bytes"] = self.before
        return out


class GpuMemory:
    """Peak GPU memory over a phase for a backend running on `device` ('cpu' -> unavailable)."""

    def __init__(self, device: str, torch_cuda: bool = False):
        self.device = device
        self.torch_cuda = torch_cuda
        self._nvml = None
        self._thread = None
        self._peak = 0
        self._why = []
        if not device.startswith("cuda"):
            self._why.append("the backend runs on the CPU")
            return
        try:
            import pynvml

            from .energy import gpu_index as _gpu_index

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_gpu_index(device))
            pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        except ImportError:
            self._why.append("pynvml (nvidia-ml-py) not installed")
            self._nvml = None
        except Exception as exc:
            self._why.append(f"NVML: {exc}")
            self._nvml = None

    def _used(self) -> Optional[int]:
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:
            return None

    def _loop(self) -> None:
        while not self._stop.wait(NVML_PERIOD_S):
            u = self._used()
            if u is not None:
                self._peak = max(self._peak, u)

    def start(self) -> None:
        if self.torch_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        if self._nvml is not None:
            self._base = self._used() or 0
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, name="cheers-bench-nvml-mem", daemon=True)
            self._thread.start()

    def stop(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        if self.torch_cuda:
            import torch

            out["torch_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            out["torch_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            u = self._used()
            if u is not None:
                self._peak = max(self._peak, u)
            out["device_used_peak_bytes"] = int(self._peak)
            out["device_used_before_bytes"] = int(self._base)
            out["source"] = "NVML nvmlDeviceGetMemoryInfo.used, sampled every 10 ms (whole device)"
        if not out:
            return {"status": "unavailable", "reason": "; ".join(self._why) or "no reader"}
        if "source" not in out:
            out["source"] = "torch.cuda.max_memory_allocated"
        out["bytes"] = int(out.get("device_used_peak_bytes", out.get("torch_max_allocated_bytes", 0)))
        return out

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
