"""A real `tritonserver` on this machine, for the tests and the load test (docs/deploy-triton.md, "Verified here").

Where it comes from: the `nvidia-pytriton` wheel bundles a `tritonserver` binary (2.51) with the Python backend only.
It runs without a GPU. The wheel pins numpy<2 and the package uses numpy 2, so it is never installed into this
environment: `pip install --no-deps --target CACHE/pytriton-<version>` unpacks it into a cache folder and only its
binary and Python backend are used.

    CACHE = $CHEERS_TRITON_CACHE, else $XDG_CACHE_HOME/cheers-deploy/triton, else ~/.cache/cheers-deploy/triton
    CACHE/pytriton-0.7.0/pytriton/tritonserver/{bin/tritonserver, backends/python/...}
    CACHE/stub-py3.11-<hash>/          a venv for the backend's stub: numpy<2 only, then this environment (a .pth)

Two things the stub needs, found by measurement:
- the stub process links libpython3.X.so and finds it on the system library path; when this interpreter is not the
  system one (pyenv, conda), LD_LIBRARY_PATH must name this interpreter's own lib folder, or the model fails to load
  (an `_thread.RLock ... _recursion_count` error, the system libpython meeting another Python's standard library);
- the stub's compiled tensor conversion (pybind11 numpy support for the 1.x ABI) reads wrong values under numpy 2
  (every element read as the first one), and the stub's embedded interpreter ignores PYTHONPATH. It does find a venv
  through PATH (the `python3` it looks up has a pyvenv.cfg beside it), so the server runs with PATH starting at a
  small venv that holds numpy<2 and reaches this environment's packages through a .pth file placed after it.

    python -m cheers_deploy.triton.local install        # prints the paths; what the tests' session fixture does
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import CheersError, MissingDependencyError

PYTRITON = "nvidia-pytriton==0.7.0"            # tritonserver 2.51.0, Python backend only, manylinux_2_35 x86_64
PYTRITON_DIR = "pytriton-0.7.0"
STUB_NUMPY = "numpy<2"                         # the stub's tensor conversion needs the numpy 1.x ABI
# the client: installed into this environment with --no-deps, because its extras pin protobuf<7 and ml-dtypes<=0.5.4
# and this environment has newer ones (the gRPC stubs generated for protobuf 6.33 run on the protobuf 7 runtime)
CLIENT = "tritonclient==2.73.0"
CLIENT_DEPS = ("python-rapidjson>=0.9.1", "geventhttpclient>=2.3.3", "greenlet<3.4", "grpcio>=1.81.1")
GUARDED = ("numpy", "protobuf", "ml_dtypes", "onnx", "onnxruntime")     # must not change when the client goes in


class TritonUnavailable(CheersError):
    """tritonserver cannot be installed or run here (no index, no shared libpython, another platform)."""


def cache_root() -> Path:
    env = os.environ.get("CHEERS_TRITON_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cheers-deploy" / "triton"


def _pip(args: Sequence[str], what: str, timeout: float = 900) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TritonUnavailable(f"{what}: pip did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()
                and not ln.startswith("WARNING: Location")][-3:]
        raise TritonUnavailable(f"{what}: pip failed ({' | '.join(tail) or 'no output'}); it needs the package index "
                                f"once, then the cache ({cache_root()}) is used")


def _versions(names: Sequence[str]) -> Dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def ensure_client() -> str:
    """tritonclient (http + grpc) importable in this environment; installed with --no-deps plus the few packages it
    needs when missing, and checked not to have changed numpy, protobuf, ml_dtypes, onnx or onnxruntime. Returns
    its version."""
    import importlib

    def load():
        for m in ("tritonclient.grpc", "tritonclient.http"):
            importlib.import_module(m)

    try:
        load()
    except ImportError:
        before = _versions(GUARDED)
        _pip(list(CLIENT_DEPS), "installing tritonclient's dependencies")
        _pip(["--no-deps", CLIENT], "installing tritonclient")
        after = _versions(GUARDED)
        changed = {k: (before[k], after[k]) for k in GUARDED if before[k] != after[k]}
        if changed:
            raise TritonUnavailable(f"installing tritonclient changed {changed}; restore them")
        importlib.invalidate_caches()
        load()
    return _versions(["tritonclient"])["tritonclient"] or "?"


@dataclass
class TritonInstall:
    server: Path                 # the tritonserver binary
    backends: Path               # --backend-directory
    stub_env: Path               # the venv put first on PATH (numpy<2, then this environment)
    libdir: Path                 # this interpreter's libpython folder (LD_LIBRARY_PATH)

    def env(self, base: Optional[dict] = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.stub_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(self.libdir) + (os.pathsep + old if old else "")
        for k in ("PYTHONPATH", "PYTHONHOME"):     # ignored by the stub's interpreter; never half-honoured
            env.pop(k, None)
        return env


def python_libdir() -> Path:
    """The folder holding this interpreter's libpython3.X.so (the stub links it)."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise TritonUnavailable(f"this Python ({sys.executable}) has no shared libpython (built without "
                                f"--enable-shared): the Python backend's stub cannot run on it")
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    name = sysconfig.get_config_var("LDLIBRARY") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so"
    if not (libdir / name).exists():
        raise TritonUnavailable(f"{libdir / name} does not exist: cannot give the stub this Python's libpython")
    return libdir


def _platform_ok() -> None:
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise TritonUnavailable(f"the {PYTRITON} wheel is for Linux x86_64 (this is {sys.platform} "
                                f"{platform.machine()}); use NVIDIA's Triton container")


def _install_server(root: Path) -> Path:
    home = root / PYTRITON_DIR
    binary = home / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if binary.is_file():
        return home
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PYTRITON_DIR}.", dir=str(root)))
    try:
        _pip(["--no-deps", "--target", str(tmp), PYTRITON], f"installing {PYTRITON}")
        with contextlib.suppress(OSError):
            os.replace(tmp, home)                  # another process may have finished first: keep its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not binary.is_file():
        raise TritonUnavailable(f"{binary} missing after installing {PYTRITON}")
    return home


def _install_stub(home: Path) -> Path:
    """Copy the stub for this Python version into backends/python (what pytriton itself does at start)."""
    tserver = home / "pytriton" / "tritonserver"
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    src = tserver / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not src.is_file():
        raise TritonUnavailable(f"{PYTRITON} has no Python backend stub for Python {ver}")
    dst = tserver / "backends" / "python" / "triton_python_backend_stub"
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copy2(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    return tserver / "backends"


def _this_environment() -> List[str]:
    """Where this environment's packages are, for the stub venv's .pth: the package's own root first (an editable
    checkout is found through a finder the stub would not run), then the site-packages folders."""
    paths = [str(Path(__file__).resolve().parents[2])]          # the folder holding cheers_deploy/
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths()[key]
        if p not in paths:
            paths.append(p)
    return paths


def install_stub_env(root: Path, numpy: Optional[str] = STUB_NUMPY) -> Path:
    """The stub venv (see the module docstring). numpy None: no numpy of its own, so the stub gets this
    environment's (the tests use that to check that a numpy-2 stub is refused with a clear message)."""
    paths = _this_environment()
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    key = hashlib.sha256("\n".join([sys.prefix, sys.base_prefix, str(numpy)] + paths).encode()).hexdigest()[:10]
    env = root / f"stub-py{ver}-{key}"
    site = env / "lib" / f"python{ver}" / "site-packages"
    pth = site / "zz-cheers-deploy-environment.pth"
    if pth.is_file() and (env / "bin" / "python3").exists():
        return env
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=str(root)))
    try:
        # the venv's own paths are absolute: build it at its final name, staged through a rename of the folder
        stage = tmp / "env"
        base = getattr(sys, "_base_executable", None) or sys.executable
        proc = subprocess.run([base, "-m", "venv", "--without-pip", str(stage)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise TritonUnavailable(f"cannot create the stub venv: {proc.stderr.strip()[-200:]}")
        if env.exists():
            shutil.rmtree(env)
        os.replace(stage, env)
        if numpy:
            _pip(["--no-deps", "--target", str(site), numpy], f"installing {numpy} for the stub")
        pth_tmp = site / f".{pth.name}.tmp"
        pth_tmp.write_text("".join(p + "\n" for p in paths))
        os.replace(pth_tmp, pth)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env


def install(root: Optional[Path] = None) -> TritonInstall:
    """tritonserver and the stub venv in the cache (installed on first use, then reused). Raises TritonUnavailable
    with the reason when that cannot work here."""
    _platform_ok()
    libdir = python_libdir()
    root = Path(root) if root is not None else cache_root()
    home = _install_server(root)
    backends = _install_stub(home)
    env = install_stub_env(root)
    return TritonInstall(home / "pytriton" / "tritonserver" / "bin" / "tritonserver", backends, env, libdir)


# ------------------------------------------------------------------------------------------------ running it
def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _get(port: int, path: str, timeout: float = 5.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class LocalTriton:
    """`tritonserver` on 127.0.0.1 free ports in its own process group (the stubs are its children), log to a
    file. start() waits for /v2/health/ready; stop() sends SIGTERM, waits, then SIGKILLs the whole group, and
    checks that nothing of the group is left."""

    def __init__(self, repository, install_: TritonInstall, log_path, extra_args: Sequence[str] = (),
                 exit_timeout_s: int = 10):
        self.repository = Path(repository)
        self.install = install_
        self.log_path = Path(log_path)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.extra_args = list(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.ready_s: Optional[float] = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> List[str]:
        return [str(self.install.server), f"--model-repository={self.repository}",
                f"--backend-directory={self.install.backends}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--disable-auto-complete-config", f"--exit-timeout-secs={self.exit_timeout_s}",
                *self.extra_args]

    def log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def start(self, timeout: float = 180.0) -> "LocalTriton":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:         # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.install.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CheersError(f"tritonserver exited with code {self.proc.returncode} before it was ready:\n"
                                  f"{self.log_tail()}")
            try:
                status, _ = _get(self.http_port, "/v2/health/ready", timeout=2.0)
                if status == 200:
                    self.ready_s = time.perf_counter() - t0
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise CheersError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        status, body = _get(self.metrics_port, "/metrics")
        if status != 200:
            raise CheersError(f"/metrics answered {status}")
        return body.decode("utf-8", "replace")

    def group_pids(self) -> List[int]:
        """Processes still in the server's process group (the server and its stubs); zombies do not count."""
        if self.proc is None:
            return []
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            state, pgid = fields[0], int(fields[2])
            if pgid == self.proc.pid and state != "Z":
                out.append(int(d.name))
        return out

    def stub_cpu_seconds(self, model: str) -> Dict[int, float]:
        """{pid: CPU seconds used} of the model's stub processes (one per model instance): shows which instances
        did work."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.group_pids():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if len(cmd) > 1 and cmd[0].endswith(b"triton_python_backend_stub") and \
                    Path(os.fsdecode(cmd[1])).parent.parent.name == model:
                out[pid] = (int(fields[11]) + int(fields[12])) / tick      # utime + stime
        return out

    def stop(self, timeout: float = 30.0) -> float:
        """Stop the server (SIGTERM: it drains and unloads, then exits), SIGKILL the group after `timeout`.
        Returns the seconds it took."""
        if self.proc is None:
            return 0.0
        t0 = time.perf_counter()
        pgid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # the stubs are children of the server: kill whatever of the group is left, then reap the server
        deadline = time.monotonic() + 10
        while self.group_pids() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return time.perf_counter() - t0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def parse_metrics(text: str) -> Dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


def model_metric(metrics: Dict[str, float], name: str, model: str) -> float:
    """Sum of a Triton metric (nv_inference_request_success, nv_inference_count, ...) over one model's series."""
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") and f'model="{model}"' in k)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cheers_deploy.triton.local",
                                description="Install tritonserver (from the nvidia-pytriton wheel) and tritonclient "
                                            "for the tests and the load test.")
    p.add_argument("action", choices=["install"])
    p.parse_args(argv)
    try:
        inst = install()
        client = ensure_client()
    except (TritonUnavailable, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tritonserver: {inst.server}\nbackends: {inst.backends}\nstub venv: {inst.stub_env}\n"
          f"LD_LIBRARY_PATH: {inst.libdir}\ntritonclient {client}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
