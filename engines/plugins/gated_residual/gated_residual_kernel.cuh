// Cheers hi-gate fused op (docs/architecture.md §10): device code only.
//
//   g[r]   = dot(SiLU(h[r, :]), w2) + b2                      (one scalar per token row)
//   x[r,:] = low[r, :] + g[r] * high[r, :]
//   out    = LayerNorm(x) * ln_w + ln_b                        (eps attribute, 1e-5 in the checkpoint)
//
// h is the output of the gate's first Linear (model.hi_gate.gate.0, a GEMM that stays outside), w2/b2 the second
// Linear (model.hi_gate.gate.2, [1,C]/[1]), ln_w/ln_b model.hi_gate.layer_norm. All tensors have one dtype T in
// {float, __half, __nv_bfloat16}; every reduction and every intermediate is FP32.
//
// This header has no host code and includes nothing but cuda_fp16.h / cuda_bf16.h, so the SAME text compiles with
// nvcc (through gated_residual_kernel.cu, which adds the C launcher) and with NVRTC (CuPy RawModule(code=...)).
//
// Work decomposition: one warp per token row, kRowsPerBlock rows per 128-thread block. Lane l owns the vectors
// j = l, l+32, l+64, ... of the row; a vector is 16 bytes (float4 / 8 halves / 8 bf16) when C and every pointer
// allow it (rule at the end of this comment), else one element.
//
//  * gated_residual_warp_kernel<T, V, VPT>: the row (VPT vectors per lane) is loaded once into registers - h, low and
//    high are all issued before any arithmetic so the loads overlap - then: dot -> warp reduce -> g; x = low + g*high
//    kept in registers; mean (reduce); centred variance sum((x-mean)^2) (reduce, exact two-pass over registers, no
//    cancellation); normalise, affine, store. Every activation byte is read from DRAM exactly once.
//  * gated_residual_stream_kernel<T, V>: any C (rows too wide for the register cache): same maths, re-reading the
//    row from global memory (L1/L2-resident) in each phase instead of caching it.
//
// The launch-configuration rule (mirrored in Python by cheers_deploy.build.plugin_build.kernel_launch_config):
//   V   = 16 / sizeof(T) if C % that == 0 and all 7 array pointers are 16-byte aligned, else 1
//   vpt = ceil(C / V / 32), rounded UP to the next entry of {1,2,3,4,5,6,8,9} (V > 1) or {1,2,4,8,16} (V == 1);
//         a wider row -> stream kernel with the same V.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cheers_gr
{

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4; // warps (= rows) per block
constexpr int kThreadsPerBlock = kWarpSize * kRowsPerBlock;

// ---- scalar conversions (FP32 compute) ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float toF(T v);
template <>
__device__ __forceinline__ float toF<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ float toF<__half>(__half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float toF<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromF(float v);
template <>
__device__ __forceinline__ float fromF<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromF<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromF<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// ---- V-element vector; 16-byte instances compile to one 128-bit load/store ------------------------------------------
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec
{
    T v[V];
};

__device__ __forceinline__ float warpSum(float x)
{
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    {
        x += __shfl_xor_sync(0xffffffffu, x, offset);
    }
    return x;
}

// SiLU in FP32 with the accurate expf (the gate is one dot per row: its cost is invisible next to the row traffic).
// Large negative x: expf(-x) = inf -> x / inf = -0, the correct limit; large positive x: -> x.
__device__ __forceinline__ float siluF(float x)
{
    return x / (1.0f + expf(-x));
}

// ---- register-cached kernel ------------------------------------------------------------------------------------------
// Requirements (checked by the launcher): C % V == 0, C / V <= 32 * VPT, pointers aligned to sizeof(T) * V.
template <typename T, int V, int VPT>
__global__ void __launch_bounds__(kThreadsPerBlock) gated_residual_warp_kernel(T const* __restrict__ low,
    T const* __restrict__ high, T const* __restrict__ h, T const* __restrict__ w2, T const* __restrict__ b2,
    T const* __restrict__ lnW, T const* __restrict__ lnB, T* __restrict__ out, int rows, int C, float eps)
{
    using VecT = Vec<T, V>;
    int const lane = threadIdx.x % kWarpSize;
    long long const row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
    if (row >= rows)
    {
        return; // the whole warp leaves together: the shuffles below stay full-warp
    }
    int const nVec = C / V;
    long long const base = row * static_cast<long long>(C);
    VecT const* lowV = reinterpret_cast<VecT const*>(low + base);
    VecT const* highV = reinterpret_cast<VecT const*>(high + base);
    VecT const* hV = reinterpret_cast<VecT const*>(h + base);
    VecT const* w2V = reinterpret_cast<VecT const*>(w2);

    // 1) issue every load of the row before any arithmetic (memory-level parallelism)
    VecT hReg[VPT];
    VecT lowReg[VPT];
    VecT highReg[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i)
    {
        int const j = lane + i * kWarpSize;
        if (j < nVec)
        {
            hReg[i] = hV[j];
            lowReg[i] = lowV[j];
            highReg[i] = highV[j];
        }
    }

    // 2) gate: g = dot(SiLU(h), w2) + b2
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
    {
        int const j = lane + i * kWarpSize;
        if (j < nVec)
        {
            VecT const w = w2V[j];
#pragma unroll
            for (int k = 0; k < V; ++k)
            {
                dot += siluF(toF(hReg[i].v[k])) * toF(w.v[k]);
            }
        }
    }
    float const g = warpSum(dot) + toF(b2[0]);

    // 3) x = low + g * high, kept in registers; mean
    float x[VPT][V];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
    {
        int const j = lane + i * kWarpSize;
#pragma unroll
        for (int k = 0; k < V; ++k)
        {
            x[i][k] = (j < nVec) ? toF(lowReg[i].v[k]) + g * toF(highReg[i].v[k]) : 0.0f;
            sum += x[i][k];
        }
    }
    float const invC = 1.0f / static_cast<float>(C);
    float const mean = warpSum(sum) * invC;

    // 4) biased variance from centred values (two-pass over registers)
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
    {
        int const j = lane + i * kWarpSize;
        if (j < nVec)
        {
#pragma unroll
            for (int k = 0; k < V; ++k)
            {
                float const d = x[i][k] - mean;
                sq += d * d;
            }
        }
    }
    float const rstd = rsqrtf(warpSum(sq) * invC + eps);

    // 5) normalise + affine + store
    VecT const* wV = reinterpret_cast<VecT const*>(lnW);
    VecT const* bV = reinterpret_cast<VecT const*>(lnB);
    VecT* outV = reinterpret_cast<VecT*>(out + base);
#pragma unroll
    for (int i = 0; i < VPT; ++i)
    {
        int const j = lane + i * kWarpSize;
        if (j < nVec)
        {
            VecT const w = wV[j];
            VecT const b = bV[j];
            VecT o;
#pragma unroll
            for (int k = 0; k < V; ++k)
            {
                o.v[k] = fromF<T>((x[i][k] - mean) * rstd * toF(w.v[k]) + toF(b.v[k]));
            }
            outV[j] = o;
        }
    }
}

// ---- streaming kernel: any C ---------------------------------------------------------------------------------------
// Same maths as the warp kernel; each phase re-reads the row (DRAM once, then L1/L2). x is recomputed with the same
// FP32 expression in every phase, so all phases see bit-identical x.
template <typename T, int V>
__device__ __forceinline__ void gatedResidualStreamRow(T const* __restrict__ low, T const* __restrict__ high,
    T const* __restrict__ h, T const* __restrict__ w2, T const* __restrict__ b2, T const* __restrict__ lnW,
    T const* __restrict__ lnB, T* __restrict__ out, int rows, int C, float eps)
{
    using VecT = Vec<T, V>;
    int const lane = threadIdx.x % kWarpSize;
    long long const row = static_cast<long long>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
    if (row >= rows)
    {
        return;
    }
    int const nVec = C / V;
    long long const base = row * static_cast<long long>(C);
    VecT const* lowV = reinterpret_cast<VecT const*>(low + base);
    VecT const* highV = reinterpret_cast<VecT const*>(high + base);
    VecT const* hV = reinterpret_cast<VecT const*>(h + base);
    VecT const* w2V = reinterpret_cast<VecT const*>(w2);
    VecT const* wV = reinterpret_cast<VecT const*>(lnW);
    VecT const* bV = reinterpret_cast<VecT const*>(lnB);
    VecT* outV = reinterpret_cast<VecT*>(out + base);

    float dot = 0.0f;
    for (int j = lane; j < nVec; j += kWarpSize)
    {
        VecT const hv = hV[j];
        VecT const w = w2V[j];
#pragma unroll
        for (int k = 0; k < V; ++k)
        {
            dot += siluF(toF(hv.v[k])) * toF(w.v[k]);
        }
    }
    float const g = warpSum(dot) + toF(b2[0]);

    float sum = 0.0f;
    for (int j = lane; j < nVec; j += kWarpSize)
    {
        VecT const a = lowV[j];
        VecT const c = highV[j];
#pragma unroll
        for (int k = 0; k < V; ++k)
        {
            sum += toF(a.v[k]) + g * toF(c.v[k]);
        }
    }
    float const invC = 1.0f / static_cast<float>(C);
    float const mean = warpSum(sum) * invC;

    float sq = 0.0f;
    for (int j = lane; j < nVec; j += kWarpSize)
    {
        VecT const a = lowV[j];
        VecT const c = highV[j];
#pragma unroll
        for (int k = 0; k < V; ++k)
        {
            float const d = (toF(a.v[k]) + g * toF(c.v[k])) - mean;
            sq += d * d;
        }
    }
    float const rstd = rsqrtf(warpSum(sq) * invC + eps);

    for (int j = lane; j < nVec; j += kWarpSize)
    {
        VecT const a = lowV[j];
        VecT const c = highV[j];
        VecT const w = wV[j];
        VecT const b = bV[j];
        VecT o;
#pragma unroll
        for (int k = 0; k < V; ++k)
        {
            float const xv = toF(a.v[k]) + g * toF(c.v[k]);
            o.v[k] = fromF<T>((xv - mean) * rstd * toF(w.v[k]) + toF(b.v[k]));
        }
        outV[j] = o;
    }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreadsPerBlock) gated_residual_stream_kernel(T const* __restrict__ low,
    T const* __restrict__ high, T const* __restrict__ h, T const* __restrict__ w2, T const* __restrict__ b2,
    T const* __restrict__ lnW, T const* __restrict__ lnB, T* __restrict__ out, int rows, int C, float eps)
{
    gatedResidualStreamRow<T, V>(low, high, h, w2, b2, lnW, lnB, out, rows, C, eps);
}

} // namespace cheers_gr

// ---- extern "C" entries (stable names for CuPy RawModule / cuModuleGetFunction) -----------------------------------
// Scalar streaming kernels: correct for ANY C and any element alignment. Launch with
//   block = (128,), grid = (ceil(rows / 4),), args = (low, high, h, w2, b2, ln_w, ln_b, out, int32 rows, int32 C,
//   float32 eps).
// The fast register-cached variants are reached through their template names, e.g. with CuPy
//   RawModule(code=src, options=("-std=c++17",), name_expressions=["cheers_gr::gated_residual_warp_kernel<float,4,9>"])
// (the configuration is chosen as described at the top of this file).
#ifndef CHEERS_GR_NO_C_ENTRIES
#define CHEERS_GR_C_ENTRY(NAME, T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(cheers_gr::kThreadsPerBlock) NAME(T const* __restrict__ low,          \
        T const* __restrict__ high, T const* __restrict__ h, T const* __restrict__ w2, T const* __restrict__ b2,         \
        T const* __restrict__ lnW, T const* __restrict__ lnB, T* __restrict__ out, int rows, int C, float eps)          \
    {                                                                                                                  \
        cheers_gr::gatedResidualStreamRow<T, 1>(low, high, h, w2, b2, lnW, lnB, out, rows, C, eps);              \
    }
CHEERS_GR_C_ENTRY(gated_residual_f32, float)
CHEERS_GR_C_ENTRY(gated_residual_f16, __half)
CHEERS_GR_C_ENTRY(gated_residual_bf16, __nv_bfloat16)
#undef CHEERS_GR_C_ENTRY
#endif
