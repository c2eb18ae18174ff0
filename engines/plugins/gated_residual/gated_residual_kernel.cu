// Host launcher of the fused hi-gate kernel: picks vector width / register-cache size and launches one of the
// instantiations of gated_residual_kernel.cuh. Built into libcheers_gated_residual_kernel.so (kernel-only library,
// no TensorRT) and into libcheers_plugins.so (with the TensorRT plugin).
#include "gated_residual.h"
#include "gated_residual_kernel.cuh"

#include <cmath>
#include <cstdint>

namespace cheers_gr
{
namespace
{

// Register-cache sizes that are instantiated; a row needing n vectors per lane uses the smallest entry >= n.
// 16-byte vectors stop at 9 per lane (fp32 C <= 1152, fp16/bf16 C <= 2304): beyond that the cached row no longer
// fits the register file without spilling (seen with ptxas -v on sm_90 for bf16 x 12/16) and the streaming kernel,
// which re-reads the row from L1/L2, is the better choice. Scalar rows (odd C or unaligned pointers: not the
// deployed shapes) get a coarser table, up to 16 per lane (C <= 512), to keep the number of instantiations small.
constexpr int kVptVector[] = {1, 2, 3, 4, 5, 6, 8, 9};
constexpr int kVptScalar[] = {1, 2, 4, 8, 16};

template <int N>
int roundUpVpt(int n, int const (&table)[N])
{
    for (int v : table)
    {
        if (n <= v)
        {
            return v;
        }
    }
    return 0; // too wide: streaming kernel
}

int elementSize(int dtype)
{
    switch (dtype)
    {
    case CHEERS_GR_FLOAT32: return 4;
    case CHEERS_GR_FLOAT16:
    case CHEERS_GR_BFLOAT16: return 2;
    default: return 0;
    }
}

bool aligned16(void const* p)
{
    return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

struct Args
{
    void const* low;
    void const* high;
    void const* h;
    void const* w2;
    void const* b2;
    void const* lnW;
    void const* lnB;
    void* out;
    int rows;
    int C;
    float eps;
};

template <typename T, int V, int VPT>
void launchWarp(Args const& a, dim3 grid, cudaStream_t stream)
{
    gated_residual_warp_kernel<T, V, VPT><<<grid, kThreadsPerBlock, 0, stream>>>(static_cast<T const*>(a.low),
        static_cast<T const*>(a.high), static_cast<T const*>(a.h), static_cast<T const*>(a.w2),
        static_cast<T const*>(a.b2), static_cast<T const*>(a.lnW), static_cast<T const*>(a.lnB),
        static_cast<T*>(a.out), a.rows, a.C, a.eps);
}

template <typename T, int V>
void launchStream(Args const& a, dim3 grid, cudaStream_t stream)
{
    gated_residual_stream_kernel<T, V><<<grid, kThreadsPerBlock, 0, stream>>>(static_cast<T const*>(a.low),
        static_cast<T const*>(a.high), static_cast<T const*>(a.h), static_cast<T const*>(a.w2),
        static_cast<T const*>(a.b2), static_cast<T const*>(a.lnW), static_cast<T const*>(a.lnB),
        static_cast<T*>(a.out), a.rows, a.C, a.eps);
}

template <typename T, int V>
void dispatchVpt(int vpt, Args const& a, dim3 grid, cudaStream_t stream)
{
    switch (vpt)
    {
    case 1: launchWarp<T, V, 1>(a, grid, stream); break;
    case 2: launchWarp<T, V, 2>(a, grid, stream); break;
    case 3: launchWarp<T, V, 3>(a, grid, stream); break;
    case 4: launchWarp<T, V, 4>(a, grid, stream); break;
    case 5: launchWarp<T, V, 5>(a, grid, stream); break;
    case 6: launchWarp<T, V, 6>(a, grid, stream); break;
    case 8: launchWarp<T, V, 8>(a, grid, stream); break;
    case 9: launchWarp<T, V, 9>(a, grid, stream); break;
    default: launchStream<T, V>(a, grid, stream); break;
    }
}

template <typename T>
void dispatchVptScalar(int vpt, Args const& a, dim3 grid, cudaStream_t stream)
{
    switch (vpt)
    {
    case 1: launchWarp<T, 1, 1>(a, grid, stream); break;
    case 2: launchWarp<T, 1, 2>(a, grid, stream); break;
    case 4: launchWarp<T, 1, 4>(a, grid, stream); break;
    case 8: launchWarp<T, 1, 8>(a, grid, stream); break;
    case 16: launchWarp<T, 1, 16>(a, grid, stream); break;
    default: launchStream<T, 1>(a, grid, stream); break;
    }
}

template <typename T>
int launchTyped(int vec, int vpt, Args const& a, cudaStream_t stream)
{
    constexpr int kVecMax = 16 / static_cast<int>(sizeof(T));
    dim3 const grid(static_cast<unsigned>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock));
    // Drop a stale error left in this thread's runtime by an earlier call (e.g. a failed CUDA-graph capture): the
    // call that caused it already returned it, and cudaGetLastError() below must report this launch only. A sticky
    // error (device fault) is not cleared by this and makes the launch itself fail.
    (void)cudaGetLastError();
    if (vec == kVecMax)
    {
        dispatchVpt<T, kVecMax>(vpt, a, grid, stream);
    }
    else
    {
        dispatchVptScalar<T>(vpt, a, grid, stream);
    }
    return static_cast<int>(cudaGetLastError());
}

} // namespace
} // namespace cheers_gr

extern "C" int gated_residual_launch_config(int dtype, int C, int aligned16, int* vec_width, int* vec_per_lane)
{
    int const es = cheers_gr::elementSize(dtype);
    if (es == 0)
    {
        return CHEERS_GR_ERR_DTYPE;
    }
    if (C < 1)
    {
        return CHEERS_GR_ERR_SHAPE;
    }
    int const vecMax = 16 / es;
    int const vec = (aligned16 && C % vecMax == 0) ? vecMax : 1;
    int const nVec = C / vec;
    int const perLane = (nVec + cheers_gr::kWarpSize - 1) / cheers_gr::kWarpSize;
    if (vec_width != nullptr)
    {
        *vec_width = vec;
    }
    if (vec_per_lane != nullptr)
    {
        *vec_per_lane = vec == 1 ? cheers_gr::roundUpVpt(perLane, cheers_gr::kVptScalar)
                                 : cheers_gr::roundUpVpt(perLane, cheers_gr::kVptVector);
    }
    return 0;
}

extern "C" int gated_residual_forward(int dtype, void const* low, void const* high, void const* h, void const* w2,
    void const* b2, void const* ln_w, void const* ln_b, void* out, int rows, int C, float eps, cudaStream_t stream)
{
    using namespace cheers_gr;
    if (elementSize(dtype) == 0)
    {
        return CHEERS_GR_ERR_DTYPE;
    }
    if (rows < 0 || C < 1)
    {
        return CHEERS_GR_ERR_SHAPE;
    }
    if (!std::isfinite(eps) || eps < 0.0f)
    {
        return CHEERS_GR_ERR_EPS;
    }
    if (rows == 0)
    {
        return 0;
    }
    if (!low || !high || !h || !w2 || !b2 || !ln_w || !ln_b || !out)
    {
        return CHEERS_GR_ERR_POINTER;
    }
    bool const allAligned = aligned16(low) && aligned16(high) && aligned16(h) && aligned16(w2) && aligned16(ln_w)
        && aligned16(ln_b) && aligned16(out);
    int vec = 1;
    int vpt = 0;
    int const rc = gated_residual_launch_config(dtype, C, allAligned ? 1 : 0, &vec, &vpt);
    if (rc != 0)
    {
        return rc;
    }
    Args const a{low, high, h, w2, b2, ln_w, ln_b, out, rows, C, eps};
    switch (dtype)
    {
    case CHEERS_GR_FLOAT32: return launchTyped<float>(vec, vpt, a, stream);
    case CHEERS_GR_FLOAT16: return launchTyped<__half>(vec, vpt, a, stream);
    default: return launchTyped<__nv_bfloat16>(vec, vpt, a, stream);
    }
}
