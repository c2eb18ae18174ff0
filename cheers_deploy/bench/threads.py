"""How thread settings behave on a busy machine: time the bundled model's text-to-image on the torch backend in fresh
processes (OpenMP reads its settings once, at start-up), with and without other programs keeping the cores busy.

    python -m cheers_deploy.bench.threads [--load N] [--runs 3] [--json out.json]

Rows: the package default (physical cores, OpenMP threads sleep while they wait), the same with spinning waits
(OMP_WAIT_POLICY=ACTIVE, what torch does when nothing sets it), and one thread. The load is N busy-looping processes
started for the duration of the measurement (N = the core count by default; --load 0 for a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from cheers_deploy.runtime.pipeline import Pipeline
threads = None if sys.argv[1] == "default" else int(sys.argv[1])
pipe = Pipeline.from_pretrained(None, threads=threads, timings=False)
pipe.generate("a red circle on the left", seed=0)                   # warm-up
times = []
for i in range(int(sys.argv[2])):
    t0 = time.perf_counter(); pipe.generate("a red circle on the left", seed=i); times.append(time.perf_counter() - t0)
import torch
print(json.dumps({"times_s": times, "torch_threads": torch.get_num_threads()}))
"""

CONFIGS = [("default (physical cores, passive wait)", "default", {}),
           ("physical cores, spinning wait (OMP_WAIT_POLICY=ACTIVE)", "default", {"OMP_WAIT_POLICY": "ACTIVE"}),
           ("1 thread", "1", {})]


def _burn(stop):
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def run(load: int, runs: int) -> dict:
    stop = mp.Event()
    procs = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(load)]
    for p in procs:
        p.start()
    rows = []
    try:
        time.sleep(0.5 if load else 0.0)
        for label, threads, env in CONFIGS:
            e = dict(os.environ, **env)
            if "OMP_WAIT_POLICY" not in env:
                e.pop("OMP_WAIT_POLICY", None)
            out = subprocess.run([sys.executable, "-c", CHILD, threads, str(runs)], env=e, capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode != 0:
                rows.append({"config": label, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"config": label, "torch_threads": r["torch_threads"],
                         "median_s": statistics.median(r["times_s"]), "times_s": r["times_s"]})
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
    base = next((r["median_s"] for r in rows if "median_s" in r), None)
    for r in rows:
        if "median_s" in r and base:
            r["vs_default"] = r["median_s"] / base
    return {"machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d"), "load_processes": load, "runs": runs,
            "command": "python -m cheers_deploy.bench.threads " + " ".join(sys.argv[1:]), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=os.cpu_count() or 1,
                    help="busy processes kept running during the measurement (default: one per logical CPU)")
    ap.add_argument("--runs", type=int, default=3, help="timed images per configuration (default 3)")
    ap.add_argument("--json", default=None, help="also write the result as JSON")
    a = ap.parse_args(argv)
    if a.load < 0 or a.runs < 1:
        print("error: --load must be >= 0 and --runs >= 1", file=sys.stderr)
        return 2
    res = run(a.load, a.runs)
    print(f"{res['date']}  {res['machine']['cpu']}  {res['machine']['logical_cpus']} CPUs  "
          f"load: {a.load} busy processes")
    for r in res["rows"]:
        if "error" in r:
            print(f"  {r['config']:58s} failed: {r['error']}")
        else:
            print(f"  {r['config']:58s} {r['median_s']:7.2f} s/image  x{r['vs_default']:.2f}  "
                  f"(torch threads {r['torch_threads']})")
    if a.json:
        from ..fileio import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
