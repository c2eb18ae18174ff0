"""The TensorRT code and its fakes against NVIDIA's real Python bindings, without TensorRT, a GPU or CUDA.

NVIDIA's `tensorrt-cu12-bindings` wheels hold the pybind11 extension alone; it imports once libnvinfer,
libnvinfer_plugin and libnvonnxparser provide the nine C entry points it links to. tests/trt_api/bindings.py
downloads the wheels once (git-ignored cache), builds those stubs with `cc` and imports each version in a subprocess;
tests/trt_api/dump.py describes every class, method (pybind11 docstring signatures), property and enum member;
tests/trt_api/usage.py walks the package's TensorRT code with `ast` and lists the fakes' API.

Checked, per bindings version (10.3.0 = JetPack 6.2, 10.13.3.9, 11.4.0.106):
* every name in `compat.TRT_API` exists where it is required and is absent where it is marked 10.x-only (11.x
  dropped device_memory_size, create_execution_context_without_device_memory, get_plugin_creator);
* every TensorRT access of the code is in that table (the AST walk, no download needed), is of the right kind
  (called / read / assigned) and every call matches an overload of the real signature;
* the fakes (tests/fakes/trt.py) have the real names, kinds, parameter names and enum values, up to the listed
  11.x differences;
* facts the code relies on: set_optimization_profile_async raises RuntimeError ("Error in set optimization profile
  async.") in the bindings, deserialize_cuda_engine takes any buffer (a memory map) in every version.
Offline (a clean clone with no package index), the same checks run on the committed snapshots of the bindings'
description (tests/data/trt_api/<version>.json, written from the real bindings); online, the snapshots are also
checked against the live bindings. A missing name fails either way.
"""

import pytest

from cheers_deploy.trt import compat
from trt_api import bindings, usage

#: where the fakes (a TensorRT 10.3 stand-in) differ from the real bindings, by TensorRT major
KNOWN_FAKE_DIFFERENCES = {
    10: set(),
    11: {("missing", "NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"),        # removed: networks are explicit batch
         ("value", "NetworkDefinitionCreationFlag", "STRONGLY_TYPED"),          # 1 -> 0, deprecated and ignored
         ("missing", "IPluginRegistry", "get_plugin_creator")},                 # V2 creator lookup removed
}


@pytest.fixture(scope="module")
def code():
    return usage.code_uses()


@pytest.fixture(scope="module", params=bindings.VERSIONS)
def real(request):
    """The live bindings' description, else (no package index or no C compiler) the committed snapshot."""
    return bindings.describe_or_snapshot(request.param, usage.owners_needed())


# ---------------------------------------------------------------------------------------------------------------------
# the table covers the code (no download)
# ---------------------------------------------------------------------------------------------------------------------
def test_table_covers_every_tensorrt_access_of_the_code(code):
    uses, unresolved = code
    missing = sorted({f"{u.owner}.{u.member} ({u.where})" for u in uses
                      if u.member not in compat.TRT_API.get(u.owner, {})})
    assert not missing, f"TensorRT names used but not in compat.TRT_API: {missing}"
    assert sorted(set(unresolved)) == sorted(usage.STATED), "a getattr on a TensorRT object with a computed name: " \
                                                            "state its names in tests/trt_api/usage.py STATED"
    found = {(u.owner, u.member) for u in uses}
    # canaries: the conventions still match the code (a renamed variable would silently hide its uses)
    assert {("IExecutionContext", "execute_async_v3"), ("IExecutionContext", "set_optimization_profile_async"),
            ("Runtime", "deserialize_cuda_engine"), ("IPluginRegistry", "load_library"),
            ("ICudaEngine", "get_tensor_profile_shape"), ("tensorrt", "OnnxParser"), ("OnnxParser", "get_error"),
            ("IExecutionContext", "set_device_memory"), ("ICudaEngine", "device_memory_size")} <= found


def test_the_walk_finds_uses_the_table_lacks(tmp_path):
    src = tmp_path / "snippet.py"
    src.write_text("def f(trt, path):\n"
                   "    runtime = trt.Runtime(None)\n"
                   "    eng = runtime.deserialize_cuda_engine(path)\n"
                   "    eng.no_such_property\n"
                   "    for name in ('a_method', 'b_method'):\n"
                   "        fn = getattr(eng, name, None)\n"
                   "        fn(1, x=2)\n"
                   "    eng.context_thing = 3\n")
    uses, _ = usage.code_uses([src])
    got = {(u.owner, u.member, u.how, u.npos, u.kwargs) for u in uses}
    assert ("ICudaEngine", "no_such_property", "read", 0, ()) in got
    assert {("ICudaEngine", "a_method", "call", 1, ("x",)), ("ICudaEngine", "b_method", "call", 1, ("x",))} <= got
    assert ("ICudaEngine", "context_thing", "write", 0, ()) in got
    assert ("tensorrt", "Runtime", "call", 1, ()) in got


# ---------------------------------------------------------------------------------------------------------------------
# against the real bindings
# ---------------------------------------------------------------------------------------------------------------------
def test_real_bindings_have_every_name_the_code_uses(real, code):
    uses, _ = code
    problems = usage.check_table(real) + usage.check_calls(real, uses)
    assert not problems, f"TensorRT {real['version']}:\n" + "\n".join(problems)


def test_the_guard_fails_on_a_missing_name_or_a_wrong_call(real, code):
    table = {k: dict(v) for k, v in compat.TRT_API.items()}
    table["ICudaEngine"]["get_binding_index"] = compat.ALL             # removed in 10.0
    table["IExecutionContext"]["execute_async_v2"] = compat.ALL        # removed in 10.0
    problems = usage.check_table(real, table)
    assert any("ICudaEngine.get_binding_index: missing" in p for p in problems)
    assert any("IExecutionContext.execute_async_v2: missing" in p for p in problems)
    bad = [usage.Use("x.py:1", "IExecutionContext", "set_device_memory", "call", 1),          # needs (memory, size)
           usage.Use("x.py:2", "ICudaEngine", "num_io_tensors", "call", 0),                   # a property
           usage.Use("x.py:3", "ICudaEngine", "get_tensor_name", "read"),                     # a method
           usage.Use("x.py:4", "ICudaEngine", "num_io_tensors", "write"),                     # read-only
           usage.Use("x.py:5", "IExecutionContext", "set_input_shape", "call", 1, ("shapes",))]
    assert len(usage.check_calls(real, bad)) == len(bad)


def test_fakes_match_the_real_bindings(real):
    major = compat.version_tuple(real["version"])[0]
    diffs = {p[:3] for p in usage.check_fakes(real)}
    details = [p for p in usage.check_fakes(real) if p[:3] not in KNOWN_FAKE_DIFFERENCES[major]]
    assert diffs == KNOWN_FAKE_DIFFERENCES[major], f"TensorRT {real['version']}: {details}"


def test_version_differences_the_code_handles(real):
    major = compat.version_tuple(real["version"])[0]
    engine = real["owners"]["ICudaEngine"]
    assert "device_memory_size_v2" in engine                                 # what the code asks for first
    assert ("device_memory_size" in engine) == ("create_execution_context_without_device_memory" in engine) \
        == ("get_plugin_creator" in real["owners"]["IPluginRegistry"]) == (major < 11)
    flags = real["owners"]["NetworkDefinitionCreationFlag"]
    assert "STRONGLY_TYPED" in flags and ("EXPLICIT_BATCH" in flags) == (major < 11)
    assert compat.strongly_typed_flag(_Flags(flags)) == 1 << flags["STRONGLY_TYPED"]["value"]
    # set_device_memory(memory, size) and USER_MANAGED contexts in every version
    sd = real["owners"]["IExecutionContext"]["set_device_memory"]["signatures"]
    assert [n for n, _ in usage.parse_signature(sd[0])] == ["memory", "size"]
    assert "USER_MANAGED" in real["owners"]["ExecutionContextAllocationStrategy"]


class _Flags:
    """A `trt` stand-in whose NetworkDefinitionCreationFlag has the real members (for strongly_typed_flag)."""

    def __init__(self, flags):
        self.NetworkDefinitionCreationFlag = type("F", (), {k: v["value"] for k, v in flags.items()
                                                            if v["kind"] == "member"})


def test_profile_selection_raises_runtime_error_in_the_bindings(real):
    """trt_backend.py catches RuntimeError around set_optimization_profile_async: the bindings wrap the C++ bool in
    PY_ASSERT_RUNTIME_ERROR(..., "Error in set optimization profile async.") and return True otherwise."""
    assert "Error in set optimization profile async." in real["facts"]["strings"]
    sigs = real["owners"]["IExecutionContext"]["set_optimization_profile_async"]["signatures"]
    assert [n for n, _ in usage.parse_signature(sigs[0])] == ["profile_index", "stream_handle"]


def test_deserialize_takes_any_buffer(real):
    """compat.deserialize_engine hands a memoryview of a memory map to the `serialized_engine: buffer` overload
    (every version); the stream-reader overloads differ (IStreamReader on 10.x, IStreamReaderV2 from 10.13)."""
    sigs = real["owners"]["Runtime"]["deserialize_cuda_engine"]["signatures"]
    params = [usage.parse_signature(s) for s in sigs]
    assert [("serialized_engine", False)] in params
    assert any("buffer" in s.lower() for s in sigs)


def test_stubs_provide_exactly_what_the_extension_imports(real):
    wanted = {s for syms in bindings.STUB_SYMBOLS.values() for s in syms}
    assert wanted == set(real["facts"]["imports"])
    major = compat.version_tuple(real["version"])[0]
    assert set(real["facts"]["needed"]) == {f"{lib}.so.{major}" for lib in bindings.STUB_SYMBOLS}


@pytest.mark.parametrize("version", bindings.VERSIONS)
def test_the_snapshot_is_what_the_real_bindings_say(version):
    """tests/data/trt_api/<version>.json equals a fresh description of the real wheel (when it can be had here)."""
    try:
        live = bindings.describe(version, usage.owners_needed())
    except bindings.Unavailable as exc:
        pytest.skip(f"the snapshot is used as is: NVIDIA's TensorRT bindings {version} unavailable here ({exc})")
    snap = bindings.load_snapshot(version, usage.owners_needed())
    assert snap["version"] == live["version"] and snap["facts"] == live["facts"]
    assert snap["owners"] == {k: live["owners"][k] for k in snap["owners"]}, \
        "stale snapshot: run `python tests/trt_api/bindings.py --write-snapshots`"

