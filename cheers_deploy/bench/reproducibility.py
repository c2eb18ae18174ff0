"""What makes a benchmark number reproducible, read (never guessed) at the time of the run: per GPU the name,
driver, CUDA driver version, current and maximum SM/memory clocks, power limits, persistence mode and performance
state (NVML); on a Jetson the `nvpmodel` power mode and whether `jetson_clocks` pinned the clocks; on any Linux
machine the CPU frequency governor. A field that cannot be read says "unavailable: <why>".

    reproducibility()                  # the live machine
    reproducibility(root=tmp, nvml=fake, run_tool=fake)      # tests: a fake sysfs tree, NVML module and tools

Nothing here imports torch (an ORT-only run stays torch-free); the CUDA runtime of torch is recorded only when
torch is already loaded.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

ToolRunner = Callable[[List[str]], Optional[str]]
UNAVAILABLE = "unavailable"


def unavailable(reason: str) -> str:
    return f"{UNAVAILABLE}: {reason}"


def is_unavailable(value) -> bool:
    return isinstance(value, str) and value.startswith(UNAVAILABLE)


def _reason(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]


def run_tool(argv: List[str]) -> Optional[str]:
    """stdout of a system tool found on PATH (None when absent, failing or slow). Only fixed tool names are run."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        r = subprocess.run([exe] + argv[1:], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


# ------------------------------------------------------------------------------------------------ NVML

def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _gpu_fields(nvml, h) -> Dict[str, object]:
    sm, mem = getattr(nvml, "NVML_CLOCK_SM", 1), getattr(nvml, "NVML_CLOCK_MEM", 2)
    pstate = lambda: f"P{int(nvml.nvmlDeviceGetPerformanceState(h))}"  # noqa: E731
    persistence = lambda: "enabled" if int(nvml.nvmlDeviceGetPersistenceMode(h)) == 1 else "disabled"  # noqa: E731

    def reasons():
        fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return f"0x{int(fn(h)):x}"

    readers = {
        "name": lambda: _text(nvml.nvmlDeviceGetName(h)),
        "sm_clock_mhz": lambda: int(nvml.nvmlDeviceGetClockInfo(h, sm)),
        "mem_clock_mhz": lambda: int(nvml.nvmlDeviceGetClockInfo(h, mem)),
        "sm_clock_max_mhz": lambda: int(nvml.nvmlDeviceGetMaxClockInfo(h, sm)),
        "mem_clock_max_mhz": lambda: int(nvml.nvmlDeviceGetMaxClockInfo(h, mem)),
        "sm_app_clock_mhz": lambda: int(nvml.nvmlDeviceGetApplicationsClock(h, sm)),
        "power_limit_w": lambda: nvml.nvmlDeviceGetPowerManagementLimit(h) / 1e3,          # mW -> W
        "power_limit_default_w": lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1e3,
        "power_limit_enforced_w": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3,
        "power_draw_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
        "persistence_mode": persistence,
        "performance_state": pstate,
        "clocks_event_reasons": reasons,
        "temperature_c": lambda: int(nvml.nvmlDeviceGetTemperature(h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))),
    }
    out: Dict[str, object] = {}
    for key, read in readers.items():
        try:
            out[key] = read()
        except Exception as exc:  # NVMLError_NotSupported on some boards, AttributeError on old bindings
            out[key] = unavailable(f"NVML: {_reason(exc)}")
    return out


def nvml_state(nvml=None) -> Dict[str, object]:
    """{"driver", "cuda_driver", "gpus": [per-GPU fields]}, or the same keys "unavailable: <why>"."""
    try:
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        nvml.nvmlInit()
    except ImportError:
        why = unavailable("nvidia-ml-py (pynvml) not installed")
        return {"driver": why, "cuda_driver": why, "gpus": why}
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        why = unavailable(f"nvmlInit failed: {_reason(exc)}")
        return {"driver": why, "cuda_driver": why, "gpus": why}
    try:
        out: Dict[str, object] = {}
        try:
            out["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception as exc:
            out["driver"] = unavailable(f"NVML: {_reason(exc)}")
        try:
            v = int(nvml.nvmlSystemGetCudaDriverVersion())                  # 13000 -> "13.0"
            out["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception as exc:
            out["cuda_driver"] = unavailable(f"NVML: {_reason(exc)}")
        try:
            out["gpus"] = [dict(index=i, **_gpu_fields(nvml, nvml.nvmlDeviceGetHandleByIndex(i)))
                           for i in range(int(nvml.nvmlDeviceGetCount()))]
        except Exception as exc:
            out["gpus"] = unavailable(f"NVML: {_reason(exc)}")
        return out
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ Jetson

def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def is_jetson(root: Path) -> bool:
    compat = _read(root / "proc/device-tree/compatible") or ""
    return (root / "etc/nv_tegra_release").is_file() or "nvidia,tegra" in compat


def nvpmodel_mode(root: Path, tool: ToolRunner) -> object:
    """{"name", "id", "source"} from `nvpmodel -q`, else from /var/lib/nvpmodel/status and /etc/nvpmodel.conf."""
    out = tool(["nvpmodel", "-q"])
    if out:
        m = re.search(r"NV Power Mode:\s*(\S+)(?:\s*\n\s*(\d+))?", out)
        if m:
            return {"name": m.group(1), "id": int(m.group(2)) if m.group(2) else None, "source": "nvpmodel -q"}
    status = _read(root / "var/lib/nvpmodel/status")
    m = re.search(r"pmode:(\d+)", status or "")
    if not m:
        return unavailable("`nvpmodel -q` not runnable and /var/lib/nvpmodel/status not readable")
    mode_id = int(m.group(1))
    conf = _read(root / "etc/nvpmodel.conf") or ""
    names = {int(i): n for i, n in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", conf)}
    return {"name": names.get(mode_id, unavailable(f"mode {mode_id} not named in /etc/nvpmodel.conf")),
            "id": mode_id, "source": "/var/lib/nvpmodel/status"}


def _gpu_devfreq(root: Path) -> List[Path]:
    """The Jetson GPU's devfreq folders (gp10b, gv11b, ga10b, gb10b ... or a name with 'gpu')."""
    out = []
    for d in sorted(glob.glob(str(root / "sys/class/devfreq/*"))):
        d = Path(d)
        name = (d.name + " " + (_read(d / "name") or "")).lower()
        if "gpu" in name or re.search(r"g[pvab]\d+b", name):
            out.append(d)
    return out


def jetson_clocks_state(root: Path) -> object:
    """Whether the clocks are pinned to their maximum as `jetson_clocks` does: every CPU's scaling_min_freq equals
    its cpuinfo_max_freq and the GPU's devfreq min_freq equals max_freq (read from sysfs, no root needed)."""
    evidence: Dict[str, str] = {}
    pinned: List[bool] = []
    for c in sorted(glob.glob(str(root / "sys/devices/system/cpu/cpu[0-9]*/cpufreq"))):
        lo, hi = _read(Path(c) / "scaling_min_freq"), _read(Path(c) / "cpuinfo_max_freq")
        if lo and hi:
            evidence[Path(c).parent.name] = f"min {lo} / max {hi} kHz"
            pinned.append(lo == hi)
    for d in _gpu_devfreq(root):
        lo, hi = _read(d / "min_freq"), _read(d / "max_freq")
        if lo and hi:
            evidence[f"gpu {d.name}"] = f"min {lo} / max {hi} Hz"
            pinned.append(lo == hi)
    if not pinned:
        return unavailable("no readable cpufreq or GPU devfreq min/max in sysfs")
    return {"state": "on" if all(pinned) else "off",
            "source": "sysfs: CPU scaling_min_freq vs cpuinfo_max_freq, GPU devfreq min_freq vs max_freq",
            "evidence": evidence}


def jetson_state(root: Path, tool: ToolRunner) -> Dict[str, object]:
    if not is_jetson(root):
        why = unavailable("not a Jetson (no /etc/nv_tegra_release, no nvidia,tegra in the device tree)")
        return {"l4t": why, "nvpmodel": why, "jetson_clocks": why}
    release = _read(root / "etc/nv_tegra_release")
    return {"l4t": release.splitlines()[0] if release else unavailable("/etc/nv_tegra_release not readable"),
            "nvpmodel": nvpmodel_mode(root, tool), "jetson_clocks": jetson_clocks_state(root)}


# ------------------------------------------------------------------------------------------------ CPU

def cpu_governor(root: Path) -> object:
    """The cpufreq governor, "performance" when all CPUs agree, else "cpu0-3: schedutil, cpu4-7: performance"."""
    by_cpu = {}
    for p in glob.glob(str(root / "sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")):
        v = _read(Path(p))
        if v:
            by_cpu[int(re.search(r"cpu(\d+)/cpufreq", p).group(1))] = v
    if not by_cpu:
        return unavailable("no readable cpufreq scaling_governor in sysfs (virtual machines and containers hide it)")
    if len(set(by_cpu.values())) == 1:
        return next(iter(by_cpu.values()))
    groups: Dict[str, List[int]] = {}
    for cpu in sorted(by_cpu):
        groups.setdefault(by_cpu[cpu], []).append(cpu)
    return ", ".join(f"cpu{','.join(map(str, cpus))}: {gov}" for gov, cpus in groups.items())


# ------------------------------------------------------------------------------------------------ all of it

def cuda_runtime() -> object:
    torch = sys.modules.get("torch")
    if torch is None:
        return unavailable("torch not loaded in this run (ONNX Runtime / TensorRT backends)")
    return getattr(torch.version, "cuda", None) or unavailable(f"torch {torch.__version__} is a CPU build")


def reproducibility(root: str = "/", nvml=None, tool: Optional[ToolRunner] = None) -> Dict[str, object]:
    r = Path(root)
    state = nvml_state(nvml)
    return {"gpu_driver": state["driver"], "cuda_driver": state["cuda_driver"], "cuda_runtime_torch": cuda_runtime(),
            "gpus": state["gpus"], "jetson": jetson_state(r, tool or run_tool), "cpu_governor": cpu_governor(r)}


def summary_line(rep: Dict[str, object]) -> str:
    """One line for a report header: clocks, power limit, persistence, Jetson mode, CPU governor ("unavailable"
    without its reason: the JSON has it)."""
    def v(x, unit=""):
        return UNAVAILABLE if x is None or is_unavailable(x) else f"{x}{unit}"

    parts = []
    gpus = rep.get("gpus")
    if isinstance(gpus, list):
        for g in gpus:
            parts.append(f"GPU {g['index']} {v(g.get('name'))}: SM {v(g.get('sm_clock_mhz'))}/"
                         f"{v(g.get('sm_clock_max_mhz'), ' MHz')}, memory {v(g.get('mem_clock_mhz'))}/"
                         f"{v(g.get('mem_clock_max_mhz'), ' MHz')}, power limit {v(g.get('power_limit_w'), ' W')}, "
                         f"persistence {v(g.get('persistence_mode'))}, {v(g.get('performance_state'))}")
        parts.append(f"driver {v(rep.get('gpu_driver'))}, CUDA driver {v(rep.get('cuda_driver'))}")
    else:
        parts.append(f"GPU state {UNAVAILABLE}")
    j = rep.get("jetson", {})
    nv, jc = j.get("nvpmodel"), j.get("jetson_clocks")
    if not (is_unavailable(nv) and is_unavailable(jc) and is_unavailable(j.get("l4t"))):
        parts.append(f"nvpmodel {v(nv.get('name') if isinstance(nv, dict) else nv)}, "
                     f"jetson_clocks {v(jc.get('state') if isinstance(jc, dict) else jc)}")
    parts.append(f"CPU governor {v(rep.get('cpu_governor'))}")
    return "; ".join(parts)
