// Host-side check of GatedResidualPlugin without TensorRT (built by tests/test_plugin_compile.py against
// testing/trt_api_subset, linked with the kernel object). Exercises the creator, attribute parsing, serialisation
// round trip, clone, format/type negotiation, shape validation and enqueue error handling. With a CUDA device
// present it also runs enqueue for FP32 / FP16 / BF16 and compares with a double-precision reference.
// Prints "N passed, M failed" and exits non-zero on any failure.
#include "GatedResidualPlugin.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& what)
{
    if (ok)
    {
        ++gPassed;
    }
    else
    {
        ++gFailed;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

Dims makeDims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

struct ExprBuilder : IExprBuilder
{
};

void destroyPlugin(IPluginV3* p)
{
    delete p;
}
using PluginPtr = std::unique_ptr<IPluginV3, decltype(&destroyPlugin)>;

PluginPtr create(cheers::GatedResidualPluginCreator& creator, PluginFieldCollection const* fc,
    TensorRTPhase phase = TensorRTPhase::kBUILD)
{
    return PluginPtr(creator.createPlugin("hi_gate", fc, phase), &destroyPlugin);
}

float serializedEps(IPluginV3* p)
{
    auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    PluginFieldCollection const* fc = rt->getFieldsToSerialize();
    if (fc == nullptr || fc->nbFields != 1 || std::strcmp(fc->fields[0].name, "eps") != 0
        || fc->fields[0].type != PluginFieldType::kFLOAT32 || fc->fields[0].length != 1)
    {
        return -1.0F;
    }
    float v = 0.0F;
    std::memcpy(&v, fc->fields[0].data, sizeof(float));
    return v;
}

std::vector<DynamicPluginTensorDesc> dynDescs(DataType t, TensorFormat f, int64_t B, int64_t N, int64_t C)
{
    std::vector<DynamicPluginTensorDesc> v(8);
    std::vector<std::vector<int64_t>> shapes
        = {{B, N, C}, {B, N, C}, {B, N, C}, {C}, {1}, {C}, {C}, {B, N, C}};
    for (size_t i = 0; i < v.size(); ++i)
    {
        v[i].desc.dims = makeDims(shapes[i]);
        v[i].desc.type = t;
        v[i].desc.format = f;
        v[i].desc.scale = -1.0F;
        v[i].min = v[i].max = v[i].opt = v[i].desc.dims;
    }
    return v;
}

// ---- GPU end-to-end through enqueue --------------------------------------------------------------------------------
template <typename T>
T fromFloat(float v);
template <>
float fromFloat<float>(float v)
{
    return v;
}
template <>
__half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <typename T>
double toDouble(T v);
template <>
double toDouble<float>(float v)
{
    return v;
}
template <>
double toDouble<__half>(__half v)
{
    return static_cast<double>(__half2float(v));
}
template <>
double toDouble<__nv_bfloat16>(__nv_bfloat16 v)
{
    return static_cast<double>(__bfloat162float(v));
}

template <typename T>
void gpuCase(IPluginV3* plugin, DataType dt, int64_t B, int64_t N, int64_t C, float eps, double tol,
    char const* name, bool staleError = false)
{
    int64_t const rows = B * N;
    std::mt19937 rng(1234 + static_cast<unsigned>(C));
    std::normal_distribution<float> nd(0.0F, 1.0F);
    auto fill = [&](std::vector<T>& v, float scale, float offset) {
        for (auto& e : v)
        {
            e = fromFloat<T>(offset + scale * nd(rng));
        }
    };
    std::vector<T> low(rows * C), high(rows * C), h(rows * C), w2(C), b2(1), lnw(C), lnb(C), out(rows * C);
    fill(low, 1.0F, 0.3F);
    fill(high, 1.0F, -0.2F);
    fill(h, 2.0F, 0.0F);
    fill(w2, 1.0F / std::sqrt(static_cast<float>(C)), 0.0F);
    fill(b2, 0.5F, 0.1F);
    fill(lnw, 0.2F, 1.0F);
    fill(lnb, 0.2F, 0.0F);

    std::vector<std::vector<T>*> host = {&low, &high, &h, &w2, &b2, &lnw, &lnb, &out};
    std::vector<void*> dev(host.size(), nullptr);
    bool ok = true;
    for (size_t i = 0; i < host.size(); ++i)
    {
        ok = ok && cudaMalloc(&dev[i], host[i]->size() * sizeof(T)) == cudaSuccess;
        ok = ok && cudaMemcpy(dev[i], host[i]->data(), host[i]->size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess;
    }
    ok = ok && cudaMemset(dev[7], 0xFF, out.size() * sizeof(T)) == cudaSuccess; // NaN poison
    check(ok, std::string(name) + ": device buffers");

    std::vector<PluginTensorDesc> in(7), outDesc(1);
    std::vector<std::vector<int64_t>> shapes = {{B, N, C}, {B, N, C}, {B, N, C}, {C}, {1}, {C}, {C}};
    for (size_t i = 0; i < in.size(); ++i)
    {
        in[i].dims = makeDims(shapes[i]);
        in[i].type = dt;
        in[i].format = TensorFormat::kLINEAR;
        in[i].scale = -1.0F;
    }
    outDesc[0] = in[0];
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(rt->onShapeChange(in.data(), 7, outDesc.data(), 1) == 0, std::string(name) + ": onShapeChange");
    void const* inputs[7] = {dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6]};
    void* outputs[1] = {dev[7]};
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    if (staleError)
    {
        // a failed call earlier in this thread (as a failed CUDA-graph capture leaves one) must not fail the launch
        void* huge = nullptr;
        check(cudaMalloc(&huge, static_cast<size_t>(1) << 62) != cudaSuccess && cudaPeekAtLastError() != cudaSuccess,
            std::string(name) + ": stale non-sticky error recorded before enqueue");
    }
    int32_t const rc = rt->enqueue(in.data(), outDesc.data(), inputs, outputs, nullptr, stream);
    check(rc == 0, std::string(name) + ": enqueue returned " + std::to_string(rc));
    check(cudaStreamSynchronize(stream) == cudaSuccess, std::string(name) + ": stream sync");
    cudaStreamDestroy(stream);
    cudaMemcpy(out.data(), dev[7], out.size() * sizeof(T), cudaMemcpyDeviceToHost);
    for (void* p : dev)
    {
        cudaFree(p);
    }

    // double reference on the (rounded) inputs
    double maxErr = 0.0;
    double maxRef = 0.0;
    bool anyNan = false;
    for (int64_t r = 0; r < rows; ++r)
    {
        double dot = 0.0;
        for (int64_t c = 0; c < C; ++c)
        {
            double const hv = toDouble(h[r * C + c]);
            dot += hv / (1.0 + std::exp(-hv)) * toDouble(w2[c]);
        }
        double const g = dot + toDouble(b2[0]);
        std::vector<double> x(C);
        double mean = 0.0;
        for (int64_t c = 0; c < C; ++c)
        {
            x[c] = toDouble(low[r * C + c]) + g * toDouble(high[r * C + c]);
            mean += x[c];
        }
        mean /= static_cast<double>(C);
        double var = 0.0;
        for (int64_t c = 0; c < C; ++c)
        {
            var += (x[c] - mean) * (x[c] - mean);
        }
        var /= static_cast<double>(C);
        for (int64_t c = 0; c < C; ++c)
        {
            double const ref = (x[c] - mean) / std::sqrt(var + eps) * toDouble(lnw[c]) + toDouble(lnb[c]);
            double const got = toDouble(out[r * C + c]);
            anyNan = anyNan || std::isnan(got);
            maxErr = std::fmax(maxErr, std::fabs(got - ref));
            maxRef = std::fmax(maxRef, std::fabs(ref));
        }
    }
    double const rel = maxErr / std::fmax(maxRef, 1e-30);
    std::printf("  enqueue %-5s B=%lld N=%lld C=%lld: max rel err %.3e (tol %.1e)%s\n", name,
        static_cast<long long>(B), static_cast<long long>(N), static_cast<long long>(C), rel, tol,
        anyNan ? " NaN!" : "");
    check(!anyNan && rel <= tol, std::string(name) + ": enqueue numerics C=" + std::to_string(C));
}

} // namespace

int main()
{
    cheers::GatedResidualPluginCreator creator;

    // ---- creator identity and field spec
    check(std::strcmp(creator.getPluginName(), "CheersGatedResidual") == 0, "creator name");
    check(std::strcmp(creator.getPluginVersion(), "1") == 0, "creator version");
    check(std::strcmp(creator.getPluginNamespace(), "") == 0, "creator namespace");
    PluginFieldCollection const* spec = creator.getFieldNames();
    check(spec != nullptr && spec->nbFields == 1 && std::strcmp(spec->fields[0].name, "eps") == 0
            && spec->fields[0].type == PluginFieldType::kFLOAT32,
        "creator field spec");

    // ---- attribute parsing
    {
        auto p = create(creator, nullptr);
        check(p != nullptr && serializedEps(p.get()) == 1e-5F, "default eps");
    }
    {
        float eps = 2.5e-6F;
        PluginField f("eps", &eps, PluginFieldType::kFLOAT32, 1);
        PluginFieldCollection fc{1, &f};
        auto p = create(creator, &fc);
        check(p != nullptr && serializedEps(p.get()) == eps, "eps float32");
        // runtime re-creation from the serialised fields
        auto* rt = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        auto q = create(creator, rt->getFieldsToSerialize(), TensorRTPhase::kRUNTIME);
        check(q != nullptr && serializedEps(q.get()) == eps, "serialise/deserialise round trip");
    }
    {
        double eps = 1e-6;
        PluginField fields[2] = {PluginField("exporter_note", "x", PluginFieldType::kCHAR, 1),
            PluginField("eps", &eps, PluginFieldType::kFLOAT64, 1)};
        PluginFieldCollection fc{2, fields};
        auto p = create(creator, &fc);
        check(p != nullptr && serializedEps(p.get()) == 1e-6F, "eps float64 + unknown field ignored");
    }
    {
        float two[2] = {1e-5F, 1e-5F};
        PluginField f("eps", two, PluginFieldType::kFLOAT32, 2);
        PluginFieldCollection fc{1, &f};
        check(create(creator, &fc) == nullptr, "eps with length 2 rejected");
        float neg = -1.0F;
        PluginField g("eps", &neg, PluginFieldType::kFLOAT32, 1);
        PluginFieldCollection fc2{1, &g};
        check(create(creator, &fc2) == nullptr, "negative eps rejected");
        float nan = std::nanf("");
        PluginField n("eps", &nan, PluginFieldType::kFLOAT32, 1);
        PluginFieldCollection fc3{1, &n};
        check(create(creator, &fc3) == nullptr, "NaN eps rejected");
        int32_t i = 1;
        PluginField k("eps", &i, PluginFieldType::kINT32, 1);
        PluginFieldCollection fc4{1, &k};
        check(create(creator, &fc4) == nullptr, "int eps rejected");
    }

    auto plugin = create(creator, nullptr);
    check(plugin != nullptr, "create");
    if (!plugin)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }

    // ---- capabilities
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* rt = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && rt, "capability interfaces");
    check(std::strcmp(core->getPluginName(), "CheersGatedResidual") == 0
            && std::strcmp(core->getPluginVersion(), "1") == 0 && std::strcmp(core->getPluginNamespace(), "") == 0,
        "core identity");
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(rt->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability kinds");
    check(build->getNbOutputs() == 1, "one output");

    // ---- clone: independent field storage
    {
        PluginPtr c(plugin->clone(), &destroyPlugin);
        check(c != nullptr && serializedEps(c.get()) == 1e-5F, "clone eps");
        auto* crt = static_cast<IPluginV3OneRuntime*>(c->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        check(crt->getFieldsToSerialize() != rt->getFieldsToSerialize()
                && crt->getFieldsToSerialize()->fields[0].data != rt->getFieldsToSerialize()->fields[0].data,
            "clone owns its serialised fields");
        PluginPtr a(rt->attachToContext(nullptr), &destroyPlugin);
        check(a != nullptr && serializedEps(a.get()) == 1e-5F, "attachToContext clones");
    }

    // ---- types and formats
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        auto d = dynDescs(t, TensorFormat::kLINEAR, 2, 1024, 1152);
        bool all = true;
        for (int32_t pos = 0; pos < 8; ++pos)
        {
            all = all && build->supportsFormatCombination(pos, d.data(), 7, 1);
        }
        check(all, "supports linear " + std::to_string(static_cast<int>(t)));
        DataType inTypes[7] = {t, t, t, t, t, t, t};
        DataType outType = DataType::kINT8;
        check(build->getOutputDataTypes(&outType, 1, inTypes, 7) == 0 && outType == t, "output dtype follows low");
    }
    {
        auto d = dynDescs(DataType::kHALF, TensorFormat::kLINEAR, 2, 1024, 1152);
        d[3].desc.type = DataType::kFLOAT;
        check(!build->supportsFormatCombination(3, d.data(), 7, 1), "mixed dtypes rejected");
        auto e = dynDescs(DataType::kINT8, TensorFormat::kLINEAR, 2, 1024, 1152);
        check(!build->supportsFormatCombination(0, e.data(), 7, 1), "int8 rejected");
        auto f = dynDescs(DataType::kHALF, TensorFormat::kHWC8, 2, 1024, 1152);
        check(!build->supportsFormatCombination(0, f.data(), 7, 1), "non-linear format rejected");
        check(!build->supportsFormatCombination(0, d.data(), 6, 1), "wrong input count rejected");
    }

    // ---- output shapes
    {
        ExprBuilder eb;
        DimsExprs in[7]{};
        in[0].nbDims = 3;
        DimsExprs out[1]{};
        check(build->getOutputShapes(in, 7, nullptr, 0, out, 1, eb) == 0 && out[0].nbDims == 3, "output shape = low");
        check(build->getOutputShapes(in, 6, nullptr, 0, out, 1, eb) != 0, "output shape: wrong input count");
    }

    // ---- configurePlugin validation (build-time shapes, -1 = dynamic)
    {
        auto d = dynDescs(DataType::kHALF, TensorFormat::kLINEAR, -1, 1024, 1152);
        check(build->configurePlugin(d.data(), 7, d.data() + 7, 1) == 0, "configure dynamic batch");
        auto bad = d;
        bad[3].desc.dims = makeDims({1152 / 2});
        check(build->configurePlugin(bad.data(), 7, bad.data() + 7, 1) != 0, "configure: w2 size mismatch");
        bad = d;
        bad[4].desc.dims = makeDims({2});
        check(build->configurePlugin(bad.data(), 7, bad.data() + 7, 1) != 0, "configure: b2 size mismatch");
        bad = d;
        bad[1].desc.dims = makeDims({-1, 512, 1152});
        check(build->configurePlugin(bad.data(), 7, bad.data() + 7, 1) != 0, "configure: high shape mismatch");
        bad = d;
        bad[2].desc.dims = makeDims({1024, 1152});
        check(build->configurePlugin(bad.data(), 7, bad.data() + 7, 1) != 0, "configure: h rank mismatch");
        auto w2row = d;
        w2row[3].desc.dims = makeDims({1, 1152}); // gate.2.weight as stored ([1, C])
        check(build->configurePlugin(w2row.data(), 7, w2row.data() + 7, 1) == 0, "configure: w2 as [1, C]");
    }

    // ---- onShapeChange validation
    {
        auto d = dynDescs(DataType::kFLOAT, TensorFormat::kLINEAR, 2, 16, 72);
        std::vector<PluginTensorDesc> in(7), out(1);
        for (int i = 0; i < 7; ++i)
        {
            in[i] = d[i].desc;
        }
        out[0] = d[7].desc;
        check(rt->onShapeChange(in.data(), 7, out.data(), 1) == 0, "onShapeChange ok");
        in[5].dims = makeDims({71});
        check(rt->onShapeChange(in.data(), 7, out.data(), 1) != 0, "onShapeChange: ln_w mismatch");
    }

    // ---- enqueue: real run with a device, error path without one
    int nDev = 0;
    if (cudaGetDeviceCount(&nDev) != cudaSuccess || nDev == 0)
    {
        cudaGetLastError();
        std::vector<PluginTensorDesc> in(7), out(1);
        auto d = dynDescs(DataType::kFLOAT, TensorFormat::kLINEAR, 1, 4, 64);
        for (int i = 0; i < 7; ++i)
        {
            in[i] = d[i].desc;
        }
        out[0] = d[7].desc;
        float dummy[64 * 4] = {};
        void const* inputs[7] = {dummy, dummy, dummy, dummy, dummy, dummy, dummy};
        void* outputs[1] = {dummy};
        check(rt->enqueue(in.data(), out.data(), inputs, outputs, nullptr, nullptr) != 0,
            "enqueue reports the launch failure without a GPU");
        std::printf("  (no CUDA device: GPU enqueue checks skipped)\n");
    }
    else
    {
        auto p16 = create(creator, nullptr);
        gpuCase<float>(plugin.get(), DataType::kFLOAT, 2, 1024, 1152, 1e-5F, 1e-5, "f32");
        gpuCase<float>(plugin.get(), DataType::kFLOAT, 1, 33, 72, 1e-5F, 1e-5, "f32");
        gpuCase<float>(plugin.get(), DataType::kFLOAT, 3, 7, 100, 1e-5F, 1e-5, "f32");
        gpuCase<__half>(plugin.get(), DataType::kHALF, 2, 1024, 1152, 1e-5F, 2e-3, "f16");
        gpuCase<__half>(plugin.get(), DataType::kHALF, 1, 9, 64, 1e-5F, 2e-3, "f16");
        gpuCase<__nv_bfloat16>(plugin.get(), DataType::kBF16, 2, 1024, 1152, 1e-5F, 1e-2, "bf16");
        gpuCase<__nv_bfloat16>(plugin.get(), DataType::kBF16, 1, 5, 100, 1e-5F, 1e-2, "bf16");
        gpuCase<float>(plugin.get(), DataType::kFLOAT, 1, 33, 72, 1e-5F, 1e-5, "f32 after a stale error", true);
    }

    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}
