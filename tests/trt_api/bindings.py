"""NVIDIA's real TensorRT Python bindings without TensorRT: the `tensorrt-cu12-bindings` wheels (the pybind11
extension alone, ~1.1 MiB each) downloaded once into a git-ignored cache, unpacked, and imported in a subprocess
against stub libnvinfer / libnvinfer_plugin / libnvonnxparser libraries that only define the C entry points the
extension links to (nothing of TensorRT ever runs). Used by tests/test_trt_real_api.py.

Cache: $CHEERS_TRT_BINDINGS_CACHE, else tests/.cache/trt-bindings (git-ignored). `pip download` runs only when the
wheel for a version is not cached. When the package index cannot be reached (a clean offline clone), the guard
reads the committed snapshot of the same description, tests/data/trt_api/<version>.json, written from the real
bindings by `python tests/trt_api/bindings.py --write-snapshots`; when the index is reachable, the tests also
check that the snapshot still equals the live bindings.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from cheers_deploy.trt import compat

HERE = Path(__file__).resolve().parent
#: the bindings the guard checks: JetPack 6.2's TensorRT (10.3), JetPack 7 / x86 10.x (10.13), and 11.x
VERSIONS = ("10.3.0", "10.13.3.9", "11.4.0.106")
PACKAGE = "tensorrt-cu12-bindings"

#: C entry points of the TensorRT libraries the extension links to (its undefined symbols), by library
STUB_SYMBOLS = {
    "libnvinfer": {"createInferBuilder_INTERNAL": "void* {}(void* a, int b)",
                   "createInferRuntime_INTERNAL": "void* {}(void* a, int b)",
                   "createInferRefitter_INTERNAL": "void* {}(void* a, void* b, int c)",
                   "getPluginRegistry": "void* {}(void)",
                   "getBuilderPluginRegistry": "void* {}(int a)"},
    "libnvinfer_plugin": {"initLibNvInferPlugins": "int {}(void* a, const char* b)"},
    "libnvonnxparser": {"createNvOnnxParser_INTERNAL": "void* {}(void* a, void* b, int c)",
                        "createNvOnnxParserRefitter_INTERNAL": "void* {}(void* a, void* b, int c)",
                        "getNvOnnxParserVersion": "int {}(void)"},
}
STUB_BODIES = {"void*": "return 0;", "int": "return 0;"}


SNAPSHOTS = HERE.parent / "data" / "trt_api"


class Unavailable(Exception):
    """The bindings cannot be had here (index unreachable, no wheel for this Python, no C compiler): skip."""


def cache_dir() -> Path:
    d = Path(os.environ.get("CHEERS_TRT_BINDINGS_CACHE") or HERE.parent / ".cache" / "trt-bindings")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wheel(version: str, where: Path):
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for w in sorted(where.glob(f"tensorrt_cu12_bindings-{version}-{tag}-*.whl")):
        return w
    return None


def fetch(version: str) -> Path:
    """The unpacked wheel of `version` for this Python (the folder holding `tensorrt_bindings/`)."""
    root = cache_dir()
    wheel = _wheel(version, root / "wheels")
    if wheel is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "--timeout", "20", "--retries", "1", "-q", "-d",
                               str(root / "wheels"),
                               f"{PACKAGE}=={version}"], capture_output=True, text=True, timeout=600)
        wheel = _wheel(version, root / "wheels")
        if proc.returncode != 0 or wheel is None:
            last = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
            raise Unavailable(f"`pip download {PACKAGE}=={version}` for Python {sys.version_info[0]}."
                              f"{sys.version_info[1]} failed (package index unreachable, or no such wheel): "
                              f"{last[-1] if last else proc.returncode}")
    out = root / "unpacked" / wheel.stem
    if not (out / "tensorrt_bindings" / "__init__.py").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def extension(pkg: Path) -> Path:
    return next((pkg / "tensorrt_bindings").glob("tensorrt*.so"))


def stubs(pkg: Path) -> Path:
    """Stub libraries named after the extension's DT_NEEDED TensorRT libraries (libnvinfer.so.10, ...), each
    defining its entry points (returning 0/NULL); built with `cc` once per TensorRT major."""
    info = compat.read_elf_dynamic(extension(pkg))
    needed = sorted(n for n in info.needed if re.match(r"libnv(infer|onnxparser)", n))
    majors = {n.rsplit(".so.", 1)[1] for n in needed}
    out = cache_dir() / "stubs" / "-".join(sorted(majors))
    if all((out / n).is_file() for n in needed):
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc) to build the stub TensorRT libraries")
    out.mkdir(parents=True, exist_ok=True)
    for soname in needed:
        base = soname.split(".so.", 1)[0]
        if base not in STUB_SYMBOLS:
            raise AssertionError(f"the bindings need {soname}, which tests/trt_api/bindings.py has no stub for")
        src = out / f"{base}.c"
        src.write_text("".join(sig.format(sym) + " { " + STUB_BODIES[sig.split()[0]] + " }\n"
                               for sym, sig in STUB_SYMBOLS[base].items()))
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(out / soname), str(src), f"-Wl,-soname,{soname}"],
                       check=True, capture_output=True, timeout=120)
    return out


def describe(version: str, owners) -> dict:
    """dump.py's JSON for `owners`, from the real bindings of `version` (+ "dir", "extension", "needed")."""
    pkg = fetch(version)
    lib = stubs(pkg)
    env = dict(os.environ, PYTHONPATH=str(pkg), LD_LIBRARY_PATH=str(lib))
    proc = subprocess.run([sys.executable, str(HERE / "dump.py"), *owners], capture_output=True, text=True, env=env,
                          timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"importing {PACKAGE} {version} against the stubs failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout)
    out.update(dir=str(pkg), extension=str(extension(pkg)), facts=binary_facts(extension(pkg)), source="live")
    return out


#: strings of the extension the code relies on (trt_backend.py catches RuntimeError around profile selection)
BINARY_STRINGS = ("Error in set optimization profile async.",)


def binary_facts(ext: Path) -> dict:
    """What the tests need from the extension binary itself: its TensorRT DT_NEEDED libraries, which of the stub
    entry points it imports, and which of BINARY_STRINGS it contains."""
    info = compat.read_elf_dynamic(ext)
    wanted = {sym for syms in STUB_SYMBOLS.values() for sym in syms}
    blob = ext.read_bytes()
    return {"needed": sorted(n for n in info.needed if n.startswith("libnv")),
            "imports": sorted(wanted & set(info.imports)),
            "strings": sorted(t for t in BINARY_STRINGS if t.encode() in blob)}


def snapshot_path(version: str) -> Path:
    return SNAPSHOTS / f"{version}.json"


def load_snapshot(version: str, owners) -> dict:
    """The committed description of `version` (the same shape as describe(), source "snapshot")."""
    path = snapshot_path(version)
    if not path.is_file():
        raise AssertionError(f"no snapshot {path}: run `python tests/trt_api/bindings.py --write-snapshots` where "
                             f"the package index is reachable")
    d = json.loads(path.read_text())
    missing = sorted(set(owners) - set(d["owners"]))
    if missing:
        raise AssertionError(f"{path.name} lacks {missing} (the code now uses them): run `python "
                             f"tests/trt_api/bindings.py --write-snapshots` where the package index is reachable")
    return dict(d, source="snapshot")


def describe_or_snapshot(version: str, owners) -> dict:
    """The live description when the bindings can be had here, else the committed snapshot."""
    try:
        return describe(version, owners)
    except Unavailable as exc:
        return dict(load_snapshot(version, owners), unavailable=str(exc))


def write_snapshots(owners) -> None:
    SNAPSHOTS.mkdir(parents=True, exist_ok=True)
    for v in VERSIONS:
        d = describe(v, owners)
        keep = {k: d[k] for k in ("version", "owners", "facts")}
        snapshot_path(v).write_text(json.dumps(keep, indent=1, sort_keys=True) + "\n")
        print(f"wrote {snapshot_path(v)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-snapshots"]:
        sys.exit("usage: python tests/trt_api/bindings.py --write-snapshots")
    sys.path.insert(0, str(HERE.parent))
    from trt_api import usage

    write_snapshots(usage.owners_needed())
