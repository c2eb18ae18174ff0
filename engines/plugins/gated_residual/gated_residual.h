// C interface of the fused hi-gate kernel (implemented in gated_residual_kernel.cu).
// Plain C so that the TensorRT plugin (host compiler), ctypes and any other runtime can call it without CUDA device
// headers.
#ifndef CHEERS_GATED_RESIDUAL_H
#define CHEERS_GATED_RESIDUAL_H

#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define CHEERS_GR_API __declspec(dllexport)
#else
#define CHEERS_GR_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of gated_residual_forward (all 8 arrays share the dtype)
enum CheersGatedResidualDtype
{
    CHEERS_GR_FLOAT32 = 0,
    CHEERS_GR_FLOAT16 = 1,
    CHEERS_GR_BFLOAT16 = 2
};

// Return codes besides cudaError_t values (> 0) and 0 = success
#define CHEERS_GR_ERR_DTYPE (-1)   // dtype not in {0, 1, 2}
#define CHEERS_GR_ERR_SHAPE (-2)   // rows < 0 or C < 1
#define CHEERS_GR_ERR_POINTER (-3) // a null pointer with rows > 0
#define CHEERS_GR_ERR_EPS (-4)     // eps not finite or < 0

// out[r, :] = LayerNorm(low[r, :] + g[r] * high[r, :]) * ln_w + ln_b, g[r] = dot(SiLU(h[r, :]), w2) + b2[0]
// low/high/h/out: [rows, C] row-major contiguous; w2, ln_w, ln_b: [C]; b2: [1]; FP32 accumulation.
// Asynchronous on `stream`; returns 0, a negative CHEERS_GR_ERR_* code (nothing launched) or the cudaError_t of the
// launch. rows == 0 launches nothing and returns 0.
CHEERS_GR_API int gated_residual_forward(int dtype, void const* low, void const* high, void const* h, void const* w2,
    void const* b2, void const* ln_w, void const* ln_b, void* out, int rows, int C, float eps, cudaStream_t stream);

// The configuration gated_residual_forward picks (host-only, no GPU needed): *vec_width = elements per vector load
// (16 / sizeof(T) or 1), *vec_per_lane = register-cached vectors per lane (0 = streaming kernel). `aligned16` tells
// whether all 7 array pointers are 16-byte aligned. Returns 0 or a CHEERS_GR_ERR_* code.
CHEERS_GR_API int gated_residual_launch_config(int dtype, int C, int aligned16, int* vec_width, int* vec_per_lane);

#ifdef __cplusplus
}
#endif

#endif // CHEERS_GATED_RESIDUAL_H
