"""The fused hi gate's Triton kernel (model/fused_gate.py) computes HiGate's maths, checked without a GPU: Triton's
interpreter (TRITON_INTERPRET=1) runs the same @triton.jit source on CPU tensors with numpy.

What this proves: the kernel's indexing (rows, the batch-broadcast `high` with stride 0, a channel count that is not
a power of two, masked tails), the SiLU/dot/LayerNorm maths and the output dtype. What it does not: the PTX Triton
compiles for a real GPU (tests/test_torch_fast_path.py, marked gpu, and bench/run_gpu_checks.sh do that).

Triton is not a dependency of the package or of the test venv (torch's inductor would change behaviour with it
importable), so the first run installs the pinned wheel with `pip --no-deps --target` into a cache folder
(~/.cache/cheers-deploy/triton-lang-<version>, once) and the checks run in a subprocess with it on PYTHONPATH.
"""

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")

TRITON = "triton==3.9.0"          # a CPython 3.10-3.14 manylinux x86_64/aarch64 wheel; the interpreter needs no GPU
ROOT = Path(__file__).resolve().parents[1]

CHECK = r'''
import sys, torch
from cheers_deploy.model.heads import HiGate
from cheers_deploy.model import fused_gate

assert fused_gate.triton_available()
import triton
assert triton.__file__.startswith(sys.argv[1]), triton.__file__
torch.manual_seed(0)
worst = {}
with torch.no_grad():
    # (C, B, N, batch of high): the tiny preset's 64, a non-power-of-two, the official Dv=1152 (BLOCK 2048, 8 warps)
    for c, b, n, hb in [(64, 2, 16, 1), (96, 2, 8, 2), (48, 1, 5, 1), (1152, 2, 12, 1), (1152, 1, 7, 1)]:
        g = HiGate(c).eval()
        for p in g.parameters():
            p.normal_(0, 0.5)
        low, high = torch.randn(b, n, c), torch.randn(hb, n, c)
        cases = [("fp32", g, low, high)]
        if hb == 1 and b > 1:
            cases.append(("expand", g, low, high.expand(b, n, c)))          # stride-0 batch, as repeat_batch gives
        for tag, gg, lo, hi in cases:
            out = fused_gate.fused_gate_forward(gg, lo, hi)
            ref = gg.plain(lo, hi)
            assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype)
            worst[tag] = max(worst.get(tag, 0.0), float((out - ref).abs().max()))
        gb = HiGate(c).eval()
        gb.load_state_dict(g.state_dict())
        gb = gb.to(torch.bfloat16)
        lb, hb16 = low.bfloat16(), high.bfloat16()
        out = fused_gate.fused_gate_forward(gb, lb, hb16)
        assert out.dtype == torch.bfloat16
        ref32 = g.plain(lb.float(), hb16.float())          # the same bf16 inputs, fp32 maths
        plain_err = float((gb.plain(lb, hb16).float() - ref32).abs().max())
        fused_err = float((out.float() - ref32).abs().max())
        assert fused_err <= 2 * plain_err + 1e-2, (c, fused_err, plain_err)
        worst["bf16"] = max(worst.get("bf16", 0.0), fused_err)
print(worst)
assert worst["fp32"] < 1e-5 and worst["expand"] < 1e-5, worst
'''


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cheers-deploy" / f"triton-lang-{TRITON.split('==')[1]}"


@pytest.fixture(scope="module")
def triton_path():
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"{TRITON} has wheels for Linux x86_64/aarch64 only (this is {sys.platform} {platform.machine()})")
    home = _cache_root()
    if (home / "triton" / "__init__.py").is_file():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.", dir=str(home.parent)))
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               "--no-deps", "--target", str(tmp), TRITON], capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")][-2:]
            pytest.skip(f"could not install {TRITON} (needs the package index once): {' | '.join(tail)}")
        try:
            os.replace(tmp, home)            # another process may have finished first: keep its copy
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert (home / "triton" / "__init__.py").is_file()
    return home


def test_triton_kernel_equals_the_plain_gate_in_the_interpreter(triton_path):
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(triton_path)]))
    proc = subprocess.run([sys.executable, "-c", CHECK, str(triton_path)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "'bf16'" in proc.stdout

