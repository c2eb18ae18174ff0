"""Harness of the adversarial tests (docs/security.md): run the CLI in-process on a case folder built by the test and
report the exit code, the messages, and every file the run opened, wrote, removed or loaded as native code outside
the places it may touch.

    res = run_cli(capsys, case_dir, ["generate", "--workdir", str(case_dir / "wd"), ...])
    res.assert_refused("graph path")       # exit 2, one line "error: ..." naming the cause, no traceback
    assert not res.outside                 # nothing read or written outside case_dir (and the package/interpreter)

The audit hook (sys.addaudithook) is installed once per process and records only while a run is active. Libraries
that open files in native code (onnxruntime sessions, safetensors) raise no audit event: their entry points are
wrapped for the run so that the path they are handed is recorded as a read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import cheers_deploy

_EVENTS = ("open", "os.remove", "os.unlink", "os.rename", "os.replace", "os.rmdir", "os.mkdir", "shutil.rmtree",
           "shutil.copyfile", "ctypes.dlopen", "os.symlink", "os.chmod")
_state = {"active": None}


def _hook(event, args):
    rec = _state["active"]
    if rec is None or event not in _EVENTS:
        return
    try:
        if event == "open":
            path, mode = args[0], args[1] if len(args) > 1 else "r"
            if isinstance(path, int):
                return
            write = isinstance(mode, str) and any(c in mode for c in "wax+")
            if isinstance(mode, int):                  # os.open flags
                write = bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            rec.append(("write" if write else "read", os.fsdecode(path)))
        elif event == "ctypes.dlopen":
            rec.append(("dlopen", str(args[0])))
        else:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)):
                    rec.append(("write", os.fsdecode(a)))
    except Exception:  # noqa: BLE001 - an audit hook must never break the program
        pass


_installed = False


def _install():
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def _allowed_read_roots() -> List[Path]:
    roots = {Path(cheers_deploy.__file__).resolve().parent, Path(sys.prefix).resolve(),
             Path(sys.base_prefix).resolve(), Path(sysconfig.get_paths()["stdlib"]).resolve()}
    for p in sys.path:
        if p and Path(p).is_dir() and ("site-packages" in p or "dist-packages" in p):
            roots.add(Path(p).resolve())
    return sorted(roots) + [Path("/proc"), Path("/sys"), Path("/dev"), Path("/etc"), Path("/usr"), Path("/lib"),
                            Path("/lib64"), Path("/tmp/matplotlib"), Path.home() / ".config" / "matplotlib",
                            Path.home() / ".cache"]


def _inside(path: str, roots: Sequence[Path]) -> bool:
    try:
        p = Path(path)
        p = (p if p.is_absolute() else Path.cwd() / p)
        p = Path(os.path.normpath(str(p)))
        rp = p.resolve() if p.exists() else p
    except (OSError, RuntimeError):
        return False
    return any(str(x) == str(r) or str(x).startswith(str(r) + os.sep) for r in roots for x in (p, rp))


@dataclass
class Result:
    rc: int
    out: str
    err: str
    events: List[Tuple[str, str]] = field(default_factory=list)
    case_dir: Optional[Path] = None

    @property
    def outside(self) -> List[Tuple[str, str]]:
        """Reads outside the case folder and the package/interpreter; writes outside the case folder; any native
        library loaded from the case folder."""
        case = [self.case_dir.resolve()] if self.case_dir else []
        read_ok = case + _allowed_read_roots()
        bad = []
        for kind, path in self.events:
            if kind == "read" and not _inside(path, read_ok):
                bad.append((kind, path))
            elif kind == "write" and not _inside(path, case):
                bad.append((kind, path))
            elif kind == "dlopen" and case and _inside(path, case):
                bad.append((kind, path))
        return bad

    def assert_refused(self, *needles: str, rc: int = 2) -> None:
        lines = [line for line in self.err.strip().splitlines() if line.strip()]
        msg = f"rc={self.rc}\nstderr:\n{self.err}\nstdout:\n{self.out}"
        assert self.rc == rc, msg
        assert "Traceback" not in self.err, msg
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, msg
        text = errors[0].lower()
        for n in needles:
            assert n.lower() in text, f"{n!r} not in the error line\n{msg}"
        assert not self.outside, f"touched outside the case folder: {self.outside}\n{msg}"


@contextlib.contextmanager
def _native_reads():
    """Record the paths handed to libraries that read files natively (test-only wrappers, removed afterwards)."""
    patches = []

    def wrap(owner, name, path_arg=0):
        orig = getattr(owner, name)

        def recorder(*a, **k):
            rec = _state["active"]
            path = a[path_arg] if len(a) > path_arg else k.get("path") or k.get("filename")
            if rec is not None and isinstance(path, (str, os.PathLike)):
                rec.append(("read", os.fspath(path)))
            return orig(*a, **k)
        patches.append((owner, name, orig))
        setattr(owner, name, recorder)

    try:
        import onnxruntime

        orig_init = onnxruntime.InferenceSession.__init__

        def session_init(self, path_or_bytes, *a, **k):
            rec = _state["active"]
            if rec is not None and isinstance(path_or_bytes, (str, os.PathLike)):
                rec.append(("read", os.fspath(path_or_bytes)))
            return orig_init(self, path_or_bytes, *a, **k)
        patches.append((onnxruntime.InferenceSession, "__init__", orig_init))
        onnxruntime.InferenceSession.__init__ = session_init
    except ImportError:  # pragma: no cover
        pass
    try:
        import safetensors
        import safetensors.numpy

        wrap(safetensors, "safe_open")
        wrap(safetensors.numpy, "load_file")
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        for owner, name, orig in reversed(patches):
            setattr(owner, name, orig)


def run_cli(capsys, case_dir, argv: Sequence[str]) -> Result:
    """cheers-deploy ARGV in this process, with the audit recorder on."""
    from cheers_deploy.cli import main

    _install()
    capsys.readouterr()
    events: list = []
    _state["active"] = events
    try:
        with _native_reads():
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:                   # argparse usage errors
                rc = int(exc.code or 0)
    finally:
        _state["active"] = None
    out, err = capsys.readouterr()
    return Result(rc, out, err, events, Path(case_dir))


def record(fn, *args, **kwargs):
    """Run fn with the recorder on; returns (result or exception, events)."""
    _install()
    events: list = []
    _state["active"] = events
    try:
        with _native_reads():
            try:
                res = fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the caller inspects it
                res = exc
    finally:
        _state["active"] = None
    return res, events
