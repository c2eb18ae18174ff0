"""`cheers-deploy doctor`: what this machine can run (every probe is optional and never raises)."""

from __future__ import annotations

import importlib
import os
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
    lines.append(f"cpu threads   {_threads()}")
    lines.append(f"bundled model {_bundled()}")
    lines.append(f"hf hub        {_hub()}")
    return "\n".join(lines)


def _threads() -> str:
    try:
        from .runtime.threads import physical_cores

        n = physical_cores()
    except Exception as exc:  # noqa: BLE001 - a probe must never fail
        return f"unknown ({exc.__class__.__name__})"
    return f"{n} by default (physical cores available to this process; --threads N to change), " \
           f"{os.cpu_count()} logical CPUs on the machine"


def _bundled() -> str:
    try:
        from .hub import BUNDLED, bundled_workdir

        ckpt = "checkpoint present" if (BUNDLED / "config.json").is_file() else "checkpoint MISSING"
        graphs = bundled_workdir()
        return f"{ckpt}; exported graphs {'shipped (runs on onnxruntime, torch-free)' if graphs else 'not shipped'}"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc.__class__.__name__})"


def _hub() -> str:
    hv = _version("huggingface_hub")
    if not hv:
        return "huggingface_hub not installed (needed for --checkpoint OWNER/NAME)"
    try:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
    except Exception:  # noqa: BLE001
        cache = "?"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return f"huggingface_hub {hv}, cache {cache}{', HF_HUB_OFFLINE set (cache only)' if offline else ''}"
