// TensorRT IPluginV3 "CheersGatedResidual" (version "1", namespace ""): the fused hi-gate of docs/architecture.md §10.
//
//   inputs  0 low [.., C]   1 high [.., C]   2 h [.., C] (= gate.0 Linear output)   3 w2 [C] (gate.2.weight)
//           4 b2 [1] (gate.2.bias)   5 ln_w [C]   6 ln_b [C]   (weights are network inputs: ONNX initializers)
//   output  0 out = LayerNorm(low + (dot(SiLU(h), w2) + b2) * high) * ln_w + ln_b, shape and dtype of low
//   attribute eps (float32, default 1e-5)
//   I/O: linear format, one dtype for all 8 tensors among FP32 / FP16 / BF16.
#pragma once

#include "trt_compat.h"

#include <string>

namespace cheers
{

constexpr char const* kGatedResidualPluginName = "CheersGatedResidual";
constexpr char const* kGatedResidualPluginVersion = "1";
constexpr char const* kGatedResidualPluginNamespace = "";
constexpr float kGatedResidualDefaultEps = 1e-5F;

class GatedResidualPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    static constexpr int32_t kNbInputs = 7;
    static constexpr int32_t kNbOutputs = 1;
    enum Input : int32_t
    {
        kLOW = 0,
        kHIGH = 1,
        kH = 2,
        kW2 = 3,
        kB2 = 4,
        kLN_W = 5,
        kLN_B = 6
    };

    explicit GatedResidualPlugin(float eps);
    GatedResidualPlugin(GatedResidualPlugin const& other);
    GatedResidualPlugin& operator=(GatedResidualPlugin const&) = delete;
    ~GatedResidualPlugin() override = default;

    float eps() const noexcept
    {
        return mEps;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    void initFields() noexcept;

    float mEps;
    std::string mMetadata;  // "eps=..." for getTimingCacheID / getMetadataString
    nvinfer1::PluginField mField;
    nvinfer1::PluginFieldCollection mFC{};
};

class GatedResidualPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    GatedResidualPluginCreator();
    ~GatedResidualPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    nvinfer1::PluginField mFieldSpec;
    nvinfer1::PluginFieldCollection mFC{};
};

//! Parse the "eps" attribute (float32 or float64, length 1). Returns false (and leaves *eps) on a malformed field;
//! unknown fields are ignored. Exposed for tests.
bool parseGatedResidualFields(nvinfer1::PluginFieldCollection const* fc, float* eps) noexcept;

} // namespace cheers
