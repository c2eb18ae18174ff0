"""The hi gate (heads.HiGate) as one Triton kernel after the gate's first Linear: HiGate(d, fused=True) or
CheersModel.set_options(fused_gate=True). Triton is imported on first use only (this module imports without it).

Same maths as the TensorRT plugin build/plugin_build.py (FP32 inside), one program per token row:

    g[r]   = dot(SiLU(h[r]), w2) + b2      h = output of the gate's first Linear (a GEMM left to cuBLAS)
    x[r]   = low[r] + g[r] * high[r]
    out[r] = LayerNorm(x[r]) * ln_w + ln_b
"""

from typing import Optional

import torch

_KERNEL = None
_AVAILABLE: Optional[bool] = None


def triton_available() -> bool:
    """Whether Triton imports (checked once)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _AVAILABLE = True
        except Exception:  # noqa: BLE001 - ImportError, or a broken install failing on import
            _AVAILABLE = False
    return _AVAILABLE


def gate_kernel():
    """(the jitted kernel, the triton module); raises ImportError without Triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def gated_residual_kernel(low, high, h, w2, b2, lnw, lnb, out, n_per_batch, high_bstride, C, eps,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        msk = cols < C
        hv = tl.load(h + row * C + cols, mask=msk, other=0.0).to(tl.float32)
        w = tl.load(w2 + cols, mask=msk, other=0.0).to(tl.float32)
        g = tl.sum(hv * tl.sigmoid(hv) * w, axis=0) + tl.load(b2).to(tl.float32)
        lo = tl.load(low + row * C + cols, mask=msk, other=0.0).to(tl.float32)
        hrow = (row // n_per_batch) * high_bstride + (row % n_per_batch) * C   # high may be batch-broadcast
        hi = tl.load(high + hrow + cols, mask=msk, other=0.0).to(tl.float32)
        x = lo + g * hi
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(msk, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / C
        y = xc * (1.0 / tl.sqrt(var + eps))
        y = y * tl.load(lnw + cols, mask=msk, other=0.0).to(tl.float32) \
            + tl.load(lnb + cols, mask=msk, other=0.0).to(tl.float32)
        tl.store(out + row * C + cols, y.to(out.dtype.element_ty), mask=msk)

    _KERNEL = (gated_residual_kernel, triton)
    return _KERNEL


def fused_gate_forward(hi_gate, low, high):
    """HiGate's output with the Triton kernel (CUDA tensors); low (B,N,C), high (B or 1,N,C), batch stride may be
    0 (expand). No backward."""
    kernel, triton = gate_kernel()
    b, n, c = low.shape
    low = low.contiguous()
    hgate = hi_gate.gate[0](low).contiguous()                                   # (B,N,C) first Linear
    high = high.to(low.dtype)
    if high.stride(2) != 1 or high.stride(1) != c or (high.shape[0] != b and high.shape[0] != 1):
        high = high.expand(b, n, c).contiguous()
    hb = 0 if high.shape[0] == 1 else high.stride(0)
    out = torch.empty_like(low)
    ln, lin2 = hi_gate.layer_norm, hi_gate.gate[2]
    block = triton.next_power_of_2(c)
    kernel[(b * n,)](low, high, hgate, lin2.weight, lin2.bias, ln.weight, ln.bias, out, n, hb, c, float(ln.eps),
                     BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out
