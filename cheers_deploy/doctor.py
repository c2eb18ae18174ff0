"""`cheers-deploy doctor`: what this machine can run (every probe is optional and never raises)."""

from __future__ import annotations

import importlib
import platform
import shutil
import subprocess
import sys


def _version(mod: str):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - a probe must never fail
        return None if isinstance(exc, ImportError) else f"broken ({exc.__class__.__name__})"


def report() -> str:
    lines = [f"python        {sys.version.split()[0]} ({platform.machine()}, {platform.system()})"]
    lines.append(f"cheers-deploy {_version('cheers_deploy')}")
    tv = _version("torch")
    if tv:
        import torch

        cuda = torch.cuda.is_available()
        gpu = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
        lines.append(f"torch         {tv} (CUDA build {torch.version.cuda or 'none'}; {gpu})")
    else:
        lines.append("torch         not installed (ok for the ort/trt runtime; install cheers-deploy[torch] to export/train)")
    ov = _version("onnxruntime")
    if ov:
        import onnxruntime as ort

        lines.append(f"onnxruntime   {ov} providers: {', '.join(ort.get_available_providers())}")
    else:
        lines.append("onnxruntime   not installed")
    trt = _version("tensorrt")
    lines.append(f"tensorrt      {trt or 'not installed (needed for build and --backend trt)'}")
    lines.append(f"polygraphy    {_version('polygraphy') or 'not installed'}")
    cp = _version("cuda.bindings") or _version("cuda")
    lines.append(f"cuda-python   {cp or 'not installed'}")
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            lines.append(f"nvidia-smi    {out or 'no GPU listed'}")
        except (OSError, subprocess.SubprocessError):
            lines.append("nvidia-smi    present but did not answer")
    else:
        lines.append("nvidia-smi    not found (no NVIDIA driver)")
    nvcc = shutil.which("nvcc")
    lines.append(f"nvcc          {nvcc or 'not found'}")
    return "\n".join(lines)
