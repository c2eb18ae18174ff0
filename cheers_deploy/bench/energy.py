"""Energy counters for `cheers-deploy bench --energy` and the GPU driver: one interface, several sources, and
"unavailable" (never a guessed figure) when none can be read.

    sampler = discover("cuda")          # or "cpu"
    sampler.start(); ...work...; joules = sampler.stop()      # joules: float, or None if the read failed
    sampler.source                      # "nvml", "nvml-power", "jetson-ina3221", "tegrastats", "rapl" or None
    sampler.method                      # "counter" (read at start and stop) or "integrated power samples"
    sampler.peak_w                      # highest power sample of the last measurement, None without samples

Sources, in the order they are tried:
* GPU work: NVML's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ since driver load; Volta and
  newer desktop/server GPUs), with nvmlDeviceGetPowerUsage (mW) polled beside it for the peak; where the counter
  is missing, the power readings integrated ("nvml-power"); then the Jetson module rails (energy_jetson.py, which
  also carry the integrated GPU).
* CPU work: RAPL package counters (/sys/class/powercap/intel-rapl:N/energy_uj, often root-only), then the Jetson
  rails.
A reader that fails or returns nothing during a measurement makes stop() return None: no figure is produced.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

POLL_PERIOD_S = 0.02
COUNTER = "counter"
INTEGRATED = "integrated power samples"


class EnergySampler:
    """start() begins a measurement; stop() ends it and returns the joules spent in between (None when a reading
    failed). After stop(): `elapsed_s` (wall time) and `peak_w` (highest power sample, None when not sampled)."""

    source: Optional[str] = None
    method: str = ""
    detail: str = ""

    def __init__(self):
        self.elapsed_s: Optional[float] = None
        self.peak_w: Optional[float] = None
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
        return {"source": self.source, "method": self.method or None, "detail": self.detail}


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


def measure(sampler: EnergySampler, fn: Callable[[], object], count: int = 1) -> Dict[str, object]:
    """Run fn() once between sampler.start() and stop(): {"joules", "seconds", "avg_power_w", "peak_power_w",
    "joules_per_unit"} (count units of work), or {"status": "unavailable", "reason"} without a reading."""
    sampler.start()
    try:
        fn()
    finally:
        joules = sampler.stop()
    return energy_figures(sampler, joules, sampler.elapsed_s, count)


def energy_figures(sampler: EnergySampler, joules: Optional[float], seconds: Optional[float],
                   count: int = 1) -> Dict[str, object]:
    """The figures of one reading; "unavailable" (with the reason) unless joules and seconds are finite and > 0."""
    if sampler.source is None:
        return {"status": "unavailable", "reason": sampler.detail}
    if joules is None or not seconds or not (joules > 0 and joules < float("inf")):
        return {"status": "unavailable", "source": sampler.source,
                "reason": f"{sampler.source}: no reading (a read failed, or the counter did not advance)"}
    out = {"status": "ok", "source": sampler.source, "method": sampler.method, "joules": joules,
           "seconds": seconds, "avg_power_w": joules / seconds, "peak_power_w": sampler.peak_w}
    if count:
        out["joules_per_unit"] = joules / count
    return out


# ------------------------------------------------------------------------------------------------ power polling

class PowerPoller:
    """Reads a power function (watts, None on failure) in a background thread every `period_s` seconds, plus once
    at start and once at stop. `samples` are (time s, watts); `failed` is set when any read returned None."""

    def __init__(self, read_w: Callable[[], Optional[float]], period_s: float = POLL_PERIOD_S):
        self.read_w, self.period_s = read_w, period_s
        self.samples: List[Tuple[float, float]] = []
        self.failed = False
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        w = self.read_w()
        if w is None:
            self.failed = True
        else:
            self.samples.append((time.perf_counter(), float(w)))

    def _loop(self) -> None:
        while not self._halt.wait(self.period_s):
            self._sample()

    def start(self) -> None:
        self.samples, self.failed, self._halt = [], False, threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="cheers-bench-power", daemon=True)
        self._thread.start()

    def stop(self) -> List[Tuple[float, float]]:
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
            self._sample()
        return self.samples

    @property
    def peak_w(self) -> Optional[float]:
        return max(w for _, w in self.samples) if self.samples else None


def integrate(samples: List[Tuple[float, float]]) -> Optional[float]:
    """Trapezoidal integral of (time s, power W) samples -> joules; None with fewer than two samples."""
    if len(samples) < 2:
        return None
    return sum(0.5 * (p0 + p1) * (t1 - t0) for (t0, p0), (t1, p1) in zip(samples, samples[1:]))


class PowerIntegrator(EnergySampler):
    """Energy from a power reading (watts) sampled in a background thread and integrated (trapezoids); None when
    any sample failed or fewer than two were taken."""

    method = INTEGRATED
    period_s = POLL_PERIOD_S

    def _read_w(self) -> Optional[float]:
        raise NotImplementedError

    def start(self) -> None:
        self._poller = PowerPoller(self._read_w, self.period_s)
        self._poller.start()
        self._t0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        samples = self._poller.stop()
        self.elapsed_s = time.perf_counter() - self._t0
        self.peak_w = self._poller.peak_w
        return None if self._poller.failed else integrate(samples)


# ------------------------------------------------------------------------------------------------ counters

class _CounterSampler(EnergySampler):
    """A monotonically increasing energy counter read at start and stop; `_power` (watts), when set, is polled in
    between for the peak."""

    method = COUNTER
    _power: Optional[Callable[[], Optional[float]]] = None

    def _read_j(self) -> Optional[float]:
        raise NotImplementedError

    def start(self) -> None:
        self._poller = PowerPoller(self._power) if self._power is not None else None
        if self._poller is not None:
            self._poller.start()
        self._e0 = self._read_j()
        self._t0 = time.perf_counter()

    def stop(self) -> Optional[float]:
        e1 = self._read_j()
        self.elapsed_s = time.perf_counter() - self._t0 if self._t0 is not None else None
        self.peak_w = None
        if self._poller is not None:
            self._poller.stop()
            self.peak_w = None if self._poller.failed else self._poller.peak_w
        if e1 is None or self._e0 is None:
            return None
        return self._delta(self._e0, e1)

    def _delta(self, e0: float, e1: float) -> Optional[float]:
        d = e1 - e0
        return d if d > 0 else None           # a counter that did not advance gives no figure (not "0 J")


def _open_nvml(index: int, nvml=None):
    """(pynvml module, device handle, device name); raises ImportError without nvidia-ml-py, NVMLError without a
    driver or GPU."""
    if nvml is None:
        import pynvml as nvml  # nvidia-ml-py
    nvml.nvmlInit()
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
    except Exception:
        nvml.nvmlShutdown()
        raise
    return nvml, handle, name.decode() if isinstance(name, bytes) else str(name)


def _nvml_power_reader(nvml, handle) -> Callable[[], Optional[float]]:
    def read() -> Optional[float]:
        try:
            return nvml.nvmlDeviceGetPowerUsage(handle) / 1e3                 # mW -> W
        except Exception:
            return None
    return read


class NvmlEnergySampler(_CounterSampler):
    source = "nvml"

    def __init__(self, index: int = 0, nvml=None):
        super().__init__()
        self._nvml, self._handle, name = _open_nvml(index, nvml)
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)       # raises NotSupported before Volta
        except Exception:
            self._nvml.nvmlShutdown()
            raise
        power = _nvml_power_reader(self._nvml, self._handle)
        self._power = power if power() is not None else None
        self.detail = (f"nvmlDeviceGetTotalEnergyConsumption, GPU {index} ({name}); peak power from "
                       + ("nvmlDeviceGetPowerUsage samples" if self._power else "nowhere (power usage not readable)"))

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


class NvmlPowerSampler(PowerIntegrator):
    """The fallback where the energy counter is missing: nvmlDeviceGetPowerUsage (mW) integrated over time."""

    source = "nvml-power"

    def __init__(self, index: int = 0, nvml=None):
        super().__init__()
        self._nvml, self._handle, name = _open_nvml(index, nvml)
        self._read = _nvml_power_reader(self._nvml, self._handle)
        if self._read() is None:
            self._nvml.nvmlShutdown()
            raise OSError("nvmlDeviceGetPowerUsage not readable")
        self.detail = (f"nvmlDeviceGetPowerUsage integrated every {self.period_s * 1e3:.0f} ms, GPU {index} ({name}): "
                       "no total-energy counter on this GPU")

    def _read_w(self) -> Optional[float]:
        return self._read()

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


def read_num(path: Path) -> Optional[float]:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_label(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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
            if read_label(z / "name") == "psys":
                continue               # platform domain: contains the packages, summing both would double count
            try:
                int((z / "energy_uj").read_text())
                rng = float((z / "max_energy_range_uj").read_text()) if (z / "max_energy_range_uj").is_file() else 0.0
            except (OSError, ValueError):
                continue
            self._zones.append((z, rng))
        if not self._zones:
            raise OSError("no readable RAPL package counter under " + root)
        names = [f"{z.name} ({read_label(z / 'name')})" if read_label(z / "name") else z.name for z, _ in self._zones]
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
        return total / 1e6 if total > 0 else None


# ------------------------------------------------------------------------------------------------ discovery

def gpu_index(device: str) -> int:
    """cuda:N -> the NVML index (NVML ignores CUDA_VISIBLE_DEVICES, so map through it when it lists numbers)."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    idx = int(m.group(1) or 0) if m else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and idx < len(visible):
        return int(visible[idx])
    return idx


def discover(device: str = "cpu", nvml=None) -> EnergySampler:
    """The first readable source for work on `device` ('cpu', 'cuda', 'cuda:N'), else an UnavailableSampler
    whose `detail` lists why each source was rejected. `nvml`: a pynvml-like module (tests)."""
    from .energy_jetson import JetsonRailSampler, TegrastatsSampler

    gpu = device.startswith("cuda")
    tries: List[Tuple[str, Callable[[], EnergySampler]]] = []
    if gpu:
        tries.append(("nvml", lambda: NvmlEnergySampler(gpu_index(device), nvml)))
        tries.append(("nvml-power", lambda: NvmlPowerSampler(gpu_index(device), nvml)))
    else:
        tries.append(("rapl", RaplSampler))
    tries += [("jetson-ina3221", JetsonRailSampler), ("tegrastats", TegrastatsSampler)]
    why = []
    for name, make in tries:
        try:
            sampler = make()
            if why:                                    # say which sources were passed over, and why
                sampler.detail += " (not used: " + "; ".join(why) + ")"
            return sampler
        except ImportError as exc:
            why.append(f"{name}: {exc.name or exc} not installed")
        except Exception as exc:  # NVMLError_NotSupported, OSError, PermissionError ...
            why.append(f"{name}: {str(exc).strip() or type(exc).__name__}")
    return UnavailableSampler("no readable energy source (" + "; ".join(why) + ")")
