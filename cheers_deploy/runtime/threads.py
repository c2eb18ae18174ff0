"""How many CPU threads a run uses. A robot or kiosk runs other programs beside the model: more intra-op threads
than the cores this process may use, or threads that spin while they wait, slow every stage down by up to an order
of magnitude on a loaded machine (torch: 0.55 s -> 4.4 s per image with OpenMP's default spinning on 2 busy cores;
docs/performance.md, `python -m cheers_deploy.bench.threads`). The default is the number of physical cores available
to the process (affinity mask and cgroup quota), never more."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Set, Tuple

from ..errors import InputError


def _affinity() -> Set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def _cgroup_quota() -> Optional[int]:
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cfs quota) limit, rounded up; None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once), capped by the cgroup
    quota; the logical count where the topology is not readable."""
    cpus = _affinity()
    cores: Set[Tuple[str, str]] = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    n = len(cores) or len(cpus) or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def resolve_threads(threads: Optional[int]) -> int:
    """`threads` checked (1..physical cores is sensible; more is allowed but never the default), or the default."""
    if threads is None:
        return physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    return threads


def set_torch_threads(threads: Optional[int]) -> int:
    """Set torch's intra-op threads (process-wide, as torch has it) and return the number used."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
