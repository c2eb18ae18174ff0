"""The TensorRT layer: engine paths, compatibility refusal, profiles from the manifest, `cheers-deploy build`
errors, and the build -> TrtBackend -> pipeline path.

* Tests marked `trt` need TensorRT (+ Polygraphy, cuda-python and a CUDA GPU): they skip with the reason when it
  is absent and run when it is present (`pytest.importorskip("tensorrt")`).
* Everything else runs here. The build orchestration and the backend's bookkeeping (contexts per profile,
  shared activation arena, device KV cache written by position, CUDA-graph capture/replay, logits reuse) also run
  end to end against `FakeTrt` + `FakePolygraphy` (engines that execute the exported graphs with ONNX Runtime,
  reading and writing the bound addresses) on `FakeCudart` host memory, and must equal the ort backend.
"""
import copy
import ctypes
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy import cli
from cheers_deploy.trt import layout as tl
from cheers_deploy import constants as C
from cheers_deploy.trt import plugin as trt_plugin
from cheers_deploy.build import engines as eb
from cheers_deploy.trt import compat
from cheers_deploy.errors import CheckpointError, InputError, MissingDependencyError
from cheers_deploy.export.specs import graph_specs
from cheers_deploy.trt import device_memory as dm

from fakes.cuda import FakeCudart  # noqa: E402  (tests/ is on sys.path)

IDENT = {"tensorrt": "10.3.0.30", "gpu": "Fake Orin", "compute_capability": "8.7"}


# =====================================================================================================================
# helpers: a minimal exported-looking workdir (no torch) and the real tiny export
# =====================================================================================================================
def _fake_workdir(tmp_path, tiny_config, files=True) -> Path:
    """manifest.json written from the GraphSpecs (what export_all writes, minus provenance) + empty graph files."""
    wd = tmp_path / "wd"
    wd.mkdir()
    specs = graph_specs(tiny_config, 64, batch_max=2, max_context=128)
    graphs = {n: dict(s.to_manifest(), file=f"{n}.onnx", external_data=None) for n, s in specs.items()}
    man = {"format": "cheers-deploy-manifest/1", "precision": "fp32", "graphs": graphs, "max_context": 128,
           "config": tiny_config.to_dict(), "image": {"resolution": 64, "tokens_per_image": 4},
           "cache": {"layout": "static-buffer/new-entries"}}
    (wd / "manifest.json").write_text(json.dumps(man))
    if files:
        for n in graphs:
            (wd / f"{n}.onnx").write_bytes(b"")
    return wd


@pytest.fixture(scope="module")
def tiny_workdir(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("torch")
    from test_export import export_tiny

    return export_tiny(tiny_ckpt, tmp_path_factory.getbasetemp())


def _linked_copy(src: Path, dst: Path) -> Path:
    """A private workdir that shares the (read-only) graph files: engines written into it stay private."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            if f.name == "manifest.json":
                shutil.copy2(f, dst / f.name)
            else:
                os.symlink(f, dst / f.name)
    return dst


# =====================================================================================================================
# engine path keying
# =====================================================================================================================
def test_engine_paths_are_keyed_by_precision_version_and_arch(tmp_path):
    d = tl.engine_dir(tmp_path, "fp16", "10.3.0.30", "8.7")
    assert d == tmp_path / "engines" / "fp16" / "trt10.3.0.30" / "sm87"
    assert tl.plan_path(tmp_path, "int8", "10.13.3.9", "11.0", "backbone") == \
        tmp_path / "engines" / "int8" / "trt10.13.3.9" / "sm110" / "backbone.plan"
    assert tl.version_key("10.13.0.35+cuda13") == "trt10.13.0.35_cuda13"
    assert C.sm_key("8.9") == "sm89" and C.sm_key("12.1") == "sm121"
    with pytest.raises(InputError):
        C.sm_key("87")
    with pytest.raises(InputError, match="--precision"):
        tl.engine_dir(tmp_path, "fp8", "10.3", "8.7")


def test_version_helpers():
    assert compat.version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert compat.version_tuple("11.0.0a1") == (11, 0, 0)
    assert compat.trt_major("10.13.3.9") == 10


# =====================================================================================================================
# compatibility refusal (fake identities)
# =====================================================================================================================
def _em(**kw):
    em = {"format": C.ENGINE_FORMAT, "precision": "fp16", "tensorrt": "10.3.0.30",
          "gpu": {"name": "Fake Orin", "compute_capability": "8.7"}, "engines": {}}
    em.update(kw)
    return em


def test_compat_same_machine_is_fine():
    assert tl.compat_differences(_em(), IDENT) == []
    tl.check_engine_compat(_em(), IDENT)


@pytest.mark.parametrize("runtime,needle", [
    (dict(IDENT, tensorrt="10.13.3.9"), "TensorRT 10.3.0.30 (this machine runs TensorRT 10.13.3.9"),
    (dict(IDENT, compute_capability="11.0", gpu="NVIDIA Thor"), "compute capability 8.7 (Fake Orin) (this GPU: 11.0"),
    (dict(IDENT, gpu="Other Orin"), "GPU 'Fake Orin' (this GPU: 'Other Orin'"),
])
def test_compat_refuses_naming_what_differs(runtime, needle):
    with pytest.raises(CheckpointError) as exc:
        tl.check_engine_compat(_em(), runtime, workdir="W", precision="fp16")
    msg = str(exc.value)
    assert needle in msg and "cheers-deploy build --workdir W --precision fp16" in msg and "\n" not in msg


def test_compat_lists_every_difference_and_allows_same_arch_other_model():
    diffs = tl.compat_differences(_em(), {"tensorrt": "11.0.0", "gpu": "B", "compute_capability": "9.0"})
    assert len(diffs) == 2
    assert tl.compat_differences(_em(), dict(IDENT, gpu="Other Orin"), allow_other_gpu=True) == []


def test_find_engine_dir(tmp_path):
    with pytest.raises(CheckpointError, match="has no fp16 TensorRT engines: build them"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    other = tl.engine_dir(tmp_path, "fp16", "10.13.3.9", "11.0")
    other.mkdir(parents=True)
    tl.write_engine_manifest(other, _em(tensorrt="10.13.3.9", gpu={"name": "Thor", "compute_capability": "11.0"}))
    with pytest.raises(CheckpointError) as exc:
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    assert "TensorRT 10.13.3.9" in str(exc.value) and "compute capability 11.0 (Thor)" in str(exc.value)
    mine = tl.engine_dir(tmp_path, "fp16", IDENT["tensorrt"], IDENT["compute_capability"])
    mine.mkdir(parents=True)
    tl.write_engine_manifest(mine, _em(gpu={"name": "Another Orin", "compute_capability": "8.7"}))
    with pytest.raises(CheckpointError, match="GPU 'Another Orin'"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)
    assert tl.find_engine_dir(tmp_path, "fp16", IDENT, allow_other_gpu=True) == mine
    (mine / C.ENGINE_MANIFEST).write_text("{}")
    with pytest.raises(CheckpointError, match="engine manifest format"):
        tl.find_engine_dir(tmp_path, "fp16", IDENT)


# =====================================================================================================================
# profiles and sources from the manifest
# =====================================================================================================================
def test_profiles_derived_from_the_manifest(tmp_path, tiny_config):
    from cheers_deploy.manifest import Manifest

    wd = _fake_workdir(tmp_path, tiny_config)
    man = Manifest.load(wd)
    bb = eb.profiles_for(man.graph("backbone"), "backbone")
    assert [m for m, _ in bb] == ["prefill", "decode", "image_step"]
    n, m = 128, 4                                                   # max_context, tokens per image
    prefill, decode, image = (dict(p) for _, p in bb)
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, m + 64, 64), (2, n - 1, 64))
    assert decode["attention_mask"] == ((1, 1, 1, n + 1), (2, 1, 1, n + 1), (2, 1, 1, n + 1))
    assert image["position_ids"] == ((1, m), (2, m), (2, m))
    assert image["past_key_values.0.key"] == ((1, 2, n, 16), (2, 2, n, 16), (2, 2, n, 16))   # P pinned to n
    head = eb.profiles_for(man.graph("cfm_head"), "cfm_head")
    assert [m for m, _ in head] == ["default"] and head[0][1]["t"] == ((1,), (2,), (2,))

    broken = copy.deepcopy(man.graph("cfm_head"))
    del broken["profiles"]["default"]["t"]
    with pytest.raises(CheckpointError, match="no shapes for input 't'"):
        eb.profiles_for(broken, "cfm_head")
    broken = copy.deepcopy(man.graph("cfm_head"))
    broken["profiles"]["default"]["t"] = [[2], [1], [2]]
    with pytest.raises(CheckpointError, match="not ordered"):
        eb.profiles_for(broken, "cfm_head")
    broken = copy.deepcopy(man.graph("vae_decoder"))
    for k in range(3):
        broken["profiles"]["default"]["latent"][k][1] = 7             # a static dim (channels) changed
    with pytest.raises(CheckpointError, match="static"):
        eb.profiles_for(broken, "vae_decoder")


def test_graph_source_per_precision(tmp_path, tiny_config):
    from cheers_deploy.manifest import Manifest

    wd = _fake_workdir(tmp_path, tiny_config)
    man = Manifest.load(wd)
    assert tl.graph_source(man, "backbone", "fp32") == (wd / "backbone.onnx", None)
    with pytest.raises(CheckpointError) as exc:
        tl.graph_source(man, "backbone", "fp16")
    assert "cheers-deploy calibrate" in str(exc.value) and "--precision fp32" in str(exc.value)
    with pytest.raises(CheckpointError, match="calibration data"):
        tl.graph_source(man, "backbone", "int8")
    man.graph("backbone")["precisions"] = {"int8": {"file": "int8/backbone.onnx", "external_data": None}}
    with pytest.raises(CheckpointError, match="missing backbone.onnx"):
        tl.graph_source(man, "backbone", "int8")
    (wd / "int8").mkdir()
    (wd / "int8" / "backbone.onnx").write_bytes(b"")
    assert tl.graph_source(man, "backbone", "int8") == (wd / "int8" / "backbone.onnx", None)


def test_parse_error_message_names_the_node():
    errs = [{"node": 12, "name": "/hi_gate/CheersGatedResidual", "op": "CheersGatedResidual",
             "desc": "Plugin not found, are the plugin name, version, and namespace correct?"},
            {"node": 13, "name": "x", "op": "Y", "desc": "z"}]
    msg = eb.describe_parse_errors(errs, Path("cfm_head.onnx"))
    assert "rejected node '/hi_gate/CheersGatedResidual' (op CheersGatedResidual) of cfm_head.onnx" in msg
    assert "--plugin-lib" in msg and "+1 more" in msg and "\n" not in msg
    assert "could not read" in eb.describe_parse_errors([], Path("a.onnx"))


# =====================================================================================================================
# `cheers-deploy build` errors (one line, exit code 2)
# =====================================================================================================================
def _build_cli(capsys, *argv):
    rc = cli.main(["build", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_build_without_tensorrt_is_one_clear_line(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)             # `import tensorrt` raises ImportError
    wd = _fake_workdir(tmp_path, tiny_config)
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32")
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: TensorRT is not installed: ")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        compat.import_tensorrt()


def test_build_errors_before_tensorrt(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    wd = _fake_workdir(tmp_path, tiny_config)
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp16")
    assert rc == 2 and len(err.splitlines()) == 1 and "cheers-deploy calibrate" in err
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32", "--plugin-lib", str(tmp_path / "no.so"))
    assert rc == 2 and "--plugin-lib" in err and "not found" in err
    rc, err = _build_cli(capsys, "--workdir", str(tmp_path / "missing"), "--precision", "fp32")
    assert rc == 2 and "workdir not found" in err
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32", "--graphs", "nope")
    assert rc == 2 and "nope" in err
    (wd / "vae_decoder.onnx").unlink()
    rc, err = _build_cli(capsys, "--workdir", str(wd), "--precision", "fp32")
    assert rc == 2 and "missing vae_decoder.onnx" in err


def test_build_script_is_the_same_command(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
    try:
        import build_engines
    finally:
        sys.path.pop(0)
    wd = _fake_workdir(tmp_path, tiny_config)
    assert build_engines.main(["--workdir", str(wd), "--precision", "fp32"]) == 2
    assert capsys.readouterr().err.startswith("error: TensorRT is not installed")


def test_trt_backend_without_tensorrt(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _fake_workdir(tmp_path, tiny_config)
    for f in ("embed_tokens.npy", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (wd / f).write_bytes(b"")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        TrtBackend(wd)


# =====================================================================================================================
# fake TensorRT / Polygraphy: engines that run the graphs with ONNX Runtime on the bound addresses
# =====================================================================================================================
class _DT:
    def __init__(self, name):
        self.name = name


_ORT_TO_DT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(bool)": "BOOL",
              "tensor(int32)": "INT32"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "BOOL": np.bool_, "INT32": np.int32}


class FakeEngine:
    def __init__(self, trt, plan: dict):
        import onnx
        import onnxruntime as ort

        from cheers_deploy.build import surgery

        self.trt, self.plan = trt, plan
        model = onnx.load(plan["onnx"])
        self.fused = surgery.count_plugin_nodes(model)
        if self.fused:                                   # the "plugin": its reference function, run by ORT
            surgery.attach_reference_function(model)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.io = [(i.name, "INPUT", i) for i in self.sess.get_inputs()] + \
                  [(o.name, "OUTPUT", o) for o in self.sess.get_outputs()]
        self.profiles = plan["profiles"]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = len(self.profiles)
        self.device_memory_size_v2 = 4096 * (1 + len(self.profiles))

    def _find(self, name):
        return next(x for x in self.io if x[0] == name)

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self._find(name)[1]

    def get_tensor_dtype(self, name):
        return _DT(_ORT_TO_DT[self._find(name)[2].type])

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self._find(name)[2].shape)

    def get_tensor_profile_shape(self, name, index):
        return [tuple(s) for s in self.profiles[index][name]]

    def create_execution_context(self, strategy=None):
        assert strategy == "USER_MANAGED"
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.e = engine
        self.shapes, self.addr, self.profile, self.memory = {}, {}, None, None

    def set_device_memory(self, ptr, size):
        assert size >= self.e.device_memory_size_v2 and ptr
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, index, stream):
        assert self.memory is not None, "device memory must be set before the profile (user-managed context)"
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        mn, _, mx = self.e.profiles[self.profile][name]
        ok = len(shape) == len(mn) and all(a <= d <= b for a, d, b in zip(mn, shape, mx))
        if ok:
            self.shapes[name] = tuple(int(d) for d in shape)
        return ok

    def _bindings(self):
        dims = {}
        for i in self.e.sess.get_inputs():
            for d, v in zip(i.shape, self.shapes[i.name]):
                if isinstance(d, str):
                    dims[d] = v
        return dims

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        dims = self._bindings()
        return tuple(d if isinstance(d, int) else dims.get(d, -1) for d in self.e._find(name)[2].shape)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)
        return True

    def execute_async_v3(self, stream):
        e = self.e

        def run():
            feed = {}
            for i in e.sess.get_inputs():
                dt = np.dtype(_NP[_ORT_TO_DT[i.type]])
                shape = self.shapes[i.name]
                n = int(np.prod(shape)) * dt.itemsize
                raw = ctypes.string_at(self.addr[i.name], n)
                feed[i.name] = np.frombuffer(raw, dt).reshape(shape).copy()
            outs = e.sess.run(None, feed)
            for o, val in zip(e.sess.get_outputs(), outs):
                assert tuple(val.shape) == tuple(self.get_tensor_shape(o.name)), (o.name, val.shape)
                val = np.ascontiguousarray(val)
                ctypes.memmove(self.addr[o.name], val.ctypes.data, val.nbytes)

        FakeTrt.cudart.enqueue(stream, run)
        FakeTrt.executions += 1
        return True


class _Parser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path):
        import onnx

        self.network.path = str(path)
        model = onnx.load(str(path), load_external_data=False)
        for k, n in enumerate(model.graph.node):
            bad = n.op_type == "NoSuchOp" or (n.op_type == "CheersGatedResidual" and not FakeTrt.plugin_loaded)
            if bad:
                desc = "No importer registered for op: NoSuchOp" if n.op_type == "NoSuchOp" else \
                    "Plugin not found, are the plugin name, version, and namespace correct?"
                self.errors.append(_PErr(k, n.name, n.op_type, desc))
        return not self.errors


class _PErr:
    def __init__(self, k, name, op, desc):
        self._k, self._name, self._op, self._desc = k, name, op, desc

    def node(self):
        return self._k

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def desc(self):
        return self._desc

    def code(self):
        return "UNSUPPORTED_NODE"


class FakeTrt:
    __version__ = IDENT["tensorrt"]
    cudart = None
    executions = 0
    plugin_loaded = False

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "USER_MANAGED"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class MemoryPoolType:
        WORKSPACE = 0

    OnnxParser = _Parser

    @staticmethod
    def init_libnvinfer_plugins(logger, ns):
        return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return FakeEngine(FakeTrt, json.loads(bytes(blob).decode()))


class _Network:
    def __init__(self, strongly_typed):
        self.strongly_typed, self.path = strongly_typed, None


class FakePolygraphy:
    builds = []

    class Profile(dict):
        def add(self, name, mn, opt, mx):
            self[name] = (tuple(mn), tuple(opt), tuple(mx))
            return self

    class CreateConfig:
        def __init__(self, **kw):
            self.kw = kw

    @staticmethod
    def create_network(strongly_typed=False):
        return object(), _Network(strongly_typed)

    @staticmethod
    def engine_bytes_from_network(loader, config=None, save_timing_cache=None):
        _, network, _ = loader()
        assert network.strongly_typed
        FakePolygraphy.builds.append((Path(network.path).name, config.kw))
        if save_timing_cache:
            Path(save_timing_cache).write_bytes(b"timing")
        profiles = [{k: [list(s) for s in v] for k, v in p.items()} for p in config.kw["profiles"]]
        return json.dumps({"onnx": network.path, "profiles": profiles}).encode()


@pytest.fixture
def fakes(monkeypatch):
    """FakeTrt + FakePolygraphy + FakeCudart behind compat (what build.py and trt_backend.py import)."""
    cud = FakeCudart(name=IDENT["gpu"].encode(), cc=(8, 7))
    prev = dm.use_runtime(cud)
    FakeTrt.cudart, FakeTrt.executions, FakeTrt.plugin_loaded = cud, 0, False
    FakePolygraphy.builds = []
    monkeypatch.setattr(compat, "import_tensorrt", lambda: FakeTrt)
    monkeypatch.setattr(compat, "import_polygraphy_trt", lambda: FakePolygraphy)
    monkeypatch.setattr(compat, "trt_logger", lambda: None)
    monkeypatch.setattr(compat, "runtime_identity", lambda device=0: dict(IDENT))
    monkeypatch.setattr(compat, "gpu_info", lambda device=0: {"name": IDENT["gpu"], "compute_capability": "8.7",
                                                              "sm": "sm87", "total_memory": 8 << 30})
    loaded = []

    def fake_load(path, check_creator=True):
        if not Path(path).is_file():
            raise InputError(f"plugin library not found: {path}")
        loaded.append(Path(path))
        FakeTrt.plugin_loaded = True
        return Path(path)

    monkeypatch.setattr(compat, "load_plugin_library", fake_load)
    yield {"cudart": cud, "loaded": loaded}
    dm.use_runtime(prev)


# =====================================================================================================================
# fake end to end: build -> load -> pipeline == ort
# =====================================================================================================================
def _pipe_pair(wd, trt_backend):
    from cheers_deploy.processor import Processor
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.pipeline import Pipeline
    from cheers_deploy.runtime.workdir import open_workdir

    ort_pipe = open_workdir(Pipeline, wd, backend="ort", cache_len="max_context")
    proc = ort_pipe.processor
    trt_pipe = Pipeline(trt_backend, proc.tokenizer, proc, ort_pipe.config)
    assert isinstance(ort_pipe.backend, OrtBackend) and isinstance(proc, Processor)
    return ort_pipe, trt_pipe


def test_fake_build_then_pipeline_equals_ort(tiny_workdir, tmp_path, fakes):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    logs = []
    em = eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    d = tl.engine_dir(wd, "fp32", IDENT["tensorrt"], "8.7")
    assert (d / C.ENGINE_MANIFEST).is_file() and (d / eb.TIMING_CACHE).is_file()
    assert sorted(em["engines"]) == sorted(C.GRAPH_NAMES) and em["plugin"] is None
    assert [p["name"] for p in em["engines"]["backbone"]["profiles"]] == ["prefill", "decode", "image_step"]
    assert em["engines"]["backbone"]["num_profiles"] == 3 and em["engines"]["cfm_head"]["num_profiles"] == 1
    names = {t["name"] for t in em["engines"]["backbone"]["inputs"]}
    assert {"inputs_embeds", "position_ids", "attention_mask", "past_key_values.0.key"} <= names
    # Polygraphy got the manifest's profiles, a timing cache and tf32 off for the fp32 parity engines
    bb_cfg = next(kw for f, kw in FakePolygraphy.builds if f == "backbone.onnx")
    assert len(bb_cfg["profiles"]) == 3 and bb_cfg["tf32"] is False
    assert bb_cfg["profiles"][1]["inputs_embeds"][0] == (1, 1, 64)

    # idempotent: nothing rebuilt; a changed source or --force rebuilds
    FakePolygraphy.builds = []
    eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert FakePolygraphy.builds == [] and sum("up to date" in x for x in logs) == 5
    eb.build_engines(wd, "fp32", fuse=False, force=True, graphs=["vae_encoder"], log=logs.append)
    assert [f for f, _ in FakePolygraphy.builds] == ["vae_encoder.onnx"]

    be = TrtBackend(wd, precision="fp32", trt_module=FakeTrt, identity=IDENT)
    assert set(be.engines["backbone"].contexts) == {"prefill", "decode", "image_step"}
    assert be.arena.nbytes == max(e.engine.device_memory_size_v2 for e in be.engines.values())
    ctx_mem = {c.memory[0] for e in be.engines.values() for c in e.contexts.values()}
    assert ctx_mem == {be.arena.ptr}                                   # one shared activation arena

    ort_pipe, trt_pipe = _pipe_pair(wd, be)
    rng = np.random.default_rng(11)
    noise = rng.standard_normal((128, 4, 4), dtype=np.float32)
    kw = dict(steps=4, cfg_scale=3.0, alpha=0.6, noise=noise, max_new_tokens=3, seed=2)
    g_o = ort_pipe.generate("A green triangle next to a blue square.", **kw)
    g_t = trt_pipe.generate("A green triangle next to a blue square.", **kw)
    assert g_t.token_ids == g_o.token_ids
    assert np.abs(g_t.latent - g_o.latent).max() <= 1e-5 * np.abs(g_o.latent).max()
    assert np.abs(g_t.image.astype(int) - g_o.image.astype(int)).max() <= 1
    stats = be.cuda_graph_stats()
    assert stats["backbone/image_step"]["captured"] and stats["cfm_head/default"]["captured"]
    assert stats["vision_tokenizer/default"]["captured"]
    assert fakes["cudart"].calls["graph_launch"] >= 3 * (4 - 2)     # steps 3.. replay three stage graphs

    a_o = ort_pipe.answer(np.full((64, 64, 3), 200, np.uint8), "What is this?", max_new_tokens=6)
    a_t = trt_pipe.answer(np.full((64, 64, 3), 200, np.uint8), "What is this?", max_new_tokens=6)
    assert a_t.token_ids == a_o.token_ids

    e_o = ort_pipe.edit(np.full((64, 64, 3), 90, np.uint8), "make it red", steps=3, cfg_scale=2.0, noise=noise,
                        max_new_tokens=2)
    e_t = trt_pipe.edit(np.full((64, 64, 3), 90, np.uint8), "make it red", steps=3, cfg_scale=2.0, noise=noise,
                        max_new_tokens=2)
    assert np.abs(e_t.latent - e_o.latent).max() <= 1e-5 * np.abs(e_o.latent).max()


def test_fake_backend_cache_and_logits(tiny_workdir, tmp_path, fakes):
    """Backend level: KV entries land at their positions; decode logits are the engine's, equal to ORT's."""
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, log=lambda s: None)
    be = TrtBackend(wd, trt_module=FakeTrt, identity=IDENT)             # precision picked: the only one built
    assert be.precision == "fp32"
    ob = OrtBackend(wd, cache_len="max_context")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 5, 64)).astype(np.float32)
    c_t, c_o = be.new_cache(2, 32), ob.new_cache(2, 32)
    mask = np.tril(np.ones((5, 5), bool))
    h_t = be.backbone(c_t, emb, 0, mask)
    h_o = ob.backbone(c_o, emb, 0, mask)
    assert np.allclose(be.to_numpy(h_t), h_o, atol=1e-6)
    for step in range(3):                                              # decode at positions 5, 6, 7
        e1 = rng.standard_normal((2, 1, 64)).astype(np.float32)
        h_t = be.backbone(c_t, e1, 5 + step, None)
        h_o = ob.backbone(c_o, e1, 5 + step, None)
        l_t = be.logits(h_t[:, -1])
        assert np.allclose(l_t, ob.logits(h_o[:, -1]), atol=1e-5)
    for i in range(be.num_layers):
        assert np.array_equal(c_t.k[i].to_numpy()[:, :, :8], c_o.k[i][:, :, :8])
        assert not c_t.v[i].to_numpy()[:, :, 8:].any()
    # an older hidden state falls back to the host projection (same numbers)
    assert np.allclose(be.logits(be.to_numpy(h_t)[:, -1]), l_t, atol=1e-4)
    with pytest.raises(InputError, match="overflow"):
        be.backbone(c_t, emb, be.max_context - 2, mask)
    with pytest.raises(InputError, match="context"):
        be.new_cache(1, be.max_context + 1)
    with pytest.raises(InputError, match="largest batch"):
        be.new_cache(3, 8)


def test_fake_plugin_build_fuses_cfm_head(tiny_workdir, tmp_path, fakes, monkeypatch):
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    lib = tmp_path / "libcheers_plugins.so"
    lib.write_bytes(b"\x7fELF fake")
    logs = []
    em = eb.build_engines(wd, "fp32", plugin_lib=lib, graphs=["cfm_head", "backbone"], log=logs.append)
    assert fakes["loaded"] == [lib.resolve()]
    assert em["plugin"]["path"] == str(lib.resolve()) and em["plugin"]["sha256"]
    assert em["engines"]["cfm_head"]["fused_gates"] == 1 and "fused_gates" not in em["engines"]["backbone"]
    assert em["engines"]["cfm_head"]["built_from"].endswith("fused/cfm_head.onnx")
    assert any("1 hi gate(s) fused" in x for x in logs)

    be = TrtBackend(wd, "fp32", graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT, plugin_lib=lib)
    assert fakes["loaded"][-1] == lib.resolve()
    ob = OrtBackend(wd, graphs=["cfm_head"])
    rng = np.random.default_rng(4)
    hid = rng.standard_normal((2, 4, 64)).astype(np.float32)
    pe = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.asarray([0.3, 0.3], np.float32)
    v_t, v_o = be.cfm_head(hid, pe, t), ob.cfm_head(hid, pe, t)
    assert np.abs(v_t - v_o).max() <= 1e-5 * np.abs(v_o).max()

    # the fused engine needs the plugin at load time: a clear error without a library
    lib.unlink()
    monkeypatch.setattr(compat, "default_plugin_library", lambda: None)
    with pytest.raises(CheckpointError, match="uses the CheersGatedResidual plugin"):
        TrtBackend(wd, "fp32", graphs=["cfm_head"], trt_module=FakeTrt, identity=IDENT)


def test_fake_build_parser_error_names_node(tiny_workdir, tmp_path, fakes):
    import onnx
    from onnx import helper

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    # without the plugin loaded, a fused graph is rejected by the parser, naming the plugin node
    from cheers_deploy.build import surgery

    os.unlink(wd / "cfm_head.onnx")
    assert surgery.fuse_gated_residual(tiny_workdir / "cfm_head.onnx", wd / "cfm_head.onnx") == 1
    with pytest.raises(eb.ParseError) as exc:
        eb.build_engines(wd, "fp32", fuse=False, graphs=["cfm_head"], log=lambda s: None)
    assert "CheersGatedResidual" in str(exc.value) and "--plugin-lib" in str(exc.value)
    # an op TensorRT does not know: the node is named
    model = onnx.load(str(tiny_workdir / "vae_decoder.onnx"))
    model.graph.node.insert(0, helper.make_node("NoSuchOp", [model.graph.input[0].name], ["unused"], name="odd_node",
                                                domain="custom"))
    os.unlink(wd / "vae_decoder.onnx")
    onnx.save(model, str(wd / "vae_decoder.onnx"))
    with pytest.raises(eb.ParseError, match="rejected node 'odd_node' \\(op NoSuchOp\\)"):
        eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_decoder"], log=lambda s: None)


def test_fake_backend_refuses_other_machine_and_stale_engines(tiny_workdir, tmp_path, fakes):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_encoder", "vae_decoder"], log=lambda s: None)
    kw = dict(graphs=["vae_encoder", "vae_decoder"], trt_module=FakeTrt)
    with pytest.raises(CheckpointError) as exc:
        TrtBackend(wd, "fp32", identity=dict(IDENT, tensorrt="10.13.3.9"), **kw)
    assert "TensorRT 10.3.0.30 (this machine runs TensorRT 10.13.3.9" in str(exc.value)
    with pytest.raises(CheckpointError, match="compute capability 8.7"):
        TrtBackend(wd, "fp32", identity=dict(IDENT, compute_capability="8.9", gpu="RTX 4090"), **kw)
    with pytest.raises(CheckpointError, match="GPU 'Fake Orin'"):
        TrtBackend(wd, "fp32", identity=dict(IDENT, gpu="Jetson AGX Orin"), **kw)
    TrtBackend(wd, "fp32", identity=dict(IDENT, gpu="Jetson AGX Orin"), allow_other_gpu=True, **kw)
    with pytest.raises(CheckpointError, match="no engine for backbone"):
        TrtBackend(wd, "fp32", identity=IDENT, trt_module=FakeTrt, graphs=["backbone"])
    with pytest.raises(CheckpointError, match="no fp16 TensorRT engines"):
        TrtBackend(wd, "fp16", identity=IDENT, **kw)
    # copying the workdir keeps the engines valid (no mtime check) ...
    src = wd / "vae_encoder.onnx"
    real = src.resolve()
    src.unlink()
    shutil.copy(real, src)
    TrtBackend(wd, "fp32", identity=IDENT, **kw)
    # ... a re-exported graph (new hash in the manifest) makes its engine stale
    man = json.loads((wd / "manifest.json").read_text())
    man["graphs"]["vae_encoder"]["source_hash"] = "0" * 64
    (wd / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"'vae_encoder' \(vae_encoder.onnx\) changed after its engine was"):
        TrtBackend(wd, "fp32", identity=IDENT, **kw)
    # a deployment that deleted the ONNX files is not checked (fake engines still read them, so only the id here)
    from cheers_deploy.manifest import Manifest

    (wd / "vae_encoder.onnx").unlink()
    assert tl.source_id(Manifest.load(wd), "vae_encoder", "fp32") is None


def test_open_workdir_dispatches_to_trt(tiny_workdir, tmp_path, fakes, monkeypatch):
    from cheers_deploy.runtime import trt_backend
    from cheers_deploy.runtime.pipeline import Pipeline

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, log=lambda s: None)
    orig = trt_backend.TrtBackend.__init__

    def init(self, workdir, **kw):
        orig(self, workdir, trt_module=FakeTrt, identity=IDENT, **kw)

    monkeypatch.setattr(trt_backend.TrtBackend, "__init__", init)
    pipe = Pipeline.from_workdir(wd, backend="trt", precision="fp32")
    assert pipe.backend.name == "trt" and pipe.backend.precision == "fp32"
    out = pipe.chat("Hello there", max_new_tokens=3)
    assert len(out.token_ids) >= 1


# =====================================================================================================================
# real TensorRT (skipped without it; run on a machine with TensorRT, Polygraphy, cuda-python and a GPU)
# =====================================================================================================================
@pytest.fixture(scope="module")
def real_trt():
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT")
    pytest.importorskip("polygraphy", reason="needs Polygraphy (pip install polygraphy)")
    if not compat.cuda_available():
        pytest.skip("needs a CUDA GPU and cuda-python")
    return trt


def _plugin_or_skip():
    lib = trt_plugin.default_plugin_library()
    if lib is None or not lib.is_file():
        pytest.skip("needs the gated-residual plugin library (build engines/plugins/gated_residual, or set "
                    "CHEERS_TRT_PLUGIN)")
    return lib


@pytest.mark.trt
def test_real_build_and_generate_fp32(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    logs = []
    em = eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert em["tensorrt"] == real_trt.__version__ and em["engines"]["backbone"]["num_profiles"] == 3
    eb.build_engines(wd, "fp32", fuse=False, log=logs.append)
    assert sum("up to date" in x for x in logs) == 5
    be = TrtBackend(wd, "fp32")
    ort_pipe, trt_pipe = _pipe_pair(wd, be)
    noise = np.random.default_rng(11).standard_normal((128, 4, 4), dtype=np.float32)
    kw = dict(steps=4, cfg_scale=3.0, alpha=0.6, noise=noise, max_new_tokens=3, seed=2)
    g_o = ort_pipe.generate("A green triangle next to a blue square.", **kw)
    g_t = trt_pipe.generate("A green triangle next to a blue square.", **kw)
    assert g_t.token_ids == g_o.token_ids
    assert np.abs(g_t.latent - g_o.latent).max() <= 2e-3 * np.abs(g_o.latent).max()
    assert be.cuda_graph_stats()["backbone/image_step"]["captured"]


@pytest.mark.trt
def test_real_plugin_engine_matches_ort(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.ort_backend import OrtBackend
    from cheers_deploy.runtime.trt_backend import TrtBackend

    lib = _plugin_or_skip()
    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    em = eb.build_engines(wd, "fp32", plugin_lib=lib, graphs=["cfm_head"], log=lambda s: None)
    assert em["engines"]["cfm_head"]["fused_gates"] == 1
    be = TrtBackend(wd, "fp32", graphs=["cfm_head"], plugin_lib=lib)
    ob = OrtBackend(wd, graphs=["cfm_head"])
    rng = np.random.default_rng(4)
    hid = rng.standard_normal((2, 4, 64)).astype(np.float32)
    pe = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.asarray([0.3, 0.7], np.float32)
    v_t, v_o = be.cfm_head(hid, pe, t), ob.cfm_head(hid, pe, t)
    assert np.abs(v_t - v_o).max() <= 1e-3 * np.abs(v_o).max()


@pytest.mark.trt
def test_real_parser_error_names_node(real_trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    pg = compat.import_polygraphy_trt()
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    model = helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="odd_node")], "g",
                                                [vi("x")], [vi("y")]), opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(eb.ParseError, match="odd_node"):
        eb._network_loader(real_trt, pg, path)()


@pytest.mark.trt
def test_real_refuses_engines_of_another_version(real_trt, tiny_workdir, tmp_path):
    from cheers_deploy.runtime.trt_backend import TrtBackend

    wd = _linked_copy(tiny_workdir, tmp_path / "wd")
    eb.build_engines(wd, "fp32", fuse=False, graphs=["vae_encoder"], log=lambda s: None)
    d = next((wd / "engines" / "fp32").glob("*/*"))
    em = tl.read_engine_manifest(d)
    em["tensorrt"] = "9.9.9"
    tl.write_engine_manifest(d, em)
    with pytest.raises(CheckpointError, match="TensorRT 9.9.9"):
        TrtBackend(wd, "fp32", graphs=["vae_encoder"])
