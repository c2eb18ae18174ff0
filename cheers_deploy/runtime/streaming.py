"""Streaming text out of the pipeline as it is decoded: an incremental detokenizer, the observer that feeds it, and
`stream_answer` / `stream_chat` generators.

    for delta in stream_answer(pipe, "x.png", "what color is the circle?"):
        print(delta, end="", flush=True)

    out = yield from stream_chat(pipe, "where is the star?")      # the generator returns the AnswerOutput

The deltas concatenate exactly to the text the same call returns without streaming (`AnswerOutput.text`): every
delta is the growth of `tokenizer.decode(ids so far, skip_special_tokens=True)`, held back while the decoded text
ends inside a multi-byte character (a byte-level BPE token may carry part of one), and the rest comes when the run
ends. Special tokens (`<|im_end|>`, `<im_start>`) add no text.

A generator runs the pipeline in a helper thread (a pipeline call cannot pause inside an observer) and hands the
deltas over a queue; the pipeline is still used by one thread at a time. Closing the generator early (`break`,
`close()`, garbage collection) cancels the run at the next token and waits for the helper thread to finish.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generator, List, Optional

from .observer import PipelineObserver

REPLACEMENT = "\ufffd"          # what a decoder writes for an incomplete UTF-8 sequence
ANCHOR_EVERY = 32               # re-anchor incremental decoding every this many tokens (verified; see TextDeltas)


class TextDeltas:
    """Incremental detokenizer. `push(token_id)` returns the text the token adds ('' while it ends inside a
    multi-byte character, or for special tokens); `finish()` returns what is still held back. The concatenation of
    all returned strings equals `tokenizer.decode(ids, skip_special_tokens=...)` of all pushed ids.

    Decoding re-reads only the ids after an anchor: a token position where the text so far was complete and the
    decoder was checked to split there (decode(a + b) == decode(a) + decode(b)); with a decoder that does not, it
    falls back to decoding every id each time (exact, quadratic in the answer length)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: List[int] = []
        self.text = ""                       # everything returned so far
        self._anchor = 0                     # ids[:anchor] decode to self._anchor_text
        self._anchor_text = ""
        self._anchoring = True

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _current(self) -> str:
        return self._anchor_text + self._decode(self.ids[self._anchor:])

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id < 0:                     # image placeholders are not vocabulary ids (the pipeline drops them)
            return ""
        self.ids.append(token_id)
        full = self._current()
        if full.endswith(REPLACEMENT) or not full.startswith(self.text):
            return ""
        delta, self.text = full[len(self.text):], full
        if self._anchoring and len(self.ids) - self._anchor >= ANCHOR_EVERY:
            whole = self._decode(self.ids)
            if whole == full:
                self._anchor, self._anchor_text = len(self.ids), full
            else:                            # this decoder does not split at token boundaries: decode everything
                self._anchoring, self._anchor, self._anchor_text = False, 0, ""
        return delta

    def finish(self) -> str:
        """The held-back rest (an incomplete character that never completed decodes to U+FFFD, as decode does)."""
        full = self._decode(self.ids)
        if not full.startswith(self.text):   # cannot happen with prefix-stable decoders (byte-level BPE)
            raise RuntimeError("the tokenizer's decoder rewrote text it had already produced; "
                               "streamed text would differ from the final text")
        rest, self.text = full[len(self.text):], full
        return rest


class StreamCancelled(Exception):
    """Raised inside the pipeline by a streaming observer when its consumer went away."""


class TextStreamObserver(PipelineObserver):
    """Turns `on_token` into text deltas: `emit(delta)` for every non-empty one. `cancelled()` is asked before
    every token and stage (a run stops with StreamCancelled at the next boundary when it says True)."""

    def __init__(self, tokenizer, emit: Callable[[str], None], cancelled: Optional[Callable[[], bool]] = None):
        self.deltas = TextDeltas(tokenizer)
        self.emit = emit
        self.cancelled = cancelled

    def _check(self):
        if self.cancelled is not None and self.cancelled():
            raise StreamCancelled("the stream was closed")

    def on_stage_start(self, stage, phase):
        self._check()

    def on_token(self, index, token_id, logits):
        self._check()
        delta = self.deltas.push(token_id)
        if delta:
            self.emit(delta)

    def finish(self) -> str:
        return self.deltas.finish()


class _Both(PipelineObserver):
    """The stream's observer, then the caller's own."""

    def __init__(self, first: PipelineObserver, second: PipelineObserver):
        self.first, self.second = first, second

    def on_stage_start(self, stage, phase):
        self.first.on_stage_start(stage, phase)
        self.second.on_stage_start(stage, phase)

    def on_stage(self, stage, phase, seconds):
        self.first.on_stage(stage, phase, seconds)
        self.second.on_stage(stage, phase, seconds)

    def on_token(self, index, token_id, logits):
        self.first.on_token(index, token_id, logits)
        self.second.on_token(index, token_id, logits)

    def on_step(self, step, num_steps, t, latent):
        self.first.on_step(step, num_steps, t, latent)
        self.second.on_step(step, num_steps, t, latent)


def stream_call(tokenizer, call: Callable[[PipelineObserver], object]) -> Generator[str, None, object]:
    """Run `call(observer)` (one pipeline call made with `observer=`) in a helper thread and yield its text deltas;
    returns the call's output. The building block of stream_answer / stream_chat."""
    items: "queue.Queue" = queue.Queue()
    closed = threading.Event()
    obs = TextStreamObserver(tokenizer, lambda d: items.put(("delta", d)), closed.is_set)

    def run():
        try:
            items.put(("done", call(obs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            items.put(("error", exc))

    worker = threading.Thread(target=run, name="cheers-stream", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "delta":
                yield value
            elif kind == "done":
                rest = obs.finish()
                if rest:
                    yield rest
                return value
            else:
                raise value
    finally:
        closed.set()
        worker.join()


def _observer(kw: dict):
    user = kw.pop("observer", None)
    return (lambda obs: obs) if user is None else (lambda obs: _Both(obs, user))


def stream_answer(pipe, image, question: str, **kw) -> Generator[str, None, object]:
    """`pipe.answer(image, question, **kw)` as a generator of text deltas; returns the AnswerOutput. Keywords are
    answer's (max_new_tokens, temperature, top_p, seed, suppress_tokens, observer)."""
    wrap = _observer(kw)
    return (yield from stream_call(pipe.tokenizer, lambda obs: pipe.answer(image, question, observer=wrap(obs), **kw)))


def stream_chat(pipe, prompt: str, **kw) -> Generator[str, None, object]:
    """`pipe.chat(prompt, **kw)` as a generator of text deltas; returns the AnswerOutput. Keywords are chat's
    (max_new_tokens, temperature, top_p, seed, dummy_image, suppress_tokens, observer)."""
    wrap = _observer(kw)
    return (yield from stream_call(pipe.tokenizer, lambda obs: pipe.chat(prompt, observer=wrap(obs), **kw)))
