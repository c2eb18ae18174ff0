"""`cheers-deploy triton` (docs/deploy-triton.md): the model repository it writes, the Python-backend models run with a
fake `triton_python_backend_utils`, and, marked `triton`, a real tritonserver (2.51, from the nvidia-pytriton wheel,
installed into a cache folder by cheers_deploy.triton.local) serving a repository of the bundled model on loopback:
images equal Pipeline.generate byte for byte (HTTP and gRPC), chat streams deltas that concatenate to the pipeline's
answer (gRPC stream, and HTTP generate_stream), 16 concurrent requests on 2 instances, /metrics counts, and a stop
that leaves nothing running."""

from __future__ import annotations

import http.client
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy.errors import CheckpointError, InputError
from cheers_deploy.fileio import sha256_file
from cheers_deploy.hub import bundled_workdir
from cheers_deploy.runtime.pipeline import Pipeline
from cheers_deploy.triton import python_model as pm
from cheers_deploy.triton.repository import (CHAT_MODEL, GENERATE_MODEL, REPOSITORY_FILE, RepositoryOptions,
                                             model_parameters, workdir_files, write_repository)

WORKDIR = bundled_workdir()
pytestmark = pytest.mark.skipif(WORKDIR is None, reason="the bundled model's graphs are not installed")
PROMPT = "a red circle on the left"
QUESTION = "what color is the circle?"
SAMPLED = "describe the picture"         # temperature 2, seed 3: a several-token answer from the bundled model


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_workdir(WORKDIR, backend="ort")


@pytest.fixture(scope="module")
def scene(pipe):
    return pipe.generate(PROMPT, seed=0).image


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_repository(WORKDIR, tmp_path_factory.mktemp("triton") / "repo", RepositoryOptions(instances=2))


@pytest.fixture(scope="session")
def model_config():
    """Triton's ModelConfig protobuf message (tritonclient's generated module), installed on first use as the live
    tests install it (a fresh environment has no tritonclient when tests are collected)."""
    from cheers_deploy.triton import local

    try:
        local.ensure_client()
        import tritonclient.grpc.model_config_pb2 as mc
    except (local.TritonUnavailable, ImportError) as exc:
        pytest.skip(f"tritonclient (its ModelConfig protobuf) is not installed and could not be: {exc}")
    from google.protobuf import text_format

    return lambda path: text_format.Parse(Path(path).read_text(), mc.ModelConfig())


# ------------------------------------------------------------------------------------------------ the repository
def test_layout_and_copy(repo):
    for m in (GENERATE_MODEL, CHAT_MODEL):
        assert (repo / m / "config.pbtxt").is_file()
        text = (repo / m / "1" / "model.py").read_text()
        cls = "GenerateModel" if m == GENERATE_MODEL else "ChatModel"
        assert f"from cheers_deploy.triton.python_model import {cls} as TritonPythonModel" in text
        assert sorted(p.name for p in (repo / m / "warmup").iterdir())
    files = workdir_files(WORKDIR)
    assert any(rel == "manifest.json" for rel, _ in files)
    for rel, src in files:
        gen, chat = repo / GENERATE_MODEL / "1" / "workdir" / rel, repo / CHAT_MODEL / "1" / "workdir" / rel
        assert sha256_file(gen) == sha256_file(src)
        assert os.stat(gen).st_ino == os.stat(chat).st_ino          # the second model links the first's copy
    summary = json.loads((repo / REPOSITORY_FILE).read_text())
    assert summary["workdir_mode"] == "copy" and summary["files"] == len(files)
    assert summary["options"]["instances"] == 2
    # staged and renamed: no temporary folder or file is left behind
    leftovers = [p for p in repo.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_configs_parse_as_triton_model_configs(repo, model_config):
    parse_config = model_config
    gen = parse_config(repo / GENERATE_MODEL / "config.pbtxt")
    chat = parse_config(repo / CHAT_MODEL / "config.pbtxt")
    for cfg, name in ((gen, GENERATE_MODEL), (chat, CHAT_MODEL)):
        assert cfg.name == name and cfg.backend == "python" and cfg.max_batch_size == 0
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, cfg.instance_group[0].KIND_CPU)]
        assert cfg.response_cache.enable is False
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 16
        assert cfg.parameters["workdir"].string_value == "workdir"
        assert cfg.parameters["backend"].string_value == "ort"
        assert len(cfg.model_warmup) == 1 and cfg.model_warmup[0].batch_size == 1
        for inp in cfg.model_warmup[0].inputs.values():
            if inp.input_data_file:
                assert (repo / name / "warmup" / inp.input_data_file).is_file()
    assert gen.model_transaction_policy.decoupled is False
    assert chat.model_transaction_policy.decoupled is True
    assert [i.name for i in gen.input] == ["prompt", "seed", "steps", "cfg_scale", "alpha"]
    assert [i.optional for i in gen.input] == [False, True, True, True, True]
    assert [o.name for o in gen.output] == ["image", "text", "stop_reason"]
    assert list(gen.output[0].dims) == [-1, -1, 3]
    assert [i.name for i in chat.input] == ["prompt", "messages", "image", "seed", "max_new_tokens", "temperature",
                                            "top_p"]
    assert all(i.optional for i in chat.input)


def test_gpu_instances_and_options(tmp_path, model_config):
    parse_config = model_config
    opts = RepositoryOptions(backend="trt", instances=3, gpus=[0, 1], precision="fp16", max_queue=0,
                             queue_timeout_s=2.5, warmup=False)
    write_repository(WORKDIR, tmp_path / "r", opts)
    cfg = parse_config(tmp_path / "r" / GENERATE_MODEL / "config.pbtxt")
    g = cfg.instance_group[0]
    assert (g.count, g.kind, list(g.gpus)) == (3, g.KIND_GPU, [0, 1])
    assert cfg.parameters["backend"].string_value == "trt"
    assert cfg.parameters["precision"].string_value == "fp16"
    pol = cfg.dynamic_batching.default_queue_policy
    assert (pol.max_queue_size, pol.default_timeout_microseconds, pol.allow_timeout_override) == (0, 2500000, True)
    assert len(cfg.model_warmup) == 0 and not (tmp_path / "r" / GENERATE_MODEL / "warmup").exists()


def test_native_graph_models_match_the_graphs(tmp_path, model_config):
    """--native-graphs (UNVERIFIED on a server here: the test server has only the Python backend): the configs
    parse, and their tensors are the graphs' own (names, types, dims after the batch axis) as onnxruntime reads
    them; the graph files are hard links to the workdir copy."""
    import onnxruntime as ort
    parse_config = model_config

    from cheers_deploy.triton.repository import NATIVE_GRAPHS

    out = write_repository(WORKDIR, tmp_path / "r", RepositoryOptions(native_graphs=True, max_batch=4))
    types = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL"}
    for graph in NATIVE_GRAPHS:
        name = f"cheers_{graph}"
        cfg = parse_config(out / name / "config.pbtxt")
        assert (cfg.name, cfg.platform, cfg.max_batch_size) == (name, "onnxruntime_onnx", 4)
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
        model = out / name / "1" / "model.onnx"
        assert os.stat(model).st_ino == os.stat(out / GENERATE_MODEL / "1" / "workdir" / f"{graph}.onnx").st_ino
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for mine, theirs in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
            assert [x.name for x in mine] == [x.name for x in theirs]
            for x, y in zip(mine, theirs):
                assert mc_type_name(x.data_type) == types[y.type]
                want = [d if isinstance(d, int) else -1 for d in y.shape[1:]]
                assert (list(x.reshape.shape) == [] and list(x.dims) == [1]) if not want else list(x.dims) == want
    summary = json.loads((out / REPOSITORY_FILE).read_text())
    assert summary["models"]["cheers_cfm_head"]["verified"] is False


def mc_type_name(value) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Name(value)


def test_reference_writes_the_path(tmp_path):
    write_repository(WORKDIR, tmp_path / "r", RepositoryOptions(reference=True))
    for m in (GENERATE_MODEL, CHAT_MODEL):
        assert not (tmp_path / "r" / m / "1" / "workdir").exists()
        assert f'string_value: "{WORKDIR.resolve()}"' in (tmp_path / "r" / m / "config.pbtxt").read_text()


@pytest.mark.parametrize("opts, message", [
    (RepositoryOptions(backend="trt", kind="cpu"), "--kind gpu"),
    (RepositoryOptions(kind="cpu", gpus=[0]), "--gpus applies to --kind gpu"),
    (RepositoryOptions(kind="gpu", gpus=[0, 0]), "distinct GPU ids"),
    (RepositoryOptions(instances=0), "--instances"),
    (RepositoryOptions(backend="torch"), "--backend"),
    (RepositoryOptions(precision="fp8"), "--precision"),
    (RepositoryOptions(max_batch=4), "--max-batch applies to --native-graphs"),
    (RepositoryOptions(backend="trt", native_graphs=True), "onnxruntime-backend"),
])
def test_bad_options_are_refused(tmp_path, opts, message):
    with pytest.raises(InputError, match=message):
        write_repository(WORKDIR, tmp_path / "r", opts)
    assert not (tmp_path / "r").exists()


def test_non_empty_out_needs_overwrite_and_keeps_other_models(tmp_path):
    out = tmp_path / "r"
    (out / "other_model" / "1").mkdir(parents=True)
    (out / "other_model" / "config.pbtxt").write_text('name: "other_model"\n')
    (out / GENERATE_MODEL / "1").mkdir(parents=True)
    (out / GENERATE_MODEL / "1" / "stale.txt").write_text("old")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        write_repository(WORKDIR, out, RepositoryOptions())
    assert (out / GENERATE_MODEL / "1" / "stale.txt").read_text() == "old"
    write_repository(WORKDIR, out, RepositoryOptions(), overwrite=True)
    assert not (out / GENERATE_MODEL / "1" / "stale.txt").exists()
    assert (out / GENERATE_MODEL / "1" / "model.py").is_file()
    assert (out / "other_model" / "config.pbtxt").read_text() == 'name: "other_model"\n'
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_out_must_not_be_inside_the_workdir_or_a_file(tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(WORKDIR, wd)
    with pytest.raises(InputError, match="inside the workdir"):
        write_repository(wd, wd / "repo", RepositoryOptions())
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_repository(wd, tmp_path / "f", RepositoryOptions())
    with pytest.raises(InputError, match="no such folder"):
        write_repository(tmp_path / "missing", tmp_path / "r", RepositoryOptions())


def test_a_link_out_of_the_workdir_is_refused(tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(WORKDIR, wd)
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", wd / "notes.txt")
    with pytest.raises(CheckpointError, match="outside"):
        write_repository(wd, tmp_path / "r", RepositoryOptions())
    assert not (tmp_path / "r").exists()
    # hidden files (locks, temporary files of an interrupted write) and calib/ are not copied
    os.unlink(wd / "notes.txt")
    (wd / ".export.lock").write_text("1")
    (wd / "calib").mkdir()
    (wd / "calib" / "shard.npz").write_bytes(b"x")
    names = {rel for rel, _ in workdir_files(wd)}
    assert ".export.lock" not in names and not any(n.startswith("calib/") for n in names)


# ------------------------------------------------------------------------------------------------ the command
def run_cli(monkeypatch, argv, capsys):
    import importlib

    cli = importlib.import_module("cheers_deploy.cli.main")

    if not any(c[0] == "triton" for c in cli.OPTIONAL_COMMANDS):     # until cli/main.py registers it
        monkeypatch.setattr(cli, "OPTIONAL_COMMANDS", cli.OPTIONAL_COMMANDS + (
            ("triton", "cheers_deploy.cli.triton", "add_triton_args", "Triton model repository"),))
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli(monkeypatch, capsys, tmp_path):
    rc, out, err = run_cli(monkeypatch, ["triton", "--out", str(tmp_path / "r"), "--instances", "2"], capsys)
    assert rc == 0, err
    assert (tmp_path / "r" / CHAT_MODEL / "1" / "workdir" / "manifest.json").is_file()
    assert "tritonserver --model-repository=" in out
    rc, out, err = run_cli(monkeypatch, ["triton", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--overwrite" in err
    rc, out, err = run_cli(monkeypatch, ["triton", "--out", str(tmp_path / "r2"), "--backend", "trt", "--kind", "cpu"],
                           capsys)
    assert rc == 2 and "--kind gpu" in err and err.count("\n") == 1
    rc, out, err = run_cli(monkeypatch, ["triton", "--out", str(tmp_path / "r2"), "--gpus", "0,x"], capsys)
    assert rc == 2 and "--gpus" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ models, fake Triton
class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.array(array, copy=True)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    @classmethod
    def from_dlpack(cls, name, other):
        return cls(name, other.as_numpy())


class FakeError(Exception):
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeSender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))

    def is_cancelled(self):
        return False


class FakeRequest:
    def __init__(self, **inputs):
        self.inputs = {k: FakeTensor(k, v) for k, v in inputs.items()}
        self.sender = FakeSender()

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return False


class FakePB:
    Tensor = FakeTensor
    InferenceResponse = FakeResponse
    TritonError = FakeError
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)


def s(text):
    return np.array([text.encode()], np.object_)


def make_model(cls, repo, model):
    params = {k: {"string_value": v} for k, v in model_parameters(RepositoryOptions(), "workdir").items()}
    args = {"model_config": json.dumps({"parameters": params,
                                        "instance_group": [{"kind": "KIND_CPU", "count": 2}]}),
            "model_repository": str(repo / model), "model_version": "1", "model_name": model,
            "model_instance_name": f"{model}_0_0", "model_instance_kind": "CPU", "model_instance_device_id": "0"}
    m = cls()
    m.setup(FakePB, args)
    return m


def test_generate_model_equals_pipeline(repo, pipe):
    m = make_model(pm.GenerateModel, repo, GENERATE_MODEL)
    assert m.pipe.backend.threads >= 1
    reqs = [FakeRequest(prompt=s(PROMPT), seed=np.array([7], np.int64)),
            FakeRequest(prompt=s(PROMPT), steps=np.array([5], np.int32), cfg_scale=np.array([1.7]),
                        alpha=np.array([0.3])),
            FakeRequest(prompt=s(PROMPT), seed=np.array([-1], np.int64)),
            FakeRequest(prompt=np.array([b"\xff"], np.object_)),
            FakeRequest(seed=np.array([1], np.int64))]
    res = m.execute(reqs)
    exp = pipe.generate(PROMPT, seed=7)
    assert np.array_equal(res[0].outputs["image"], exp.image)
    assert res[0].outputs["stop_reason"][0].decode() == exp.stop_reason
    assert np.array_equal(res[1].outputs["image"], pipe.generate(PROMPT, steps=5, cfg_scale=1.7, alpha=0.3).image)
    assert res[2].error.code == FakeError.INVALID_ARG and "seed" in res[2].error.message
    assert "UTF-8" in res[3].error.message
    assert "'prompt' is required" in res[4].error.message
    m.finalize()


def test_chat_model_streams_the_pipeline_answer(repo, pipe, scene):
    m = make_model(pm.ChatModel, repo, CHAT_MODEL)
    msgs = json.dumps([{"role": "system", "content": "ignored"},
                       {"role": "user", "content": [{"type": "text", "text": "where is the"},
                                                    {"type": "text", "text": "red circle?"}]}])
    reqs = [FakeRequest(prompt=s(QUESTION), image=scene),
            FakeRequest(prompt=s(SAMPLED), temperature=np.array([2.0]), seed=np.array([3]),
                        max_new_tokens=np.array([12], np.int32)),
            FakeRequest(messages=s(msgs)),
            FakeRequest(prompt=s("x"), messages=s(msgs)),
            FakeRequest(messages=s('[{"role": "assistant", "content": "hi"}]')),
            FakeRequest(prompt=s("x"), image=np.zeros((4, 4), np.uint8))]
    assert m.execute(reqs) is None
    expected = [pipe.answer(scene, QUESTION), pipe.chat(SAMPLED, temperature=2.0, seed=3, max_new_tokens=12),
                pipe.chat("where is the\nred circle?")]
    for req, exp in zip(reqs[:3], expected):
        sent = req.sender.sent
        assert [f for _, f in sent] == [0] * (len(sent) - 1) + [1]
        deltas = [r.outputs["text"][0].decode() for r, _ in sent]
        assert "".join(deltas) == exp.text
        final = sent[-1][0].outputs
        assert final["stop_reason"][0].decode() == exp.stop_reason
        assert int(final["completion_tokens"][0]) == len(exp.token_ids)
    assert len(reqs[1].sender.sent) > 2                              # several deltas, not one blob
    assert [r.outputs["text"][0].decode() for r, _ in reqs[1].sender.sent[:-1]] == \
        list(pipe.stream_chat(SAMPLED, temperature=2.0, seed=3, max_new_tokens=12))
    for req, msg in zip(reqs[3:], ("exactly one of", "must be the user's", "[H, W, 3]")):
        (resp, flags), = req.sender.sent
        assert flags == 1 and resp.error.code == FakeError.INVALID_ARG and msg in resp.error.message


def test_numpy_interop_check_refuses_a_broken_stub():
    class Broken(FakeTensor):
        @classmethod                                 # what the 2.51 stub does under numpy 2: every element the first
        def from_dlpack(cls, name, other):
            a = other.as_numpy()
            return FakeTensor(name, np.full_like(a, a.reshape(-1)[0]))

    class PB(FakePB):
        Tensor = Broken

    with pytest.raises(pm.NumpyInteropError, match="numpy<2"):
        pm.check_numpy_interop(PB)
    pm.check_numpy_interop(FakePB)


def test_gpu_instance_asks_for_cuda(repo):
    """KIND_GPU: onnxruntime gets CUDAExecutionProvider on Triton's device id; trt runs on that GPU; trt on KIND_CPU
    is refused. (Loading it needs a GPU: on this machine onnxruntime refuses the provider.)"""
    params = {k: {"string_value": v} for k, v in model_parameters(RepositoryOptions(), "workdir").items()}
    args = {"model_repository": str(repo / GENERATE_MODEL), "model_version": "1", "model_instance_kind": "GPU",
            "model_instance_device_id": "1"}
    workdir, backend, precision, kw = pm.pipeline_arguments(args, {"parameters": params})
    assert backend == "ort" and kw["providers"] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert workdir == repo / GENERATE_MODEL / "1" / "workdir"
    trt = dict(params, backend={"string_value": "trt"})
    assert pm.pipeline_arguments(args, {"parameters": trt})[3] == {"device": 1}
    with pytest.raises(InputError, match="KIND_GPU"):
        pm.pipeline_arguments(dict(args, model_instance_kind="CPU"), {"parameters": trt})
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(Exception, match="CUDAExecutionProvider"):
            pm.load_pipeline(args, {"parameters": params})


# ------------------------------------------------------------------------------------------------ a real tritonserver
@pytest.fixture(scope="session")
def triton_install():
    from cheers_deploy.triton import local

    try:
        inst = local.install()
        local.ensure_client()
    except local.TritonUnavailable as exc:
        pytest.skip(f"no tritonserver here: {exc}")
    return inst


@pytest.fixture(scope="module")
def server(triton_install, repo, tmp_path_factory):
    from cheers_deploy.triton.local import LocalTriton

    srv = LocalTriton(repo, triton_install, tmp_path_factory.mktemp("triton-log") / "server.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def http_client(server):
    import tritonclient.http as th

    return th.InferenceServerClient(server.http_url)


class Stream:
    """A gRPC client with a stream to the decoupled model; collects one request's responses."""

    def __init__(self, server):
        import tritonclient.grpc as tg

        self.tg = tg
        self.client = tg.InferenceServerClient(server.grpc_url)
        self.q = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)))

    def chat(self, **inputs):
        ins = []
        for name, a in inputs.items():
            a = np.asarray(a)
            x = self.tg.InferInput(name, list(a.shape), {"O": "BYTES", "u": "UINT8", "i": "INT64", "f": "FP64"}
                                   [a.dtype.kind] if a.dtype != np.int32 else "INT32")
            x.set_data_from_numpy(a)
            ins.append(x)
        self.client.async_stream_infer(CHAT_MODEL, ins)
        out = []
        while True:
            result, error = self.q.get(timeout=120)
            if error is not None:
                return out, error
            out.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out, None

    def close(self):
        self.client.stop_stream()
        self.client.close()


def infer_generate(client, mod, prompt, **settings):
    types = {"seed": ("INT64", np.int64), "steps": ("INT32", np.int32), "cfg_scale": ("FP64", np.float64),
             "alpha": ("FP64", np.float64)}
    p = mod.InferInput("prompt", [1], "BYTES")
    p.set_data_from_numpy(s(prompt))
    ins = [p]
    for k, v in settings.items():
        x = mod.InferInput(k, [1], types[k][0])
        x.set_data_from_numpy(np.array([v], types[k][1]))
        ins.append(x)
    return client.infer(GENERATE_MODEL, ins)


@pytest.mark.triton
def test_server_generate_equals_pipeline_http_and_grpc(server, pipe):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    h, g = http_client(server), tg.InferenceServerClient(server.grpc_url)
    try:
        for mod, client, kw in ((th, h, {"seed": 7}), (tg, g, {"seed": 11, "steps": 6, "cfg_scale": 1.5,
                                                                 "alpha": 0.7})):
            r = infer_generate(client, mod, PROMPT, **kw)
            exp = pipe.generate(PROMPT, **kw)
            img = r.as_numpy("image")
            assert img.dtype == np.uint8 and img.shape == exp.image.shape
            assert img.tobytes() == exp.image.tobytes()
            assert r.as_numpy("stop_reason")[0].decode() == exp.stop_reason
            assert r.as_numpy("text")[0].decode() == exp.text
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="seed must be an integer"):
            infer_generate(h, th, PROMPT, seed=-5)
        cfg = h.get_model_config(GENERATE_MODEL)
        assert cfg["instance_group"][0]["count"] == 2
    finally:
        h.close()
        g.close()
    log = server.log_path.read_text(errors="replace")
    for i in range(2):                                               # both instances loaded (and warmed up)
        assert f"{GENERATE_MODEL}_0_{i}" in log and f"{CHAT_MODEL}_0_{i}" in log


@pytest.mark.triton
def test_server_chat_streams_the_pipeline_answer(server, pipe, scene):
    st = Stream(server)
    try:
        responses, err = st.chat(prompt=s(QUESTION), image=scene)
        assert err is None
        exp = pipe.answer(scene, QUESTION)
        deltas = [r.as_numpy("text")[0].decode() for r in responses]
        assert "".join(deltas) == exp.text
        assert deltas[:-1] == list(pipe.stream_answer(scene, QUESTION))
        assert responses[-1].as_numpy("stop_reason")[0].decode() == exp.stop_reason
        # sampled, so that the answer is several tokens: every delta is its own response
        responses, err = st.chat(prompt=s(SAMPLED), temperature=np.array([2.0]), seed=np.array([3], np.int64),
                                 max_new_tokens=np.array([12], np.int32))
        exp = pipe.chat(SAMPLED, temperature=2.0, seed=3, max_new_tokens=12)
        assert err is None and len(responses) > 2
        assert "".join(r.as_numpy("text")[0].decode() for r in responses) == exp.text
        assert int(responses[-1].as_numpy("completion_tokens")[0]) == len(exp.token_ids)
        responses, err = st.chat(prompt=s("x"), messages=s('[{"role": "user", "content": "x"}]'))
        assert err is not None and "exactly one of" in str(err)
        responses, err = st.chat(messages=s('[{"role": "user", "content": "where is the red circle?"}]'))
        assert err is None and "".join(r.as_numpy("text")[0].decode() for r in responses) == \
            pipe.chat("where is the red circle?").text
    finally:
        st.close()


@pytest.mark.triton
def test_server_http_generate_stream(server, pipe):
    """The decoupled model over HTTP: Triton's generate_stream extension (server-sent events)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{CHAT_MODEL}/generate_stream",
                     json.dumps({"prompt": "where is the red circle?", "seed": 3}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read().decode()
    finally:
        conn.close()
    assert r.status == 200, body
    events = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert "".join(e["text"] for e in events) == pipe.chat("where is the red circle?", seed=3).text
    assert events[-1]["stop_reason"] == pipe.chat("where is the red circle?", seed=3).stop_reason


@pytest.mark.triton
def test_server_two_instances_sixteen_concurrent_requests(server, pipe, scene):
    """16 requests at once (8 images, 8 streamed answers) on 2 instances per model: every one answered, each equal
    to the pipeline's; /metrics counts them."""
    import tritonclient.grpc as tg

    from cheers_deploy.triton.local import model_metric, parse_metrics

    before = parse_metrics(server.metrics())
    cpu_before = {m: server.stub_cpu_seconds(m) for m in (GENERATE_MODEL, CHAT_MODEL)}
    assert [len(v) for v in cpu_before.values()] == [2, 2]                  # one stub process per instance
    jobs = [("gen", i) if i % 2 == 0 else ("vqa", i) for i in range(16)]
    expected = {i: (pipe.generate(PROMPT, seed=i).image if k == "gen" else pipe.answer(scene, QUESTION, seed=i).text)
                for k, i in jobs}
    results = {}
    start = threading.Barrier(len(jobs))

    def run(kind, i):
        client = tg.InferenceServerClient(server.grpc_url) if kind == "gen" else Stream(server)
        start.wait()                                  # connected: the 16 requests leave together
        try:
            if kind == "gen":
                results[i] = infer_generate(client, tg, PROMPT, seed=i).as_numpy("image")
            else:
                responses, err = client.chat(prompt=s(QUESTION), image=scene, seed=np.array([i], np.int64))
                results[i] = err if err is not None else "".join(r.as_numpy("text")[0].decode() for r in responses)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(16)), "requests lost"
    for k, i in jobs:
        if k == "gen":
            assert isinstance(results[i], np.ndarray) and np.array_equal(results[i], expected[i]), (i, results[i])
        else:
            assert results[i] == expected[i], (i, results[i])
    def counted():
        after = parse_metrics(server.metrics())
        return {m: model_metric(after, "nv_inference_request_success", m) -
                model_metric(before, "nv_inference_request_success", m) for m in (GENERATE_MODEL, CHAT_MODEL)}

    deadline = time.monotonic() + 10          # Triton counts a request once its response is released: a moment later
    while counted() != {GENERATE_MODEL: 8, CHAT_MODEL: 8} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted() == {GENERATE_MODEL: 8, CHAT_MODEL: 8}
    # both instances of the image model worked (each stub process used CPU time for at least one image)
    cpu_after = server.stub_cpu_seconds(GENERATE_MODEL)
    used = {pid: cpu_after[pid] - cpu_before[GENERATE_MODEL][pid] for pid in cpu_before[GENERATE_MODEL]}
    assert all(u >= 0.05 for u in used.values()), used


@pytest.mark.triton
def test_server_refuses_a_numpy2_stub(triton_install, repo, tmp_path):
    """The 2.51 stub misreads tensors under numpy 2 (silently: [1.5, -2.25, 3.0] arrives as [1.5, 1.5, 1.5]). A stub
    that gets this environment's numpy 2 must refuse to load the models with the reason, not serve wrong answers."""
    import dataclasses

    import numpy

    from cheers_deploy.triton.local import LocalTriton, cache_root, install_stub_env

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has numpy 1.x")
    inst = dataclasses.replace(triton_install, stub_env=install_stub_env(cache_root(), numpy=None))
    srv = LocalTriton(repo, inst, tmp_path / "server.log")
    try:
        with pytest.raises(Exception, match="exited with code"):
            srv.start(timeout=60)
    finally:
        srv.stop()
    log = srv.log_path.read_text(errors="replace")
    assert "NumpyInteropError" in log and "install numpy<2" in log
    assert srv.group_pids() == []


@pytest.mark.triton
def test_server_stops_and_leaves_nothing(server):
    pids = server.group_pids()
    assert len(pids) >= 5                          # the server and one stub per instance (2 models x 2)
    seconds = server.stop()
    assert server.proc.poll() is not None
    assert server.group_pids() == []
    assert all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in pids)
    import socket

    for port in (server.http_port, server.grpc_port, server.metrics_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert seconds < 30
