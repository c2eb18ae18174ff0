// The ONE place where TensorRT version differences are handled for the Cheers plugins.
//
// Supported: TensorRT 10.x (JetPack 6.2 ships 10.3, JetPack 7 ships 10.13+, x86 10.x) and 11.x.
//  * IPluginV3 / IPluginV3OneCore / OneBuild / OneRuntime / IPluginCreatorV3One, getCreators() and setLoggerFinder()
//    exist from 10.0 on with the signatures used here (compiled against NVIDIA's public headers at the v10.3.0,
//    v10.13.3 and v11.1 tags of github.com/NVIDIA/TensorRT with -Wall -Wextra -Wsuggest-override, docs/STATUS.md);
//    TensorRT < 10 has no IPluginV3 -> hard error below.
//  * DataType::kBF16 exists from 9.0; Dims::d is int64_t from 10.0 (we only use it through int64_t arithmetic).
//  * TensorRT 11 deprecates the V2 plugin interfaces and removes the IPluginRegistry overloads taking IPluginCreator;
//    nothing here uses either: REGISTER_TENSORRT_PLUGIN with a V3 creator resolves to the
//    registerCreator(IPluginCreatorInterface&, ...) overload that both 10 and 11 have.
//  * Entry points: getCreators() and setLoggerFinder() only, as NVIDIA's V3 plugin libraries (plugin/exports/
//    nvinfer_vc_plugin.map at v11.1, plugin/exports-vfc_plugin.map at v10.3.0). getPluginCreators() is not exported:
//    it is the deprecated name whose callers expect IPluginCreator (V2) pointers, and every creator here is V3.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>

#if !defined(NV_TENSORRT_MAJOR)
#error "NvInferVersion.h did not define NV_TENSORRT_MAJOR: not a TensorRT include directory"
#endif
#if NV_TENSORRT_MAJOR < 10
#error "CheersGatedResidual is an IPluginV3 plugin and needs TensorRT >= 10.0 (JetPack >= 6.1)"
#endif

#define CHEERS_TRT_VERSION_CODE (NV_TENSORRT_MAJOR * 10000 + NV_TENSORRT_MINOR * 100 + NV_TENSORRT_PATCH)

// Symbol visibility of the plugin-library entry points (the library is built with -fvisibility=hidden).
#if defined(_WIN32)
#define CHEERS_PLUGIN_EXPORT __declspec(dllexport)
#else
#define CHEERS_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

namespace cheers
{
namespace trt_compat
{

using nvinfer1::DataType;

//! Element type supported by the fused kernels.
inline bool isFloatType(DataType t) noexcept
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

//! dtype code of gated_residual_forward (0 f32, 1 f16, 2 bf16), -1 otherwise.
inline int kernelDtype(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: return 0;
    case DataType::kHALF: return 1;
    case DataType::kBF16: return 2;
    default: return -1;
    }
}

//! Number of elements; -1 if any extent is unknown (-1) or the rank is invalid.
inline int64_t volume(nvinfer1::Dims const& d) noexcept
{
    if (d.nbDims < 0 || d.nbDims > nvinfer1::Dims::MAX_DIMS)
    {
        return -1;
    }
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        if (d.d[i] < 0)
        {
            return -1;
        }
        v *= static_cast<int64_t>(d.d[i]);
    }
    return v;
}

//! Last extent (the channel dimension C); -1 if unknown or rank 0.
inline int64_t lastDim(nvinfer1::Dims const& d) noexcept
{
    return d.nbDims >= 1 ? static_cast<int64_t>(d.d[d.nbDims - 1]) : -1;
}

} // namespace trt_compat
} // namespace cheers
