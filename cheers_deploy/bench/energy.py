"""Energy counters for `cheers-deploy bench --energy`: one interface, several sources, and "unavailable" (never
a guessed figure) when none can be read.

    sampler = discover("cuda")          # or "cpu"
    sampler.start(); ...work...; joules = sampler.stop()      # joules: float, or None if the read failed
    sampler.source                      # "nvml", "jetson-ina3221", "tegrastats", "rapl" or None

Sources, in the order they are tried:
* GPU work: NVML's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since driver load; Volta and
  newer desktop/server GPUs), then the Jetson module rails (which also carry the integrated GPU).
* CPU work: RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj, often root-only), then the Jetson
  rails.
Jetson rails are power readings, not counters: a background thread samples them and integrates (trapezoids).
The INA3221 is read from sysfs (iio `in_power*_input` in mW on L4T <= 32, hwmon `in*_input` mV x `curr*_input`
mA on L4T >= 34) or, failing that, from `tegrastats` output.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# rails that measure the whole module input; preferred over summing rails (the others are nested inside it)
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_IN_TOTAL")
JETSON_PERIOD_S = 0.02


class EnergySampler:
    """start() begins a measurement; stop() ends it and returns the joules spent in between (None when the
    counter could not be read). `elapsed_s` is the wall time of the last measurement."""

    source: Optional[str] = None
    detail: str = ""

    def __init__(self):
        self.elapsed_s: Optional[float] = None
        self._t0: Optional[float] = None

    @property
    def available(self) -> bool:
        return self.source is not None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Optional[float]:
        raise NotImplementedError

    def close(self) -> None:
        """Release handles (NVML, a tegrastats child)."""

    def describe(self) -> Dict[str, object]:
        return {"source": self.source, "detail": self.detail}


class UnavailableSampler(EnergySampler):
    def __init__(self, reason: str):
        super().__init__()
        self.detail = reason

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        if self._t0 is not None:
            self.elapsed_s = time.perf_counter() - self._t0
        return None


# ------------------------------------------------------------------------------------------------ counters

class _CounterSampler(EnergySampler):
    """A monotonically increasing energy counter read at start and stop."""

    def _read_j(self) -> Optional[float]:
        raise NotImplementedError

    def start(self) -> None:
        self._e0 = self._read_j()
        self._t0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        e1 = self._read_j()
        self.elapsed_s = time.perf_counter() - self._t0 if self._t0 is not None else None
        if e1 is None or self._e0 is None:
            return None
        return self._delta(self._e0, e1)

    def _delta(self, e0: float, e1: float) -> Optional[float]:
        d = e1 - e0
        return d if d >= 0 else None


class NvmlEnergySampler(_CounterSampler):
    source = "nvml"

    def __init__(self, index: int = 0):
        super().__init__()
        import pynvml  # nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)      # raises NotSupported before Volta
            name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self.detail = f"nvmlDeviceGetTotalEnergyConsumption, GPU {index} ({name.decode() if isinstance(name, bytes) else name})"

    def _read_j(self) -> Optional[float]:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3     # mJ -> J
        except Exception:
            return None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


class RaplSampler(_CounterSampler):
    """Sum of the package domains (intel-rapl:N, not the core/uncore/dram subzones: those are inside it)."""

    source = "rapl"

    def __init__(self, root: str = "/sys/class/powercap"):
        super().__init__()
        zones = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*"))
                       if re.fullmatch(r"intel-rapl:\d+", os.path.basename(p)))
        self._zones: List[Tuple[Path, float]] = []
        for z in zones:
            z = Path(z)
            if _label(z / "name") == "psys":
                continue               # platform domain: contains the packages, summing both would double count
            try:
                int((z / "energy_uj").read_text())
                rng = float((z / "max_energy_range_uj").read_text()) if (z / "max_energy_range_uj").is_file() else 0.0
            except (OSError, ValueError):
                continue
            self._zones.append((z, rng))
        if not self._zones:
            raise OSError("no readable RAPL package counter under " + root)
        names = []
        for z, _ in self._zones:
            try:
                names.append(f"{z.name} ({(z / 'name').read_text().strip()})")
            except OSError:
                names.append(z.name)
        self.detail = "RAPL energy_uj: " + ", ".join(names)

    def _read_all(self) -> Optional[List[int]]:
        try:
            return [int((z / "energy_uj").read_text()) for z, _ in self._zones]
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        self._v0 = self._read_all()
        self._t0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        v1 = self._read_all()
        self.elapsed_s = time.perf_counter() - self._t0 if self._t0 is not None else None
        if v1 is None or self._v0 is None:
            return None
        total = 0.0
        for (_, rng), a, b in zip(self._zones, self._v0, v1):
            d = b - a
            if d < 0:                      # the counter wrapped once (a run longer than the range would be wrong)
                if rng <= 0:
                    return None
                d += rng
            total += d
        return total / 1e6


# ------------------------------------------------------------------------------------------------ power rails

class _PowerIntegrator(EnergySampler):
    """Samples a power reading (watts) in a background thread and integrates it over time."""

    period_s = JETSON_PERIOD_S

    def _read_w(self) -> Optional[float]:
        raise NotImplementedError

    def start(self) -> None:
        self._samples: List[Tuple[float, float]] = []
        self._failed = False
        self._stop = threading.Event()
        self._sample()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="cheers-bench-power", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        w = self._read_w()
        if w is None:
            self._failed = True
        else:
            self._samples.append((time.perf_counter(), w))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def stop(self) -> Optional[float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.elapsed_s = time.perf_counter() - self._t0
        return integrate(self._samples) if not self._failed else None


def integrate(samples: List[Tuple[float, float]]) -> Optional[float]:
    """Trapezoidal integral of (time s, power W) samples -> joules; None with fewer than two samples."""
    if len(samples) < 2:
        return None
    return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


def _read_num(path: Path) -> Optional[float]:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _label(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def jetson_rails(root: str = "/sys/bus/i2c/drivers") -> List[Tuple[str, Callable[[], Optional[float]]]]:
    """(rail name, read watts) for every INA3221 channel found in sysfs."""
    rails: List[Tuple[str, Callable[[], Optional[float]]]] = []
    # L4T <= 32: iio device, in_power<N>_input in mW, names in rail_name_<N>
    for p in sorted(glob.glob(os.path.join(root, "ina3221*", "*", "iio:device*", "in_power*_input"))):
        p = Path(p)
        n = re.search(r"in_power(\d+)_input", p.name).group(1)
        name = _label(p.parent / f"rail_name_{n}") or f"{p.parent.parent.name}/power{n}"
        rails.append((name, (lambda q=p: None if (v := _read_num(q)) is None else v / 1e3)))
    # L4T >= 34: hwmon, in<N>_input mV and curr<N>_input mA, names in in<N>_label
    for p in sorted(glob.glob(os.path.join(root, "ina3221*", "*", "hwmon", "hwmon*", "curr*_input"))):
        p = Path(p)
        n = re.search(r"curr(\d+)_input", p.name).group(1)
        volt = p.parent / f"in{n}_input"
        if not volt.is_file():
            continue
        name = _label(p.parent / f"in{n}_label") or f"{p.parent.name}/ch{n}"
        if "sum" in name.lower():
            continue                   # "Sum of shunt voltages" channels are not a rail
        rails.append((name, (lambda c=p, v=volt: None if (a := _read_num(c)) is None or (u := _read_num(v)) is None
                             else a * u / 1e6)))
    # any hwmon device exposing power<N>_input in microwatts (ina3221 and relatives)
    for p in sorted(glob.glob("/sys/class/hwmon/hwmon*/power*_input")):
        p = Path(p)
        if not _label(p.parent / "name").lower().startswith("ina"):
            continue
        n = re.search(r"power(\d+)_input", p.name).group(1)
        name = _label(p.parent / f"power{n}_label") or f"{p.parent.name}/power{n}"
        rails.append((name, (lambda q=p: None if (v := _read_num(q)) is None else v / 1e6)))
    return rails


class JetsonRailSampler(_PowerIntegrator):
    source = "jetson-ina3221"

    def __init__(self, root: str = "/sys/bus/i2c/drivers"):
        super().__init__()
        rails = [(n, f) for n, f in jetson_rails(root) if f() is not None]
        if not rails:
            raise OSError("no readable INA3221 power rail in sysfs")
        total = [(n, f) for n, f in rails if n.upper() in TOTAL_RAILS]
        self._rails = total[:1] if total else rails
        how = "module input rail" if total else "sum of rails (no total-input rail found; may double count)"
        self.detail = f"INA3221 sysfs, {how}: " + ", ".join(n for n, _ in self._rails)

    def _read_w(self) -> Optional[float]:
        vals = [f() for _, f in self._rails]
        return None if any(v is None for v in vals) else float(sum(vals))


_TEGRA_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")


def parse_tegrastats(line: str) -> Dict[str, float]:
    """Rail -> instantaneous watts from one tegrastats line ('VDD_IN 5031mW/5031mW' or 'POM_5V_IN 1234/1234')."""
    return {m.group(1): int(m.group(2)) / 1e3 for m in _TEGRA_RAIL.finditer(line)
            if not m.group(1).startswith(("RAM", "SWAP", "CPU", "EMC", "GR3D", "IRAM", "LFB"))}


class TegrastatsSampler(_PowerIntegrator):
    source = "tegrastats"

    def __init__(self, exe: Optional[str] = None, interval_ms: int = 50):
        super().__init__()
        self._exe = exe or shutil.which("tegrastats")
        if not self._exe:
            raise OSError("tegrastats not found")
        self._interval_ms = interval_ms
        self.detail = f"{self._exe} --interval {interval_ms}, module input rail"

    def start(self) -> None:
        self._samples = []
        self._failed = False
        self._proc = subprocess.Popen([self._exe, "--interval", str(self._interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._reader, name="cheers-bench-tegrastats", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        for line in self._proc.stdout:
            rails = parse_tegrastats(line)
            total = next((rails[n] for n in TOTAL_RAILS if n in rails), None)
            if total is None and rails:
                total = sum(rails.values())
            if total is not None:
                self._samples.append((time.perf_counter(), total))

    def stop(self) -> Optional[float]:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=5)
        self.elapsed_s = time.perf_counter() - self._t0
        return integrate(self._samples)

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------ discovery

def _gpu_index(device: str) -> int:
    """cuda:N -> the NVML index (NVML ignores CUDA_VISIBLE_DEVICES, so map through it when it lists numbers)."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    idx = int(m.group(1) or 0) if m else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and idx < len(visible):
        return int(visible[idx])
    return idx


def discover(device: str = "cpu") -> EnergySampler:
    """The first readable source for work on `device` ('cpu', 'cuda', 'cuda:N'), else an UnavailableSampler
    whose `detail` lists why each source was rejected."""
    gpu = device.startswith("cuda")
    tries: List[Tuple[str, Callable[[], EnergySampler]]] = []
    if gpu:
        tries.append(("nvml", lambda: NvmlEnergySampler(_gpu_index(device))))
    else:
        tries.append(("rapl", RaplSampler))
    tries += [("jetson-ina3221", JetsonRailSampler), ("tegrastats", TegrastatsSampler)]
    why = []
    for name, make in tries:
        try:
            return make()
        except ImportError as exc:
            why.append(f"{name}: {exc.name or exc} not installed")
        except Exception as exc:  # NVMLError_NotSupported, OSError, PermissionError ...
            why.append(f"{name}: {str(exc).strip() or type(exc).__name__}")
    return UnavailableSampler("no readable energy source (" + "; ".join(why) + ")")
