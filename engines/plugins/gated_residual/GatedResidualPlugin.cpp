// TensorRT IPluginV3 wrapper of the fused hi-gate kernel (see GatedResidualPlugin.h) and the plugin-library entry
// points: getCreators / setLoggerFinder, the two that NVIDIA's own V3 plugin libraries export
// (IPluginRegistry::loadLibrary, Python trt.get_plugin_registry().load_library(), trtexec --dynamicPlugins, engines
// with setPluginsToSerialize) or, when
// compiled with CHEERS_PLUGIN_STATIC_REGISTRATION=1, REGISTER_TENSORRT_PLUGIN (registration at dlopen time: Polygraphy
// --plugins and anything else that only ctypes.CDLL()s the library, trtexec --staticPlugins). The two mechanisms are
// never compiled into the same library: TensorRT rejects a library whose creator is already registered
// ("Cannot register the library as plugin creator of ... exists already").
#include "GatedResidualPlugin.h"

#include "gated_residual.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

#ifndef CHEERS_PLUGIN_STATIC_REGISTRATION
#define CHEERS_PLUGIN_STATIC_REGISTRATION 0
#endif

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace cheers
{
namespace
{

// ---- logging through the logger of the engine / builder that loaded us ---------------------------------------------
class LoggerFinderHolder
{
public:
    void set(nvinfer1::ILoggerFinder* finder) noexcept
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (mFinder == nullptr && finder != nullptr)
        {
            mFinder = finder;
        }
    }

    void log(nvinfer1::ILogger::Severity severity, char const* msg) noexcept
    {
        nvinfer1::ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(mMutex);
            if (mFinder != nullptr)
            {
                logger = mFinder->findLogger();
            }
        }
        if (logger != nullptr)
        {
            logger->log(severity, msg);
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", msg);
        }
    }

private:
    std::mutex mMutex;
    nvinfer1::ILoggerFinder* mFinder{nullptr};
};

LoggerFinderHolder& loggerFinder() noexcept
{
    static LoggerFinderHolder holder;
    return holder;
}

void logError(std::string const& msg) noexcept
{
    try
    {
        std::string const full = std::string(kGatedResidualPluginName) + ": " + msg;
        loggerFinder().log(nvinfer1::ILogger::Severity::kERROR, full.c_str());
    }
    catch (...)
    {
    }
}

bool validEps(float eps) noexcept
{
    return std::isfinite(eps) && eps >= 0.0F;
}

std::string formatEps(float eps)
{
    char buf[64];
    std::snprintf(buf, sizeof(buf), "eps=%.9g", static_cast<double>(eps));
    return buf;
}

} // namespace

// ---- attribute parsing ------------------------------------------------------------------------------------------------
bool parseGatedResidualFields(PluginFieldCollection const* fc, float* eps) noexcept
{
    if (fc == nullptr || fc->nbFields <= 0)
    {
        return true; // all defaults
    }
    if (fc->fields == nullptr)
    {
        return false;
    }
    for (int32_t i = 0; i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr || std::strcmp(f.name, "eps") != 0)
        {
            continue; // unknown attributes (e.g. exporter metadata) are ignored
        }
        if (f.data == nullptr || f.length != 1)
        {
            return false;
        }
        float value = 0.0F;
        if (f.type == PluginFieldType::kFLOAT32)
        {
            std::memcpy(&value, f.data, sizeof(float));
        }
        else if (f.type == PluginFieldType::kFLOAT64)
        {
            double d = 0.0;
            std::memcpy(&d, f.data, sizeof(double));
            value = static_cast<float>(d);
        }
        else
        {
            return false;
        }
        if (!validEps(value))
        {
            return false;
        }
        *eps = value;
    }
    return true;
}

// ---- plugin -------------------------------------------------------------------------------------------------------------
GatedResidualPlugin::GatedResidualPlugin(float eps)
    : mEps(eps)
{
    initFields();
}

GatedResidualPlugin::GatedResidualPlugin(GatedResidualPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mEps(other.mEps)
{
    initFields(); // the field collection must point into *this*, not into `other`
}

void GatedResidualPlugin::initFields() noexcept
{
    try
    {
        mMetadata = formatEps(mEps);
    }
    catch (...)
    {
        mMetadata.clear();
    }
    mField = PluginField("eps", &mEps, PluginFieldType::kFLOAT32, 1);
    mFC.nbFields = 1;
    mFC.fields = &mField;
}

IPluginCapability* GatedResidualPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* GatedResidualPlugin::clone() noexcept
{
    return new (std::nothrow) GatedResidualPlugin(*this);
}

char const* GatedResidualPlugin::getPluginName() const noexcept
{
    return kGatedResidualPluginName;
}

char const* GatedResidualPlugin::getPluginVersion() const noexcept
{
    return kGatedResidualPluginVersion;
}

char const* GatedResidualPlugin::getPluginNamespace() const noexcept
{
    return kGatedResidualPluginNamespace;
}

int32_t GatedResidualPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    using trt_compat::lastDim;
    using trt_compat::volume;
    if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 7 inputs (low, high, h, w2, b2, ln_w, ln_b) and 1 output");
        return -1;
    }
    nvinfer1::Dims const& lowDims = in[kLOW].desc.dims;
    if (lowDims.nbDims < 1)
    {
        logError("low must have rank >= 1 ([..., C])");
        return -1;
    }
    // high and h: same rank as low and equal extents wherever both are known at build time
    for (int32_t idx : {static_cast<int32_t>(kHIGH), static_cast<int32_t>(kH)})
    {
        nvinfer1::Dims const& d = in[idx].desc.dims;
        if (d.nbDims != lowDims.nbDims)
        {
            logError("high and h must have the rank of low");
            return -1;
        }
        for (int32_t k = 0; k < d.nbDims; ++k)
        {
            if (d.d[k] >= 0 && lowDims.d[k] >= 0 && d.d[k] != lowDims.d[k])
            {
                logError("high and h must have the shape of low");
                return -1;
            }
        }
    }
    int64_t const C = lastDim(lowDims);
    if (C >= 0)
    {
        for (int32_t idx : {static_cast<int32_t>(kW2), static_cast<int32_t>(kLN_W), static_cast<int32_t>(kLN_B)})
        {
            int64_t const v = volume(in[idx].desc.dims);
            if (v >= 0 && v != C)
            {
                logError("w2, ln_w and ln_b must hold C elements (C = last dim of low)");
                return -1;
            }
        }
    }
    int64_t const b2Volume = volume(in[kB2].desc.dims);
    if (b2Volume >= 0 && b2Volume != 1)
    {
        logError("b2 must hold exactly one element");
        return -1;
    }
    return 0;
}

int32_t GatedResidualPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (outputTypes == nullptr || inputTypes == nullptr || nbOutputs != kNbOutputs || nbInputs != kNbInputs)
    {
        return -1;
    }
    // same dtype as low; supportsFormatCombination() makes every other tensor match it
    outputTypes[0] = inputTypes[kLOW];
    return 0;
}

int32_t GatedResidualPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    if (inputs[kLOW].nbDims < 1)
    {
        return -1;
    }
    outputs[0] = inputs[kLOW]; // out has the shape of low
    return 0;
}

bool GatedResidualPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0
        || pos >= nbInputs + nbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR || !trt_compat::isFloatType(desc.type))
    {
        return false;
    }
    // one dtype for all tensors: decide on pos 0, follow it everywhere else (only inOut[0..pos] may be inspected)
    return pos == 0 || desc.type == inOut[0].desc.type;
}

int32_t GatedResidualPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

size_t GatedResidualPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    return 0;
}

char const* GatedResidualPlugin::getTimingCacheID() noexcept
{
    // the creation state is just eps; I/O shapes and formats are added to the ID by TensorRT
    return mMetadata.empty() ? nullptr : mMetadata.c_str();
}

char const* GatedResidualPlugin::getMetadataString() noexcept
{
    return mMetadata.empty() ? nullptr : mMetadata.c_str();
}

int32_t GatedResidualPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    using trt_compat::volume;
    if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    int64_t const n = volume(in[kLOW].dims);
    int64_t const C = trt_compat::lastDim(in[kLOW].dims);
    if (n < 0 || C < 1 || volume(in[kHIGH].dims) != n || volume(in[kH].dims) != n || volume(out[0].dims) != n
        || volume(in[kW2].dims) != C || volume(in[kLN_W].dims) != C || volume(in[kLN_B].dims) != C
        || volume(in[kB2].dims) != 1)
    {
        logError("inconsistent runtime shapes");
        return -1;
    }
    if (n / C > INT32_MAX || C > INT32_MAX)
    {
        logError("more than 2^31-1 rows or channels");
        return -1;
    }
    return 0;
}

int32_t GatedResidualPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    if (inputDesc == nullptr || inputs == nullptr || outputs == nullptr)
    {
        return -1;
    }
    int const dtype = trt_compat::kernelDtype(inputDesc[kLOW].type);
    int64_t const n = trt_compat::volume(inputDesc[kLOW].dims);
    int64_t const C = trt_compat::lastDim(inputDesc[kLOW].dims);
    if (dtype < 0 || n < 0 || C < 1 || n / C > INT32_MAX || C > INT32_MAX)
    {
        logError("enqueue: unsupported dtype or shape");
        return -1;
    }
    int const rc = gated_residual_forward(dtype, inputs[kLOW], inputs[kHIGH], inputs[kH], inputs[kW2], inputs[kB2],
        inputs[kLN_W], inputs[kLN_B], outputs[0], static_cast<int>(n / C), static_cast<int>(C), mEps, stream);
    if (rc != 0)
    {
        logError("gated_residual_forward failed with code " + std::to_string(rc)
            + (rc > 0 ? std::string(" (") + cudaGetErrorString(static_cast<cudaError_t>(rc)) + ")" : std::string()));
        return -1;
    }
    return 0;
}

IPluginV3* GatedResidualPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* GatedResidualPlugin::getFieldsToSerialize() noexcept
{
    return &mFC;
}

// ---- creator ------------------------------------------------------------------------------------------------------------
GatedResidualPluginCreator::GatedResidualPluginCreator()
{
    mFieldSpec = PluginField("eps", nullptr, PluginFieldType::kFLOAT32, 1);
    mFC.nbFields = 1;
    mFC.fields = &mFieldSpec;
}

IPluginV3* GatedResidualPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    // kBUILD: fc holds the ONNX node attributes / user fields; kRUNTIME: fc is what getFieldsToSerialize() returned.
    float eps = kGatedResidualDefaultEps;
    if (!parseGatedResidualFields(fc, &eps))
    {
        logError("attribute 'eps' must be one finite float32/float64 >= 0");
        return nullptr;
    }
    return new (std::nothrow) GatedResidualPlugin(eps);
}

PluginFieldCollection const* GatedResidualPluginCreator::getFieldNames() noexcept
{
    return &mFC;
}

char const* GatedResidualPluginCreator::getPluginName() const noexcept
{
    return kGatedResidualPluginName;
}

char const* GatedResidualPluginCreator::getPluginVersion() const noexcept
{
    return kGatedResidualPluginVersion;
}

char const* GatedResidualPluginCreator::getPluginNamespace() const noexcept
{
    return kGatedResidualPluginNamespace;
}

} // namespace cheers

// ---- plugin-library entry points -------------------------------------------------------------------------------------
#if CHEERS_PLUGIN_STATIC_REGISTRATION

// the macro pastes its argument into a variable name: it needs an unqualified class name
using cheers::GatedResidualPluginCreator;
REGISTER_TENSORRT_PLUGIN(GatedResidualPluginCreator);

#else

namespace
{
nvinfer1::IPluginCreatorInterface* const* creatorList(int32_t& nbCreators) noexcept
{
    static cheers::GatedResidualPluginCreator sGatedResidualCreator;
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&sGatedResidualCreator};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
} // namespace

// The only creator entry point. No getPluginCreators: that (deprecated) name hands out IPluginCreator (V2) pointers
// to whoever calls it, and this library has V3 creators only (NVIDIA's V3 libraries export getCreators and
// setLoggerFinder alone, plugin/exports/nvinfer_vc_plugin.map).
extern "C" CHEERS_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    return creatorList(nbCreators);
}

#endif

// Exported by both variants (harmless when only dlopen()ed).
extern "C" CHEERS_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    cheers::loggerFinder().set(finder);
}
