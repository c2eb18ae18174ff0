"""What a benchmark result was measured on: the machine (CPU model, GPUs through NVML) and the installed library
versions, read from package metadata so that nothing (torch) is imported for an ort-only run."""

from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

from ..constants import VERSION


def _version(*dists: str) -> Optional[str]:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def library_versions() -> Dict[str, Optional[str]]:
    """Installed versions from package metadata (imports nothing, so torch is not loaded for an ort-only run)."""
    out = {"cheers_deploy": VERSION, "python": platform.python_version()}
    for key, dists in (("numpy", ("numpy",)), ("torch", ("torch",)), ("onnxruntime", ("onnxruntime-gpu", "onnxruntime")),
                       ("onnx", ("onnx",)), ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
                       ("nvidia-ml-py", ("nvidia-ml-py", "pynvml")), ("psutil", ("psutil",)),
                       ("matplotlib", ("matplotlib",))):
        out[key] = _version(*dists)
    return out


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if m and m.group(1).strip():
            return m.group(1).strip()
    try:                                              # Jetson / ARM boards
        model = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
        if model:
            return model
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpus() -> List[Dict[str, object]]:
    """GPUs through NVML, else through torch if it is already imported (never imported just for this)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                            "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                            "driver": str(pynvml.nvmlSystemGetDriverVersion())})
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return [{"index": i, "name": torch.cuda.get_device_name(i),
                     "memory_bytes": int(torch.cuda.get_device_properties(i).total_memory)}
                    for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def machine_info() -> Dict[str, object]:
    mem = None
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        mem = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "memory_bytes": mem, "os": platform.platform(), "arch": platform.machine(),
            "gpus": _gpus(), "loadavg_start": load}
