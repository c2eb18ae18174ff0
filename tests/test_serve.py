"""`cheers-deploy serve` (docs/serving.md): the server runs as a subprocess on a free loopback port with the bundled
model, and every answer is compared with the Pipeline's own for the same inputs and seed (computed here). Also the
streaming generators of the library (runtime/streaming.py), the error objects, the bounded queue, cancellation on
disconnect, the timeout, auth, SIGTERM draining, the layering of the server's dependencies, and a bounded load test.

Every server process is stopped in a fixture's finally (SIGTERM, then SIGKILL of its process group)."""

from __future__ import annotations

import ast
import base64
import json
import re
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_client_helpers import (RawRequest, ServerProcess, chat_body, data_url, decode_b64_png,  # noqa: E402
                                  png_bytes, sse_data, vqa_body)

from cheers_deploy.hub import bundled_workdir  # noqa: E402
from cheers_deploy.runtime.pipeline import Pipeline  # noqa: E402
from cheers_deploy.runtime.streaming import TextDeltas, stream_answer, stream_chat  # noqa: E402

PKG = Path(__file__).resolve().parents[1] / "cheers_deploy"
SLOW_STEPS = 10000                    # the pipeline's maximum: minutes of work, always cancelled by the tests
ERROR_KEYS = {"message", "type", "param", "code"}

pytestmark = pytest.mark.skipif(bundled_workdir() is None, reason="the bundled model's graphs are not installed")


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_workdir(bundled_workdir(), backend="ort")


@pytest.fixture(scope="module")
def scene(pipe):
    """A picture of the bundled model's world (red circle on the left)."""
    return pipe.generate("a red circle on the left", seed=0).image


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess([], tmp_path_factory.mktemp("serve-main"))
    try:
        srv.start()
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted(x.strip() for x in (m.group(2) or "{}")[1:-1].split(",") if x.strip()))
        if got == want:
            return float(m.group(3))
    return 0.0


def wait_metric(client, name, value, timeout=5.0, **labels) -> float:
    deadline = time.monotonic() + timeout
    while True:
        got = metric(client.get("/metrics").text, name, **labels)
        if got == value or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def assert_error(r, status: int, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ----------------------------------------------------------------------------------------------------- library
def test_text_deltas_concatenate_exactly_across_multibyte_tokens(pipe):
    tok = pipe.tokenizer
    text = "héllo 日本語 🎉 ok\nnext"
    ids = tok.encode(text) + [pipe.special.chat_end]
    d = TextDeltas(tok)
    parts = [d.push(i) for i in ids] + [d.finish()]
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in parts)
    assert sum(1 for p in parts if p) < len(ids)          # bytes of one character were held back together
    long_ids = ids * 30                                   # past the re-anchoring point
    d = TextDeltas(tok)
    parts = [d.push(i) for i in long_ids] + [d.finish()]
    assert "".join(parts) == tok.decode(long_ids, skip_special_tokens=True)


def test_stream_answer_and_chat_match_the_pipeline(pipe, scene):
    for q, seed in (("what color is the circle?", 0), ("where is the circle?", 3)):
        expected = pipe.answer(scene, q, seed=seed)
        gen = stream_answer(pipe, scene, q, seed=seed)
        deltas = []
        while True:
            try:
                deltas.append(next(gen))
            except StopIteration as stop:
                out = stop.value
                break
        assert deltas and "".join(deltas) == expected.text == out.text
        assert out.token_ids == expected.token_ids
    assert "".join(stream_chat(pipe, "where is the red circle?")) == pipe.chat("where is the red circle?").text


def test_closing_a_stream_cancels_the_run(pipe, scene):
    before = threading.active_count()
    gen = stream_answer(pipe, scene, "what color is the circle?", max_new_tokens=1000,
                        suppress_tokens=[pipe.special.chat_end])
    t0 = time.perf_counter()
    next(gen)
    gen.close()                                            # the helper thread stops at the next token
    assert time.perf_counter() - t0 < 5
    assert threading.active_count() == before
    assert pipe.answer(scene, "what color is the circle?").text == "red"      # the pipeline is usable again


# ----------------------------------------------------------------------------------------------------- API
def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ready"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["model"] == "cheers-tiny-shapes" and ready["resolution"] == 64
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["cheers-tiny-shapes"]
    assert client.get("/v1/models/cheers-tiny-shapes").json()["object"] == "model"
    assert_error(client.get("/v1/models/gpt-4"), 404, "model_not_found")


@pytest.mark.parametrize("question,seed", [("what color is the circle?", 0), ("where is the circle?", 5),
                                           ("how many shapes are there?", 7)])
def test_chat_with_an_image_answers_as_the_pipeline(client, pipe, scene, question, seed):
    expected = pipe.answer(scene, question, seed=seed)
    r = client.post("/v1/chat/completions", json=vqa_body(scene, question, seed=seed))
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == expected.stop_reason
    assert body["object"] == "chat.completion" and body["model"] == "cheers-tiny-shapes"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(expected.token_ids)
    assert usage["prompt_tokens"] > 4 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_without_an_image_is_pipeline_chat_and_uses_the_last_user_turn(client, pipe):
    expected = pipe.chat("where is the red circle?", seed=2)
    body = {"messages": [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                         {"role": "user", "content": [{"type": "text", "text": "where is the red circle?"}]}],
            "seed": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected.text


def test_max_tokens_and_temperature_reach_the_pipeline(client, pipe, scene):
    kw = dict(max_new_tokens=3, temperature=1.5, top_p=0.9, seed=11, suppress_tokens=())
    expected = pipe.answer(scene, "what color is the circle?", **kw)
    r = client.post("/v1/chat/completions", json=vqa_body(scene, "what color is the circle?", max_tokens=3,
                                                          temperature=1.5, top_p=0.9, seed=11))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == expected.text
    if expected.stop_reason == "max_new_tokens":
        assert choice["finish_reason"] == "length"


def _stream(client, body) -> list:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_data(r.read().decode())


@pytest.mark.parametrize("kind", ["vqa", "chat"])
def test_streamed_deltas_concatenate_to_the_text(client, pipe, scene, kind):
    if kind == "vqa":
        body = vqa_body(scene, "what color is the circle?", seed=1)
        expected = pipe.answer(scene, "what color is the circle?", seed=1)
    else:
        body = chat_body("where is the red circle?", seed=1)
        expected = pipe.chat("where is the red circle?", seed=1)
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    events = _stream(client, dict(body, stream=True, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(deltas) == plain == expected.text
    assert all(d for d in deltas[1:-1])                    # one chunk per token that adds text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    usage = [e for e in events[:-1] if not e["choices"]]
    assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == len(expected.token_ids)
    assert len({c["id"] for c in chunks}) == 1


def test_image_generation_equals_the_pipeline_byte_for_byte(client, pipe):
    for kw in ({"seed": 3, "steps": 6}, {"seed": 0}):
        expected = pipe.generate("a small blue star on the right", **kw).image
        r = client.post("/v1/images/generations", json={"prompt": "a small blue star on the right", "size": "64x64",
                                                        "response_format": "b64_json", **kw})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 1
        got = decode_b64_png(data[0]["b64_json"])
        assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_image_generation_streams_progress_per_euler_step(client, pipe):
    expected = pipe.generate("a green square at the top", seed=4, steps=5).image
    with client.stream("POST", "/v1/images/generations",
                       json={"prompt": "a green square at the top", "seed": 4, "steps": 5, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_data(r.read().decode())
    steps = [e for e in events if isinstance(e, dict) and e["type"] == "image_generation.progress"]
    assert [(e["step"], e["steps"]) for e in steps] == [(i, 5) for i in range(1, 6)]
    done = [e for e in events if isinstance(e, dict) and e["type"] == "image_generation.completed"]
    assert len(done) == 1 and np.array_equal(decode_b64_png(done[0]["b64_json"]), expected)
    assert events[-1] == "[DONE]"


def test_image_edit_equals_the_pipeline(client, pipe, scene):
    expected = pipe.edit(scene, "a blue circle on the left", seed=2, steps=4).image
    r = client.post("/v1/images/edits", files={"image": ("scene.png", png_bytes(scene), "image/png")},
                    data={"prompt": "a blue circle on the left", "seed": "2", "steps": "4"})
    assert r.status_code == 200, r.text
    assert np.array_equal(decode_b64_png(r.json()["data"][0]["b64_json"]), expected)


def test_the_openai_client_works_unchanged(server, pipe, scene):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="dummy", max_retries=0)
    expected = pipe.answer(scene, "what color is the circle?", seed=0).text
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what color is the circle?"},
                                         {"type": "image_url", "image_url": {"url": data_url(scene)}}]}]
    stream = oc.chat.completions.create(model="cheers-tiny-shapes", messages=msgs, stream=True, seed=0)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected
    res = oc.chat.completions.create(model="cheers-tiny-shapes", messages=msgs, seed=0)
    assert res.choices[0].message.content == expected and res.usage.completion_tokens >= 1
    img = oc.images.generate(model="cheers-tiny-shapes", prompt="a red circle on the left", size="64x64",
                             response_format="b64_json", extra_body={"seed": 1, "steps": 5})
    assert np.array_equal(decode_b64_png(img.data[0].b64_json),
                          pipe.generate("a red circle on the left", seed=1, steps=5).image)
    with pytest.raises(openai.BadRequestError):
        oc.images.generate(model="cheers-tiny-shapes", prompt="a red circle", n=2)


def _huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (its data is a few bytes: the server must refuse it from the header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _url_body(url: str, text: str = "what color is the circle?") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


def _b64(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def bad_requests(scene):
    chat, gen, edit = "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"
    gif = png_bytes(scene, "GIF")
    return [
        ("malformed JSON", chat, {"content": b'{"messages": [', "headers": {"content-type": "application/json"}},
         400, "invalid_json", None),
        ("not an object", chat, {"json": [1, 2]}, 400, "invalid_json", None),
        ("missing messages", chat, {"json": {"model": "x"}}, 422, "missing_required_parameter", "messages"),
        ("missing prompt", gen, {"json": {"size": "64x64"}}, 422, "missing_required_parameter", "prompt"),
        ("wrong type", chat, {"json": dict(chat_body("hi"), temperature="hot")}, 422, "invalid_type", "temperature"),
        ("out of range", chat, {"json": dict(chat_body("hi"), top_p=0)}, 422, "invalid_value", "top_p"),
        ("seed too large", gen, {"json": {"prompt": "a red circle", "seed": 2 ** 40}}, 422, "invalid_value", "seed"),
        ("chat n=2", chat, {"json": dict(chat_body("hi"), n=2)}, 400, "unsupported_value", "n"),
        ("image n=2", gen, {"json": {"prompt": "a red circle", "n": 2}}, 400, "unsupported_value", "n"),
        ("wrong size", gen, {"json": {"prompt": "a red circle", "size": "1024x1024"}}, 400, "unsupported_size",
         "size"),
        ("url format", gen, {"json": {"prompt": "a red circle", "response_format": "url"}}, 400,
         "unsupported_value", "response_format"),
        ("stop", chat, {"json": dict(chat_body("hi"), stop=["\n"])}, 400, "unsupported_parameter", "stop"),
        ("last turn not user", chat, {"json": {"messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]}},
         400, "invalid_value", "messages.1.role"),
        ("empty text", chat, {"json": chat_body("  ")}, 400, "invalid_value", None),
        ("remote URL", chat, {"json": _url_body("https://example.com/x.png")}, 400, "remote_images_disabled",
         "messages.0.content.1.image_url"),
        ("file URL", chat, {"json": _url_body("file:///etc/passwd")}, 400, "invalid_url", None),
        ("bad base64", chat, {"json": _url_body("data:image/png;base64,@@@not-base64@@@")}, 400, "invalid_base64",
         None),
        ("non-image data", chat, {"json": _url_body(_b64(b"hello, I am text, not a picture"))}, 400,
         "invalid_image", None),
        ("a GIF", chat, {"json": _url_body(_b64(gif, "image/png"))}, 400, "invalid_image", None),
        ("truncated PNG", chat, {"json": _url_body(_b64(png_bytes(scene)[:60]))}, 400, "invalid_image", None),
        ("too many pixels", chat, {"json": _url_body(_b64(_huge_png_header(10000, 10000)))}, 413,
         "image_too_large", None),
        ("two images", chat, {"json": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": data_url(scene)}},
            {"type": "image_url", "image_url": {"url": data_url(scene)}}]}]}}, 400, "too_many_images", None),
        ("audio part", chat, {"json": {"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {}}]}]}}, 400, "unsupported_content", None),
        ("huge body", chat, {"content": b"x" * (17 << 20), "headers": {"content-type": "application/json"}}, 413,
         "body_too_large", None),
        ("edit without image", edit, {"files": {"x": ("a.txt", b"abc", "text/plain")},
                                      "data": {"prompt": "make it blue"}}, 422, "missing_required_parameter",
         "image"),
        ("edit as JSON", edit, {"json": {"prompt": "make it blue"}}, 400, "invalid_content_type", None),
        ("edit with non-image", edit, {"files": {"image": ("a.png", b"not an image", "image/png")},
                                       "data": {"prompt": "make it blue"}}, 400, "invalid_image", "image"),
    ]


def test_bad_requests_get_openai_error_objects(client, scene):
    for name, path, kw, status, code, param in bad_requests(scene):
        r = client.post(path, **kw)
        try:
            assert_error(r, status, code, param)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    # the server is still fine
    assert client.post("/v1/chat/completions", json=chat_body("where is the red circle?")).status_code == 200


def test_metrics(client):
    client.post("/v1/chat/completions", json=chat_body("where is the red circle?"))
    text = client.get("/metrics").text
    assert metric(text, "cheers_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(text, "cheers_ready") == 1
    assert metric(text, "cheers_queue_depth") == 0
    assert metric(text, "cheers_tokens_generated_total") >= 1
    assert metric(text, "cheers_stage_seconds_count", stage="decode", phase="decode") >= 1
    assert metric(text, "cheers_stage_seconds_count", stage="prefill", phase="prefill") >= 1
    assert metric(text, "cheers_request_duration_seconds_count", route="/v1/chat/completions") >= 1
    assert metric(text, "cheers_model_info", model="cheers-tiny-shapes", backend="ort", precision="fp32") == 1
    assert "_created" not in text


# ----------------------------------------------------------------------------------------------------- queue
@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    srv = ServerProcess(["--max-queue", "1"], tmp_path_factory.mktemp("serve-queue"))
    try:
        srv.start()
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_full_queue_gives_429_at_once_and_disconnects_free_the_worker(busy_server, pipe):
    slow = {"prompt": "a red circle", "steps": SLOW_STEPS}
    with httpx.Client(base_url=busy_server.url, timeout=30.0) as c:
        running = RawRequest(busy_server.url, "/v1/images/generations", dict(slow, stream=True))
        waiting = None
        try:
            assert b"image_generation.progress" in running.read_until(b"image_generation.progress")
            waiting = RawRequest(busy_server.url, "/v1/images/generations", slow)
            assert wait_metric(c, "cheers_queue_depth", 1.0) == 1.0
            for _ in range(3):          # a fresh connection each time (the client is built off the clock: ~50 ms)
                with httpx.Client(base_url=busy_server.url, timeout=5.0) as fresh:
                    t0 = time.perf_counter()
                    r = fresh.post("/v1/chat/completions", json=chat_body("where is the circle?"))
                    elapsed = time.perf_counter() - t0
                assert_error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
                assert elapsed < 0.1, f"429 took {elapsed * 1e3:.0f} ms"
            # the waiting client goes away: it leaves the queue
            waiting.close()
            assert wait_metric(c, "cheers_queue_depth", 0.0) == 0.0
            # the running (streaming) client goes away: the worker stops at the next Euler step
            running.close()
            t0 = time.perf_counter()
            r = c.post("/v1/chat/completions", json=chat_body("where is the red circle?", seed=0))
            assert r.status_code == 200, r.text
            assert time.perf_counter() - t0 < 3.0
            assert r.json()["choices"][0]["message"]["content"] == pipe.chat("where is the red circle?").text
            text = c.get("/metrics").text
            assert metric(text, "cheers_jobs_cancelled_total", reason="client_disconnected") >= 2
            assert metric(text, "cheers_requests_total", route="/v1/chat/completions", status="429") == 3
        finally:
            running.close()
            if waiting is not None:
                waiting.close()


def test_a_non_streaming_client_that_disconnects_frees_the_worker(busy_server):
    with httpx.Client(base_url=busy_server.url, timeout=30.0) as c:
        req = RawRequest(busy_server.url, "/v1/images/generations", {"prompt": "a red circle", "steps": SLOW_STEPS})
        try:
            assert wait_metric(c, "cheers_inflight_jobs", 1.0) == 1.0
        finally:
            req.close()
        assert wait_metric(c, "cheers_inflight_jobs", 0.0) == 0.0
        t0 = time.perf_counter()
        assert c.post("/v1/chat/completions", json=chat_body("where is the red circle?")).status_code == 200
        assert time.perf_counter() - t0 < 3.0


# ----------------------------------------------------------------------------------------------------- auth, timeout
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-keyed")
    key = d / "keys"
    key.write_text("# serving keys\nsecret-key-number-1\n\nsecret-key-number-2\n")
    key.chmod(0o600)
    srv = ServerProcess(["--api-key-file", str(key), "--timeout", "1"], d)
    try:
        srv.start()
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_api_key(keyed_server):
    url = keyed_server.url
    body = chat_body("where is the red circle?")
    assert_error(httpx.post(url + "/v1/chat/completions", json=body), 401, "invalid_api_key")
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong-key-000"})
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(url + "/metrics"), 401)
    assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "secret-key-number-1"}), 401)
    for key in ("secret-key-number-1", "secret-key-number-2"):
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=url + "/v1", api_key="secret-key-number-2", max_retries=0)
    assert oc.models.list().data[0].id == "cheers-tiny-shapes"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope-nope-nope", max_retries=0).models.list()


def test_timeout_gives_504_and_frees_the_worker(keyed_server):
    auth = {"Authorization": "Bearer secret-key-number-1"}
    with httpx.Client(base_url=keyed_server.url, headers=auth, timeout=30.0) as c:
        t0 = time.perf_counter()
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "steps": SLOW_STEPS})
        assert_error(r, 504, "timeout")
        assert time.perf_counter() - t0 < 5.0
        with c.stream("POST", "/v1/images/generations",
                      json={"prompt": "a red circle", "steps": SLOW_STEPS, "stream": True}) as s:
            events = sse_data(s.read().decode())
        assert events[-1]["error"]["code"] == "timeout"               # headers were out: an error event ends it
        t0 = time.perf_counter()
        assert c.post("/v1/chat/completions", json=chat_body("where is the red circle?")).status_code == 200
        assert time.perf_counter() - t0 < 3.0
        assert metric(c.get("/metrics").text, "cheers_jobs_cancelled_total", reason="timeout") == 2


# ----------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path, pipe):
    srv = ServerProcess([], tmp_path)
    try:
        srv.start()
        srv.wait_ready()
        box = {}

        def slow():
            box["r"] = httpx.post(srv.url + "/v1/images/generations", timeout=60,
                                  json={"prompt": "a purple cross in the center", "seed": 9, "steps": 150})

        th = threading.Thread(target=slow)
        th.start()
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert wait_metric(c, "cheers_inflight_jobs", 1.0) == 1.0
        srv.terminate()
        deadline, refused = time.monotonic() + 5, None
        while time.monotonic() < deadline:
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("where is the red circle?"))
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.02)
        assert refused is not None, "no 503 while draining"
        assert_error(refused, 503, "shutting_down")
        assert httpx.get(srv.url + "/ready").status_code == 503
        assert httpx.get(srv.url + "/health").json() == {"status": "draining"}
        expected = pipe.generate("a purple cross in the center", seed=9, steps=150).image
        th.join(60)
        assert box["r"].status_code == 200, box["r"].text
        assert np.array_equal(decode_b64_png(box["r"].json()["data"][0]["b64_json"]), expected)
        assert srv.wait(30) == 0, srv.output()
        assert "stopped" in srv.output()
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------------- load
def test_bounded_load_mixed_requests_all_correct(server, pipe, capsys):
    """8 concurrent clients, a fixed mix of chat, vqa and generation: none lost or failed, every answer the
    pipeline's. (The full measurement with the offline baseline: python -m cheers_deploy.serve.loadtest.)"""
    from cheers_deploy.serve.loadtest import build_mix, check, report, run_load, run_offline

    items = build_mix(pipe, 24, steps=8)
    offline = run_offline(pipe, items)
    stats, results = run_load(server.url, items, concurrency=8)
    failed, wrong = check(items, results)
    with capsys.disabled():
        print("\n" + report(len(items), 8, offline, stats, failed, wrong))
    assert not failed and not wrong
    assert len(stats.latencies) == len(items)


@pytest.mark.slow
def test_loadtest_command(tmp_path):
    """The load-test command end to end: its own server, the offline baseline, exit code 0 (~40 s)."""
    import subprocess

    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "cheers_deploy.serve.loadtest", "--requests", "45",
                           "--concurrency", "8", "--rounds", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "server overhead" in proc.stdout and "server exit code after SIGTERM: 0" in proc.stdout
    res = json.loads(out.read_text())
    assert res["failed"] == 0 and res["wrong"] == 0 and res["server"]["rps"] > 0


# ----------------------------------------------------------------------------------------------------- packaging
SERVER_DEPS = {"starlette", "uvicorn", "fastapi", "pydantic", "prometheus_client", "multipart", "python_multipart",
               "httpx", "openai"}


def _imports(path: Path):
    """Absolute names of every import in `path` (lazy ones inside functions included)."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    package = parts[:-1]                                  # a module's package; for __init__.py the package itself
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


def test_server_dependencies_stay_in_the_serve_layer():
    """Only cheers_deploy/serve imports the server libraries; only cli imports cheers_deploy.serve; importing the
    package cheers_deploy.serve itself imports none of them."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for name in _imports(path):
            top = name.split(".")[0]
            if top in SERVER_DEPS and not rel.startswith("serve/"):
                bad.append(f"{rel} imports {name}")
            if name.startswith("cheers_deploy.serve") and not (rel.startswith("serve/") or rel.startswith("cli/")):
                bad.append(f"{rel} imports {name}")
    assert not bad, bad
    init = PKG / "serve" / "__init__.py"
    assert not [n for n in _imports(init)], "cheers_deploy/serve/__init__.py must import nothing"


def test_serve_help_shows_every_default_and_bad_options_are_one_line_errors(capsys):
    from cheers_deploy.cli import serve as cli_serve
    from cheers_deploy.cli.common import HelpFormatter, shows_default

    parser = cli_serve.build_parser()
    sp = next(a for a in parser._actions if getattr(a, "choices", None)).choices["serve"]
    assert sp.formatter_class is HelpFormatter
    text = re.sub(r"\s+", "", sp.format_help())
    fmt = sp._get_formatter()
    for action in sp._actions:
        if action.option_strings and shows_default(action.default):
            shown = fmt._expand_help(action)
            assert "default" in shown.lower() and str(action.default) in shown, action.dest
            assert re.sub(r"\s+", "", shown) in text
    for argv, words in ((["--port", "70000"], ["--port"]), (["--max-queue", "-1"], ["--max-queue"]),
                        (["--timeout", "0"], ["--timeout"]), (["--threads", "0"], ["--threads"]),
                        (["--api-key-file", "/nonexistent/keys"], ["--api-key-file"])):
        assert cli_serve.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err


def test_a_model_that_does_not_load_ends_the_server_with_one_line_and_exit_2(tmp_path):
    import subprocess

    from serve_client_helpers import serve_command

    (tmp_path / "wd").mkdir()
    proc = subprocess.run(serve_command() + ["--port", "0", "--log-level", "error", "--workdir",
                                             str(tmp_path / "wd")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "manifest.json" in errors[0] and "Traceback" not in proc.stderr


def test_missing_serve_extra_names_the_install_command(capsys, monkeypatch):
    from cheers_deploy.cli import serve as cli_serve

    for name in ("uvicorn", "cheers_deploy.serve.server", "cheers_deploy.serve.service"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli_serve.main([]) == 2
    err = capsys.readouterr().err
    assert "pip install cheers-deploy[serve]" in err and "\n" not in err.strip()


def test_setup_declares_the_serve_extra():
    text = (PKG.parent / "setup.py").read_text()
    extras = text[text.index("extras_require"):]
    assert '"serve"' in extras
    for dep in ("starlette", "uvicorn", "pydantic", "prometheus-client", "python-multipart"):
        assert dep in extras, dep
