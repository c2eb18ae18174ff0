"""Stand-ins for TensorRT (the `tensorrt` module: runtime, engines, execution contexts, ONNX parser, plugin
registry) and Polygraphy's TensorRT backend (`polygraphy.backend.trt`), so the build orchestration and the
TensorRT backend run end to end on every machine. Used by tests/test_trt.py.

* `FakeTrt` has the TensorRT 10 Python API that cheers_deploy uses, with the real names, argument orders and
  return conventions (checked against NVIDIA's bindings 10.3.0, 10.13.3.9 and 11.4.0.106 by
  tests/test_trt_real_api.py: names, kinds, parameter names, enum values): name-based I/O
  (`get_tensor_name/mode/dtype/shape`, `get_tensor_profile_shape(name, profile_index)`),
  `create_execution_context(strategy)`, `set_device_memory(ptr, size)`,
  `set_optimization_profile_async(index, stream)` (returns True or raises RuntimeError, as the bindings do),
  `set_input_shape` / `set_tensor_address` (return False on a bad value), `execute_async_v3(stream)` (returns
  False when the context is not ready), `Runtime.deserialize_cuda_engine` (None for a plan it cannot read).
  A plan is JSON naming the ONNX graph and the profiles; the engine runs that graph with ONNX Runtime, reading
  its inputs from and writing its outputs to the bound addresses (bounds-checked against `FakeCudart`'s
  allocations), enqueued on the stream so CUDA-graph capture records and replays it.
* `FakePolygraphy` has the functions and loaders of `polygraphy.backend.trt` that the builder calls
  (`Profile`, `CreateConfig`, `create_network`, `engine_bytes_from_network`) and records every build.
* `install(monkeypatch)` puts both, with a `FakeCudart`, behind cheers_deploy.trt.compat / plugin /
  device_memory (what the builder and the backend import).

One file (over 400 lines) because it mirrors one API surface: runtime, engines, contexts, parser, registry and
Polygraphy's builder call each other as in TensorRT.
"""
import collections
import ctypes
import enum
import json
from pathlib import Path

import numpy as np

from cheers_deploy import constants as C

from .cuda import FakeCudart

FAKE_TRT_VERSION = "10.3.0.30"
FAKE_GPU = "Fake Orin"
FAKE_CC = (8, 7)


# =====================================================================================================================
# enums (the `tensorrt` module's names)
# =====================================================================================================================
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.IntEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4
    TACTIC_SHARED_MEMORY = 5


class ErrorCode(enum.IntEnum):                    # the ONNX parser's error codes
    SUCCESS = 0
    INTERNAL_ERROR = 1
    MEM_ALLOC_FAILED = 2
    MODEL_DESERIALIZE_FAILED = 3
    INVALID_VALUE = 4
    INVALID_GRAPH = 5
    INVALID_NODE = 6
    UNSUPPORTED_GRAPH = 7
    UNSUPPORTED_NODE = 8


_ORT_TO_DT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
              "tensor(bool)": DataType.BOOL, "tensor(int32)": DataType.INT32, "tensor(int8)": DataType.INT8,
              "tensor(uint8)": DataType.UINT8}
_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64, DataType.BOOL: np.bool_,
       DataType.INT32: np.int32, DataType.INT8: np.int8, DataType.UINT8: np.uint8}
ALIGN = 256                                       # "The pointer must have at least 256-byte alignment."


def _name(path) -> str:
    return Path(path).stem


# =====================================================================================================================
# runtime: engines and execution contexts
# =====================================================================================================================
class FakeEngine:
    """ICudaEngine of a fake plan: the ONNX graph's I/O, the plan's profiles, ORT to execute."""

    def __init__(self, plan: dict):
        import onnx
        import onnxruntime as ort

        from cheers_deploy.build import surgery

        self.plan = plan
        self.name = _name(plan["onnx"])
        model = onnx.load(plan["onnx"])
        self.fused = surgery.count_plugin_nodes(model)
        if self.fused:                                   # the "plugin": its reference function, run by ORT
            surgery.attach_reference_function(model)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.io = [(i.name, TensorIOMode.INPUT, i) for i in self.sess.get_inputs()] + \
                  [(o.name, TensorIOMode.OUTPUT, o) for o in self.sess.get_outputs()]
        self.profiles = plan["profiles"]
        self.contexts = []

    def _find(self, name):
        for x in self.io:
            if x[0] == name:
                return x
        raise KeyError(f"engine {self.name} has no tensor {name!r}")

    # -- properties of ICudaEngine
    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    @property
    def device_memory_size_v2(self) -> int:
        return 4096 * (1 + len(self.profiles))

    # -- name-based I/O
    def get_tensor_name(self, index: int) -> str:
        return self.io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        try:
            return self._find(name)[1]
        except KeyError:
            return TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        return _ORT_TO_DT[self._find(name)[2].type]

    def get_tensor_shape(self, name: str):
        return tuple(d if isinstance(d, int) else -1 for d in self._find(name)[2].shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        """[min, opt, max] of an input in one profile."""
        return [tuple(s) for s in self.profiles[profile_index][name]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        ctx = FakeContext(self, ExecutionContextAllocationStrategy(int(strategy)))
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    """IExecutionContext. Records what a test wants to see: the profile selected, how often work was enqueued
    (`enqueued`) and how often it ran on the stream (`ran`: direct runs and CUDA-graph replays)."""

    def __init__(self, engine: FakeEngine, strategy: ExecutionContextAllocationStrategy):
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addr = {}, {}
        self.profile = 0                                 # TensorRT selects profile 0 for a new context
        # activation memory: the caller's (set_device_memory) for USER_MANAGED, else TensorRT's own
        self.memory = None if strategy == ExecutionContextAllocationStrategy.USER_MANAGED else \
            (0, engine.device_memory_size_v2)
        self.enqueued = 0
        self.ran = 0

    def set_device_memory(self, memory: int, size: int) -> None:
        if not memory or size < self.engine.device_memory_size_v2:
            raise RuntimeError(f"set_device_memory: {size} bytes at 0x{int(memory):x}, the engine needs "
                               f"{self.engine.device_memory_size_v2}")
        self.memory = (int(memory), int(size))

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        """True, or RuntimeError like the bindings (they raise "Error in set optimization profile async." where
        the C++ API returns false: an index outside the engine's profiles). The fake also insists on the order
        the backend uses for user-managed contexts: device memory first."""
        if not 0 <= int(profile_index) < self.engine.num_optimization_profiles or self.memory is None:
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = int(profile_index)
        return True

    @property
    def active_optimization_profile(self) -> int:
        return self.profile

    def set_input_shape(self, name: str, shape) -> bool:
        prof = self.engine.profiles[self.profile]
        if name not in prof:
            return False
        mn, _, mx = prof[name]
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(mn) or not all(a <= d <= b for a, d, b in zip(mn, shape, mx)):
            return False
        self.shapes[name] = shape
        return True

    def _dims(self):
        dims = {}
        for i in self.engine.sess.get_inputs():
            for d, v in zip(i.shape, self.shapes.get(i.name, ())):
                if isinstance(d, str):
                    dims[d] = v
        return dims

    def get_tensor_shape(self, name: str):
        if name in self.shapes:
            return self.shapes[name]
        dims = self._dims()
        return tuple(d if isinstance(d, int) else dims.get(d, -1) for d in self.engine._find(name)[2].shape)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) == TensorIOMode.NONE or int(memory) % ALIGN:
            return False
        self.addr[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addr.get(name, 0)

    def _ready(self) -> bool:
        e = self.engine
        return (self.memory is not None and all(i.name in self.shapes for i in e.sess.get_inputs())
                and all(n in self.addr for n, _, _ in e.io))

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not self._ready():                            # TensorRT logs the error and returns False
            return False
        e, cud = self.engine, FakeTrt.cudart
        lib, sid = cud.libcudart, int(stream_handle)
        if e.name in FakeTrt.capture_unsafe and sid in cud.capturing and int(cud.capture_mode[sid]) != 2:
            # an engine that makes a capture-unsafe call (through the process's libcudart): CUDA invalidates the
            # capture and records the error there; TensorRT returns False ("the enqueue call may return false if the
            # current CUDA graph capture fails", trtexec)
            cud.invalidated.add(sid)
            cud.calls["unsafe_in_capture"] += 1
            lib.record(900)                              # cudaErrorStreamCaptureUnsupported
            return False
        if e.fused and lib.cudaPeekAtLastError():
            # a plugin whose kernel launcher returns cudaGetLastError() without clearing it first (what the
            # gated-residual launcher did before it cleared stale errors) fails on a stale error: TensorRT returns False
            return False
        shapes = {n: tuple(self.get_tensor_shape(n)) for n, _, _ in e.io}
        addr = dict(self.addr)

        def run():
            feed = {}
            for i in e.sess.get_inputs():
                dt = np.dtype(_NP[_ORT_TO_DT[i.type]])
                n = int(np.prod(shapes[i.name], dtype=np.int64)) * dt.itemsize
                cud._check_dev(addr[i.name], n)
                raw = ctypes.string_at(addr[i.name], n)
                feed[i.name] = np.frombuffer(raw, dt).reshape(shapes[i.name]).copy()
            outs = e.sess.run(None, feed)
            for o, val in zip(e.sess.get_outputs(), outs):
                assert tuple(val.shape) == shapes[o.name], (o.name, val.shape, shapes[o.name])
                val = np.ascontiguousarray(val)
                cud._check_dev(addr[o.name], val.nbytes)
                ctypes.memmove(addr[o.name], val.ctypes.data, val.nbytes)
            self.ran += 1
            FakeTrt.ran.append((e.name, self.profile))

        cud.enqueue(stream_handle, run)
        self.enqueued += 1
        FakeTrt.executions += 1
        return True


class _Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        """An engine, or None (TensorRT logs why) for a plan it cannot read or whose plugin is not registered.
        Takes any buffer, as the bindings do (`serialized_engine: buffer`); records the buffer's type."""
        FakeTrt.deserialized.append(type(serialized_engine).__name__)
        try:
            plan = json.loads(bytes(serialized_engine).decode())
            if not isinstance(plan, dict) or "onnx" not in plan:
                return None
        except (ValueError, UnicodeDecodeError):
            return None
        if plan.get("plugin") and not FakeTrt.get_plugin_registry().get_creator(C.PLUGIN_NAME, C.PLUGIN_VERSION,
                                                                               C.PLUGIN_NAMESPACE):
            return None
        return FakeEngine(plan)


# =====================================================================================================================
# ONNX parser
# =====================================================================================================================
class _ParserError:
    def __init__(self, node, name, op, desc, code=ErrorCode.UNSUPPORTED_NODE):
        self._node, self._name, self._op, self._desc, self._code = node, name, op, desc, code

    def code(self):
        return self._code

    def desc(self):
        return self._desc

    def file(self):
        return "ModelImporter.cpp"

    def func(self):
        return "parseGraph"

    def line(self):
        return 0

    def node(self):
        return self._node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def __str__(self):
        return f"In node {self._node} with name: {self._name} and operator: {self._op} ({self._desc})"


class _OnnxParser:
    """trt.OnnxParser(network, logger): rejects ops it does not know and plugin nodes whose creator is missing."""

    def __init__(self, network, logger):
        self.network, self.logger, self._errors = network, logger, []

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, index):
        return self._errors[index]

    def clear_errors(self):
        self._errors = []

    def parse_from_file(self, model: str) -> bool:
        import onnx

        self.network.path = str(model)
        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - the parser reports unreadable files as an error
            self._errors.append(_ParserError(-1, "", "", f"Failed to parse ONNX model from file: {model}",
                                             ErrorCode.MODEL_DESERIALIZE_FAILED))
            return False
        registry = FakeTrt.get_plugin_registry()
        for k, n in enumerate(proto.graph.node):
            if n.op_type == "NoSuchOp":
                self._errors.append(_ParserError(k, n.name, n.op_type, "No importer registered for op: NoSuchOp"))
            elif n.op_type == C.PLUGIN_NAME and registry.get_creator(C.PLUGIN_NAME, C.PLUGIN_VERSION,
                                                                      C.PLUGIN_NAMESPACE) is None:
                self._errors.append(_ParserError(k, n.name, n.op_type, "Plugin not found, are the plugin name, "
                                                                      "version, and namespace correct?"))
            elif n.op_type == C.PLUGIN_NAME:
                self.network.plugin_nodes += 1
        return not self._errors


# =====================================================================================================================
# plugin registry
# =====================================================================================================================
class _Creator:
    def __init__(self, name, version, namespace):
        self.name, self.plugin_version, self.plugin_namespace = name, version, namespace


class _PluginRegistry:
    """IPluginRegistry: `load_library(path)` registers the gated-residual creator (what the real library's
    getCreators does); `get_creator` / `get_plugin_creator` return it or None."""

    def __init__(self):
        self.libraries = []
        self.creators = {}

    def load_library(self, plugin_path: str):
        self.libraries.append(Path(plugin_path))
        self.creators[(C.PLUGIN_NAME, C.PLUGIN_VERSION, C.PLUGIN_NAMESPACE)] = \
            _Creator(C.PLUGIN_NAME, C.PLUGIN_VERSION, C.PLUGIN_NAMESPACE)
        return ("handle", plugin_path)

    def get_creator(self, type: str, version: str, plugin_namespace: str = ""):  # noqa: A002 - the bindings' name
        return self.creators.get((type, version, plugin_namespace))

    get_plugin_creator = get_creator


# =====================================================================================================================
# the module
# =====================================================================================================================
class _Logger:
    WARNING = 2

    def __init__(self, min_severity=2):
        self.min_severity = min_severity


class FakeTrt:
    """The `tensorrt` module (class attributes; `reset` gives a fresh process)."""

    __version__ = FAKE_TRT_VERSION
    cudart = None
    executions = 0                        # execute_async_v3 calls
    ran = []                              # (graph, profile index) of every execution that ran on the stream
    capture_unsafe = set()                # engine names whose enqueue fails a CUDA-graph capture
    deserialized = []                     # type names of what Runtime.deserialize_cuda_engine was given
    _registry = _PluginRegistry()

    DataType = DataType
    TensorIOMode = TensorIOMode
    ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    MemoryPoolType = MemoryPoolType
    ErrorCode = ErrorCode
    Logger = _Logger
    Runtime = _Runtime
    OnnxParser = _OnnxParser

    @classmethod
    def reset(cls, cudart):
        cls.cudart, cls.executions, cls.ran = cudart, 0, []
        cls.capture_unsafe, cls.deserialized = set(), []
        cls._registry = _PluginRegistry()

    @staticmethod
    def init_libnvinfer_plugins(logger, namespace: str) -> bool:
        return True

    @classmethod
    def get_plugin_registry(cls):
        return cls._registry


# =====================================================================================================================
# Polygraphy's TensorRT backend
# =====================================================================================================================
class _Network:
    def __init__(self, strongly_typed):
        self.strongly_typed, self.path, self.plugin_nodes = strongly_typed, None, 0


class _Profile(collections.OrderedDict):
    """polygraphy.backend.trt.Profile: input name -> (min, opt, max)."""

    def add(self, name, min, opt, max):  # noqa: A002 - Polygraphy's argument names
        self[name] = (tuple(min), tuple(opt), tuple(max))
        return self


_CONFIG_ARGS = {"tf32", "fp16", "int8", "bf16", "fp8", "profiles", "calibrator", "precision_constraints",
                "load_timing_cache", "algorithm_selector", "sparse_weights", "tactic_sources", "restricted",
                "use_dla", "allow_gpu_fallback", "profiling_verbosity", "memory_pool_limits", "refittable",
                "strip_plan", "preview_features", "engine_capability", "direct_io", "builder_optimization_level",
                "hardware_compatibility_level", "max_aux_streams", "version_compatible", "exclude_lean_runtime",
                "quantization_flags", "error_on_timing_cache_miss", "disable_compilation_cache",
                "progress_monitor", "weight_streaming", "runtime_platform", "tiling_optimization_level"}


class _CreateConfig:
    """polygraphy.backend.trt.CreateConfig: keyword arguments only, unknown ones are a TypeError."""

    def __init__(self, **kw):
        bad = sorted(set(kw) - _CONFIG_ARGS)
        if bad:
            raise TypeError(f"CreateConfig() got unexpected keyword argument(s) {bad}")
        self.kw = kw


class FakePolygraphy:
    """`polygraphy.backend.trt`: builds record (graph file name, CreateConfig keywords) in `builds`."""

    builds = []
    Profile = _Profile
    CreateConfig = _CreateConfig

    @classmethod
    def reset(cls):
        cls.builds = []

    @staticmethod
    def create_network(explicit_batch=None, strongly_typed=False, **kw):
        return object(), _Network(bool(strongly_typed))

    @staticmethod
    def engine_bytes_from_network(network, config=None, save_timing_cache=None):
        builder, net, parser = network() if callable(network) else network
        kw = config.kw if config is not None else {}
        if not net.strongly_typed:
            raise RuntimeError("fake TensorRT: cheers-deploy builds strongly typed networks only")
        flags = [f for f in ("fp16", "int8", "bf16", "fp8") if kw.get(f)]
        if flags:                                        # TensorRT refuses precision flags on strongly typed networks
            raise RuntimeError(f"strongly typed network: builder flag(s) {flags} are not allowed")
        FakePolygraphy.builds.append((Path(net.path).name, kw))
        if save_timing_cache:
            Path(save_timing_cache).write_bytes(b"timing")
        profiles = [{k: [list(s) for s in v] for k, v in p.items()} for p in kw.get("profiles") or [{}]]
        return json.dumps({"onnx": net.path, "profiles": profiles, "plugin": net.plugin_nodes}).encode()


# =====================================================================================================================
# installing the fakes behind cheers_deploy
# =====================================================================================================================
def identity() -> dict:
    """The machine the fakes pretend to be (what compat.runtime_identity returns with them installed)."""
    return {"tensorrt": FAKE_TRT_VERSION, "gpu": FAKE_GPU, "compute_capability": f"{FAKE_CC[0]}.{FAKE_CC[1]}"}


FAKE_TRT_CUDA_MAJOR = 12


class Installed:
    """What `install` put in place: `cudart` (the FakeCudart), `loaded` plugin libraries, `new_process`,
    `uninstall`; `plugin_elf` is what the (non-ELF) fake plugin libraries 'link' and export (a test may change it),
    `findable` the shared libraries the fake dynamic loader finds."""

    def __init__(self, cudart, previous_runtime):
        from cheers_deploy.trt.compat import ElfDynamic

        self.cudart, self._previous = cudart, previous_runtime
        self.plugin_elf = ElfDynamic(needed=[f"libcudart.so.{FAKE_TRT_CUDA_MAJOR}", "libstdc++.so.6", "libc.so.6"],
                                     exports=frozenset({"getCreators", "setLoggerFinder"}))
        self.findable = {f"libcudart.so.{FAKE_TRT_CUDA_MAJOR}", "libcudart.so.13"}

    @property
    def loaded(self):
        """Plugin libraries loaded into the registry (this 'process')."""
        return FakeTrt.get_plugin_registry().libraries

    def new_process(self, monkeypatch):
        """Forget loaded plugin libraries, as a fresh process would."""
        from cheers_deploy.trt import plugin as trt_plugin

        FakeTrt._registry = _PluginRegistry()
        monkeypatch.setattr(trt_plugin, "_LOADED", {})

    def uninstall(self):
        """Give device_memory its previous CUDA runtime back (monkeypatch undoes the rest)."""
        from cheers_deploy.trt import device_memory as dm

        dm.use_runtime(self._previous)


def install(monkeypatch) -> Installed:
    """FakeTrt + FakePolygraphy + FakeCudart behind cheers_deploy.trt (compat imports, the plugin loader, device
    memory). Call `uninstall()` afterwards (monkeypatch undoes the rest)."""
    from cheers_deploy.trt import compat
    from cheers_deploy.trt import device_memory as dm
    from cheers_deploy.trt import plugin as trt_plugin

    cud = FakeCudart(name=FAKE_GPU.encode(), cc=FAKE_CC)
    prev = dm.use_runtime(cud)
    FakeTrt.reset(cud)
    FakePolygraphy.reset()
    inst = Installed(cud, prev)
    for mod in (compat, trt_plugin):
        monkeypatch.setattr(mod, "import_tensorrt", lambda: FakeTrt)
    monkeypatch.setattr(compat, "import_polygraphy_trt", lambda: FakePolygraphy)
    monkeypatch.setattr(compat, "import_cudart", lambda: cud)
    monkeypatch.setattr(compat, "trt_logger", lambda: FakeTrt.Logger())
    monkeypatch.setattr(compat, "is_jetson", lambda: False)
    # the fake library file is no ELF: pretend it exports getCreators, so it goes through the registry, and links the
    # CUDA runtime of the fake TensorRT, which the fake dynamic loader finds
    monkeypatch.setattr(trt_plugin, "_exports", lambda path, symbol: symbol == "getCreators")
    monkeypatch.setattr(compat, "read_elf_dynamic", lambda path: inst.plugin_elf)
    monkeypatch.setattr(compat, "tensorrt_cuda_major",
                        lambda trt=None: (FAKE_TRT_CUDA_MAJOR, f"fake TensorRT for CUDA {FAKE_TRT_CUDA_MAJOR}"))
    monkeypatch.setattr(compat, "find_shared_library",
                        lambda name, dirs=(): f"/fake/{name}" if name in inst.findable else None)
    monkeypatch.setattr(trt_plugin, "_LOADED", {})
    return inst
