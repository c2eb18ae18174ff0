"""Jetson energy sources: the INA3221 power monitor on the module's input rail (sysfs) and, failing that,
`tegrastats` output. Both are power readings, not counters: they are sampled and integrated (energy.PowerIntegrator).

The INA3221 is read from sysfs (iio `in_power*_input` in mW on L4T <= 32, hwmon `in*_input` mV x `curr*_input`
mA on L4T >= 34, or hwmon `power*_input` in uW) or from `tegrastats` ('VDD_IN 5031mW/5031mW').
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

from .energy import PowerIntegrator, integrate, read_label, read_num

# rails that measure the whole module input; preferred over summing rails (the others are nested inside it)
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0", "VDD_IN_TOTAL")


def jetson_rails(root: str = "/sys/bus/i2c/drivers") -> List[Tuple[str, Callable[[], Optional[float]]]]:
    """(rail name, read watts) for every INA3221 channel found in sysfs."""
    rails: List[Tuple[str, Callable[[], Optional[float]]]] = []
    # L4T <= 32: iio device, in_power<N>_input in mW, names in rail_name_<N>
    for p in sorted(glob.glob(os.path.join(root, "ina3221*", "*", "iio:device*", "in_power*_input"))):
        p = Path(p)
        n = re.search(r"in_power(\d+)_input", p.name).group(1)
        name = read_label(p.parent / f"rail_name_{n}") or f"{p.parent.parent.name}/power{n}"
        rails.append((name, (lambda q=p: None if (v := read_num(q)) is None else v / 1e3)))
    # L4T >= 34: hwmon, in<N>_input mV and curr<N>_input mA, names in in<N>_label
    for p in sorted(glob.glob(os.path.join(root, "ina3221*", "*", "hwmon", "hwmon*", "curr*_input"))):
        p = Path(p)
        n = re.search(r"curr(\d+)_input", p.name).group(1)
        volt = p.parent / f"in{n}_input"
        if not volt.is_file():
            continue
        name = read_label(p.parent / f"in{n}_label") or f"{p.parent.name}/ch{n}"
        if "sum" in name.lower():
            continue                   # "Sum of shunt voltages" channels are not a rail
        rails.append((name, (lambda c=p, v=volt: None if (a := read_num(c)) is None or (u := read_num(v)) is None
                             else a * u / 1e6)))
    # any hwmon device exposing power<N>_input in microwatts (ina3221 and relatives)
    for p in sorted(glob.glob("/sys/class/hwmon/hwmon*/power*_input")):
        p = Path(p)
        if not read_label(p.parent / "name").lower().startswith("ina"):
            continue
        n = re.search(r"power(\d+)_input", p.name).group(1)
        name = read_label(p.parent / f"power{n}_label") or f"{p.parent.name}/power{n}"
        rails.append((name, (lambda q=p: None if (v := read_num(q)) is None else v / 1e6)))
    return rails


class JetsonRailSampler(PowerIntegrator):
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


class TegrastatsSampler(PowerIntegrator):
    source = "tegrastats"

    def __init__(self, exe: Optional[str] = None, interval_ms: int = 50):
        super().__init__()
        self._exe = exe or shutil.which("tegrastats")
        if not self._exe:
            raise OSError("tegrastats not found")
        self._interval_ms = interval_ms
        self.detail = f"{self._exe} --interval {interval_ms}, module input rail"

    def start(self) -> None:
        self._samples: List[Tuple[float, float]] = []
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
        self.peak_w = max((w for _, w in self._samples), default=None)
        return integrate(self._samples)

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
