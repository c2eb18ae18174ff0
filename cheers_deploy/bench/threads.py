"""How thread settings behave on a busy machine: time the bundled model's text-to-image on the torch and ONNX Runtime
backends in fresh processes (OpenMP reads its settings once, at start-up), with and without other programs keeping
the cores busy.

    python -m cheers_deploy.bench.threads [--load N] [--runs 3] [--json out.json]

Rows: the package default (physical cores, OpenMP threads sleep while they wait), OpenMP's own default (threads spin
for a while before they sleep: what torch does when nothing sets it), a short spin, spinning waits, and one thread. The load is N busy-looping processes
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
backend, threads, runs = sys.argv[1], (None if sys.argv[2] == "default" else int(sys.argv[2])), int(sys.argv[3])
if backend == "torch":
    pipe = Pipeline.from_pretrained(None, threads=threads, timings=False)
else:
    from cheers_deploy.hub import bundled_workdir
    pipe = Pipeline.from_workdir(bundled_workdir(), threads=threads, timings=False, spin=sys.argv[4] == "spin")
pipe.generate("a red circle on the left", seed=0)                   # warm-up
times = []
for i in range(runs):
    t0 = time.perf_counter(); pipe.generate("a red circle on the left", seed=i); times.append(time.perf_counter() - t0)
n = pipe.backend.threads
print(json.dumps({"times_s": times, "threads": n}))
"""

# (label, backend, threads, environment, extra argument)
CONFIGS = [("torch: package default (physical cores, passive wait)", "torch", "default", {}, ""),
           ("torch: OpenMP's own default (spin 300k iterations, then sleep)", "torch", "default",
            {"OMP_WAIT_POLICY": ""}, ""),
           ("torch: short spin (GOMP_SPINCOUNT=10000)", "torch", "default",
            {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"}, ""),
           ("torch: spinning wait (OMP_WAIT_POLICY=ACTIVE)", "torch", "default", {"OMP_WAIT_POLICY": "ACTIVE"}, ""),
           ("torch: 1 thread", "torch", "1", {}, ""),
           ("ort: package default (physical cores, no spinning)", "ort", "default", {}, "nospin"),
           ("ort: spinning threads (onnxruntime's own default)", "ort", "default", {}, "spin"),
           ("ort: 1 thread", "ort", "1", {}, "nospin")]


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
        for label, backend, threads, env, extra in CONFIGS:
            e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            e.update(env)            # "" = unset for OpenMP, but present, so the package does not set its default
            out = subprocess.run([sys.executable, "-c", CHILD, backend, threads, str(runs), extra], env=e,
                                 capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                rows.append({"config": label, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"config": label, "backend": backend, "threads": r["threads"],
                         "median_s": statistics.median(r["times_s"]), "times_s": r["times_s"]})
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
    for backend in ("torch", "ort"):
        base = next((r["median_s"] for r in rows if r.get("backend") == backend and "median_s" in r), None)
        for r in rows:
            if r.get("backend") == backend and "median_s" in r and base:
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
            print(f"  {r['config']:64s} failed: {r['error']}")
        else:
            print(f"  {r['config']:64s} {r['median_s']:7.3f} s/image  x{r['vs_default']:.2f} of the default  "
                  f"({r['threads']} threads)")
    if a.json:
        from ..fileio import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
