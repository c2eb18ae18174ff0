"""The one Cheers pipeline: prefill, text decoding, the flow-matching Euler loop with time shift and batched
classifier-free guidance, editing (docs/architecture.md §13). Every backend runs this same loop.

    check_inputs ─► encode images (explicit image, or the seeded dummy image) ─► splice ids + image tokens
      ─► prefill (B=1, or B=2 cond+uncond for CFG)                                  Backend.backbone(mode=prefill)
      ─► decode loop: sample one token, decode_one                                   Backend.backbone(mode=decode)
           on <im_start>: denoise on top of the cache (scheduler.set_timesteps / step)  mode=image_step
                          ─► force <im_end> ─► VAE decode
           stop on <|im_end|>, max_new_tokens, or a full context

Observers (observer.py) see every stage, token and Euler step; they are how timings, progress, streaming and
calibration capture hook in. The pipeline is not thread-safe: one call at a time per instance.

One file (over 400 lines) because the phases share one request state and read top to bottom as the algorithm of
docs/architecture.md §13; the observers, the scheduler, masks and sampling live beside it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CheersError, CheckpointError, InputError
from ..manifest import GenerationDefaults
from ..processor import load_image, make_dummy_image, preprocess_understanding
from ..tokenizer import IMAGE_PLACEHOLDER, check_text
from .backend import DECODE, IMAGE_STEP, PREFILL, Backend
from .masks import prefill_mask
from .observer import PipelineObserver, ProgressObserver, StageTimer
from .sampling import sample_token
from .scheduler import FlowMatchEulerScheduler
from .streaming import stream_answer as _stream_answer, stream_chat as _stream_chat

MAX_RAW_IDS = 1024       # the official loop stops once the raw id sequence exceeds this (§17.26)
SEED_MAX = 2 ** 32 - 1   # seeds are what numpy's legacy RandomState takes: the official dummy image is drawn with it
MAX_STEPS = 10000
MAX_NEW_TOKENS = 1 << 20  # absolute bound; a backend's context (Backend.max_context) bounds it further

# The ranges of every generation setting, in one table: Pipeline.check_inputs applies them to every call, and the
# command line checks its options against the same table (cli/common.py) before anything is loaded.
#   name: (kind, low, high, low end open)
SETTINGS = {
    "steps": ("int", 1, MAX_STEPS, False),
    "max_new_tokens": ("int", 1, MAX_NEW_TOKENS, False),
    "cfg_scale": ("float", 0.0, 100.0, False),          # 1 = no guidance; 0 = the unconditional branch only
    "alpha": ("float", 0.0, 100.0, True),               # time shift: 0 would put every step at t = 0
    "temperature": ("float", 0.0, 100.0, False),        # 0 = greedy
    "top_p": ("float", 0.0, 1.0, True),
}


class NonFiniteOutputError(CheersError):
    """The model produced NaN or infinite values where an image or latent was expected: nothing is reported as a
    result (broken weights, or a backend/precision that overflows)."""


@dataclass
class GenerateOutput:
    image: Optional[np.ndarray]          # uint8 (H, W, 3) RGB, the first generated image
    latent: Optional[np.ndarray]         # float32 (C, h, w) final latent of that image
    token_ids: List[int]                 # new ids (start with the forced <im_end> after an image)
    text: str
    images: List[np.ndarray] = field(default_factory=list)
    latents: List[np.ndarray] = field(default_factory=list)
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)
    stop_reason: str = ""                # see Pipeline.STOP_REASONS
    warnings: List[str] = field(default_factory=list)


@dataclass
class AnswerOutput:
    text: str
    token_ids: List[int]                 # new ids only
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)
    stop_reason: str = ""
    warnings: List[str] = field(default_factory=list)


@dataclass
class ImageSettings:
    """How one image is denoised."""
    steps: int
    cfg_scale: float                     # 1.0 = no guidance (one branch)
    alpha: float
    noise: Optional[np.ndarray] = None   # (C, h, w) initial noise; None: drawn from the seed
    edit: bool = False                   # editing: start from the source latent at t = 0.1 (§13.4)

    @property
    def guided(self) -> bool:
        return float(self.cfg_scale) != 1.0


@dataclass
class _Request:
    """The state of one call as it moves through the phases."""
    ids: List[int]
    images: List[np.ndarray]
    dummy_image: Optional[np.ndarray]
    seed: int
    image: Optional[ImageSettings]
    max_new_tokens: int
    temperature: float
    top_p: float
    suppress_tokens: Sequence[int] = ()
    rng: Optional[np.random.Generator] = None
    bsz: int = 1
    cache: object = None
    length: int = 0
    latents: object = None               # latents of the conditioning images (editing starts from them)
    grid: int = 0
    m_tokens: int = 0


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(3,H,W) float in ~[0,1] -> (H,W,3) uint8, clamp then x*255+0.5 truncated (torchvision save_image)."""
    x = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
    return np.floor(x * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


class _Observers(PipelineObserver):
    """Fans every hook out to a list of observers."""

    def __init__(self, observers: Sequence[PipelineObserver]):
        self.observers = [o for o in observers if o is not None]

    def on_stage_start(self, stage, phase):
        for o in self.observers:
            o.on_stage_start(stage, phase)

    def on_stage(self, stage, phase, seconds):
        for o in self.observers:
            o.on_stage(stage, phase, seconds)

    def on_token(self, index, token_id, logits):
        for o in self.observers:
            o.on_token(index, token_id, logits)

    def on_step(self, step, num_steps, t, latent):
        for o in self.observers:
            o.on_step(step, num_steps, t, latent)


class Pipeline:
    STOP_REASONS = {
        "end": "the model ended its turn (<|im_end|>)",
        "max_new_tokens": "max_new_tokens reached",
        "image_start": "the model began an image (<im_start>) where only text can follow",
        "context": "the context (KV cache) is full",
        "max_ids": f"the official cap of {MAX_RAW_IDS} ids was reached",
        "image_done": "the image was generated",
    }

    def __init__(self, backend: Backend, tokenizer, processor, config=None,
                 generation: Optional[GenerationDefaults] = None, observers: Sequence[PipelineObserver] = (),
                 timings: bool = True, vocabulary=None):
        """backend: runs the stages (TorchBackend, OrtBackend, TrtBackend). generation: the defaults used where a
        call leaves a setting out (the model's own: manifest / generation_config.json). observers: watch every
        call. timings: synchronise the device around each stage and report its time (costs a sync per stage on
        a GPU). vocabulary: a Vocabulary of the words the model was trained on, to warn about unknown words."""
        self.backend = backend
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.special = tokenizer.special
        self.generation = generation if generation is not None else GenerationDefaults()
        self.observers: List[PipelineObserver] = list(observers)
        self.timings = bool(timings)
        self.vocabulary = vocabulary
        self.timer = StageTimer()
        self._obs = _Observers([self.timer] + self.observers)     # per call: + the call's own observers
        self.check_model()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, checkpoint=None, backend: str = "torch", device: str = "cpu", dtype: str = "float32",
                        threads: Optional[int] = None, revision: Optional[str] = None,
                        observers: Sequence[PipelineObserver] = (), timings: bool = True, cuda_graphs: bool = False,
                        compile: Optional[str] = None) -> "Pipeline":
        """A checkpoint in the official layout run by the torch reference backend: a local folder, a Hugging Face
        repository id such as 'ai9stars/Cheers' (through the hub cache; HF_HUB_OFFLINE honoured; `revision` pins a
        commit), or the bundled tiny-shapes model when None. threads: CPU intra-op threads (default: the
        physical cores available to this process). cuda_graphs, compile: the torch backend's GPU fast path
        (TorchBackend; both need timings=False to avoid a device sync per stage)."""
        from .loaders import load_checkpoint_pipeline

        if backend != "torch":
            raise InputError(f"a checkpoint runs on the torch backend; for '{backend}' export it first "
                             f"(cheers-deploy export) and use Pipeline.from_workdir")
        return load_checkpoint_pipeline(cls, checkpoint, device=device, dtype=dtype, threads=threads,
                                        revision=revision, observers=observers, timings=timings,
                                        cuda_graphs=cuda_graphs, compile=compile)

    @classmethod
    def from_workdir(cls, workdir, backend: str = "ort", threads: Optional[int] = None,
                     precision: Optional[str] = None, providers=None, observers: Sequence[PipelineObserver] = (),
                     timings: bool = True, **backend_options) -> "Pipeline":
        """Exported graphs (cheers-deploy export) run by onnxruntime ('ort') or TensorRT ('trt'). precision: which
        graphs/engines (fp32 default; fp16, bf16, int8, mixed from `cheers-deploy calibrate` / `build`).
        backend_options go to the backend class (OrtBackend / TrtBackend keywords; unknown ones are refused)."""
        from .workdir import open_workdir

        return open_workdir(cls, workdir, backend=backend, threads=threads, precision=precision,
                            providers=providers, observers=observers, timings=timings, **backend_options)

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: str, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
                 alpha: Optional[float] = None, seed: int = 0, noise: Optional[np.ndarray] = None,
                 dummy_image: Optional[np.ndarray] = None, max_new_tokens: Optional[int] = None,
                 temperature: Optional[float] = None, top_p: Optional[float] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 observer: Optional[PipelineObserver] = None) -> GenerateOutput:
        """Text to image. Settings left out take the model's generation defaults (`self.generation`); cfg_scale
        1.0 turns guidance off. `max_new_tokens` bounds the text decoded after the image (official max_length =
        tokens per image + max_new_tokens - 1)."""
        g = self.generation
        image = ImageSettings(_pick(steps, g.steps), _pick(cfg_scale, g.cfg_scale), _pick(alpha, g.alpha), noise)
        req = _Request([], [], dummy_image, seed, image, _pick(max_new_tokens, g.image_max_new_tokens),
                       _pick(temperature, g.temperature), _pick(top_p, g.top_p))
        warnings = self.check_inputs(prompt, req)
        req.ids = self.processor.t2i_ids(prompt)
        return self._call(req, warnings, progress, observer)

    def edit(self, image, instruction: str, steps: Optional[int] = None, cfg_scale: Optional[float] = None,
             alpha: Optional[float] = None, seed: int = 0, noise: Optional[np.ndarray] = None,
             max_new_tokens: Optional[int] = None, temperature: Optional[float] = None, top_p: Optional[float] = None,
             progress: Optional[Callable[[int, int], None]] = None,
             observer: Optional[PipelineObserver] = None) -> GenerateOutput:
        """Image editing (§13.4): the source enters the context and initialises the latent at t = 0.1."""
        g = self.generation
        settings = ImageSettings(_pick(steps, g.steps), _pick(cfg_scale, g.cfg_scale), _pick(alpha, g.alpha), noise,
                                 edit=True)
        req = _Request([], [], None, seed, settings, _pick(max_new_tokens, g.image_max_new_tokens),
                       _pick(temperature, g.temperature), _pick(top_p, g.top_p))
        warnings = self.check_inputs(instruction, req)
        req.images = [load_image(image)]
        req.ids = self.processor.edit_ids(instruction)
        return self._call(req, warnings, progress, observer)

    def answer(self, image, question: str, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
               top_p: Optional[float] = None, seed: int = 0, suppress_tokens: Sequence[int] = (),
               observer: Optional[PipelineObserver] = None) -> AnswerOutput:
        """Image understanding: the question goes verbatim after `<im_start><image><im_end>\\n`. suppress_tokens:
        ids never sampled (e.g. the end-of-turn id, to benchmark a fixed number of tokens)."""
        g = self.generation
        req = _Request([], [], None, seed, None, _pick(max_new_tokens, g.max_new_tokens),
                       _pick(temperature, g.temperature), _pick(top_p, g.top_p), tuple(suppress_tokens))
        warnings = self.check_inputs(question, req, allow_empty=True)
        req.images = [load_image(image)]
        req.ids = self.processor.understanding_ids(question)
        out = self._call(req, warnings, None, observer)
        return AnswerOutput(out.text, out.token_ids, out.timings, out.stop_reason, out.warnings)

    def chat(self, prompt: str, max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
             top_p: Optional[float] = None, seed: int = 0, dummy_image: Optional[np.ndarray] = None,
             suppress_tokens: Sequence[int] = (), observer: Optional[PipelineObserver] = None) -> AnswerOutput:
        """Text-only chat; the seeded random dummy image is prepended as the official processor does."""
        g = self.generation
        req = _Request([], [], dummy_image, seed, None, _pick(max_new_tokens, g.max_new_tokens),
                       _pick(temperature, g.temperature), _pick(top_p, g.top_p), tuple(suppress_tokens))
        warnings = self.check_inputs(prompt, req)
        req.ids = self.processor.chat_ids(prompt)
        out = self._call(req, warnings, None, observer)
        return AnswerOutput(out.text, out.token_ids, out.timings, out.stop_reason, out.warnings)

    def stream_answer(self, image, question: str, **kw):
        """answer() as a generator of text deltas as tokens are decoded (they concatenate to the answer's text); the
        generator's return value is the AnswerOutput. Closing it cancels the run at the next token."""
        return _stream_answer(self, image, question, **kw)

    def stream_chat(self, prompt: str, **kw):
        """chat() as a generator of text deltas (see stream_answer)."""
        return _stream_chat(self, prompt, **kw)

    def describe_stop(self, stop_reason: str) -> str:
        return self.STOP_REASONS.get(stop_reason, stop_reason)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, prompt, req: _Request, allow_empty: bool = False) -> List[str]:
        """The one place where a call's arguments are refused, before any work, each with a one-line message naming
        the setting: the prompt is text (valid UTF-8, not empty unless `allow_empty`); the seed is an integer in
        0..2^32-1 (numpy's legacy seed range; Python or numpy ints and digit strings are taken); steps, cfg_scale,
        alpha, temperature, top_p and max_new_tokens are finite and within `SETTINGS`; max_new_tokens also fits the
        backend's context (`Backend.max_context`: the ORT/TensorRT manifest's, the torch config's
        max_position_embeddings), so no backend is asked for a cache it cannot hold. Normalises the request in place
        (seed to a Python int). Returns warnings (words the model never saw)."""
        check_text(prompt, "prompt")
        if not allow_empty and not prompt.strip():
            raise InputError("the prompt is empty")
        req.seed = check_seed(req.seed)
        limit = self.backend.max_context
        req.max_new_tokens = check_setting("max_new_tokens", req.max_new_tokens,
                                           high=min(MAX_NEW_TOKENS, limit) if limit else None,
                                           why=f"the context of this model is {limit} positions" if limit else "")
        req.temperature = check_setting("temperature", req.temperature)
        req.top_p = check_setting("top_p", req.top_p)
        s = req.image
        if s is not None:
            s.steps = check_setting("steps", s.steps, low=2 if s.edit else None,
                                    why="editing starts at t = 0.1 and needs two steps" if s.edit else "")
            s.cfg_scale = check_setting("cfg_scale", s.cfg_scale)
            s.alpha = check_setting("alpha", s.alpha)
            if s.noise is not None:
                noise = np.asarray(s.noise, np.float32)
                grid = self.processor.latent_grid
                if self.config is not None and noise.shape != (self.config.latent_channels, grid, grid):
                    raise InputError(f"noise must have shape {(self.config.latent_channels, grid, grid)}, "
                                     f"got {noise.shape}")
                if not np.isfinite(noise).all():
                    raise InputError("noise must be finite")
        return self.vocabulary.unknown_words_warning(prompt) if self.vocabulary is not None else []

    def check_model(self) -> None:
        """What the tokenizer and processor files say must fit the model the graphs/weights were made for: every
        token id below the config's vocab_size (a larger id would index past the embedding table), and one image's
        tokens within the context. Raises CheckpointError naming the file."""
        vocab = getattr(getattr(self.config, "text_config", None), "vocab_size", None)
        check_vocab = getattr(self.tokenizer, "check_vocab_size", None)
        if vocab is not None and check_vocab is not None:
            check_vocab(int(vocab))
        proc = self.processor
        where = getattr(proc, "source", "preprocessor_config.json")
        vision = getattr(self.config, "vision_representation_config", None)
        patch = getattr(vision, "patch_size", None)
        if patch is not None and getattr(proc, "patch_size", patch) != patch:
            raise CheckpointError(f"{where}: patch_size {proc.patch_size} does not match the model's {patch} "
                                  f"(config.json vision_representation_config.patch_size)")
        image = getattr(getattr(self.backend, "manifest", None), "image", None)   # exported graphs: a fixed size
        made_for = getattr(image, "resolution", None)
        for res in (getattr(proc, "resolution", None), getattr(proc, "file_resolution", None)):
            if made_for is not None and res is not None and res != made_for:
                raise CheckpointError(f"{where}: scale_resolution {res} does not match the {made_for} the graphs "
                                      f"were exported for; re-export")
        limit = self.backend.max_context
        tokens = getattr(proc, "tokens_per_image", None)
        if limit and tokens is not None and tokens + 2 > limit:
            raise CheckpointError(f"{where}: a scale_resolution of {proc.resolution} gives {tokens} tokens per "
                                  f"image, more than the model's context of {limit} positions")

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def _stage(self, name: str, phase: str):
        """Notify observers around one stage call; with timings on, synchronise and time it."""
        obs = self._obs
        obs.on_stage_start(name, phase)
        if not self.timings:
            yield
            obs.on_stage(name, phase, None)
            return
        self.backend.synchronize()
        t0 = time.perf_counter()
        yield
        self.backend.synchronize()
        obs.on_stage(name, phase, time.perf_counter() - t0)

    def encode_images(self, req: _Request):
        """Understanding pixels of the explicit images, or of the seeded dummy image (§13.1) -> per-image semantic
        tokens; keeps the latents (editing starts from them) and the latent grid (§17.28)."""
        proc = self.processor
        if req.images:
            pix = np.stack([preprocess_understanding(im, proc.resolution) for im in req.images]).astype(np.float32)
        else:
            dummy = make_dummy_image(req.seed) if req.dummy_image is None else load_image(req.dummy_image)
            pix = preprocess_understanding(dummy, proc.resolution)[None].astype(np.float32)
        be = self.backend
        with self._stage("vae_encode", "encode"):
            latents = be.vae_encode(pix)
        with self._stage("vision_tokenizer", "encode"):
            tokens, _ = be.vision_tokenize(latents)
        req.latents, req.grid, req.m_tokens = latents, latents.shape[-1], tokens.shape[1]
        return [tokens[i:i + 1] for i in range(tokens.shape[0])]

    def _splice(self, ids: Sequence[int], image_tokens: list):
        """Embed ids and splice image tokens at each placeholder (I = 1), or prepend the dummy block (I = 0).
        Returns per-segment embeddings (a list, concatenated by the backend) and the flags (S,)."""
        be = self.backend
        ids = list(ids)
        n_ph = sum(1 for i in ids if i == IMAGE_PLACEHOLDER)
        segments, flags = [], []
        if n_ph == 0:
            dummy = image_tokens[0]
            segments.append(dummy)
            flags += [False] * dummy.shape[1]
            segments.append(be.embed(np.asarray(ids, np.int64)[None]))
            flags += [False] * len(ids)
            return segments, np.asarray(flags)
        if n_ph > len(image_tokens):
            raise InputError(f"the prompt has {n_ph} image placeholders but {len(image_tokens)} image(s) were given")
        k, run = 0, []
        for i in ids + [None]:
            if i is None or i == IMAGE_PLACEHOLDER:
                if run:
                    segments.append(be.embed(np.asarray(run, np.int64)[None]))
                    flags += [False] * len(run)
                    run = []
                if i is not None:
                    segments.append(image_tokens[k])
                    flags += [True] * image_tokens[k].shape[1]
                    k += 1
            else:
                run.append(i)
        return segments, np.asarray(flags)

    def prefill(self, req: _Request, image_tokens: list) -> np.ndarray:
        """Splice and run the whole prompt (both CFG branches as one batch) into a new cache; returns the logits of
        the last position (B,V)."""
        be = self.backend
        branches = [list(req.ids)] + ([self.processor.uncond_ids(req.ids)] if req.image and req.image.guided else [])
        seg_flags = [self._splice(b, image_tokens) for b in branches]
        flags = seg_flags[0][1]
        embeds = be.concat_batch([be.concat_seq(s) for s, _ in seg_flags])
        s_len = embeds.shape[1]
        images_max = 1 if req.image is not None else 0
        capacity = s_len + req.max_new_tokens + images_max * (req.m_tokens + 1) + 1
        limit = be.max_context
        if limit is not None and s_len + (req.m_tokens + 1 if req.image else 1) > limit:
            raise InputError(f"the prompt needs {s_len} positions, more than the context of {limit} "
                             f"this model holds (a workdir: --max-context of the export)")
        if limit is not None:
            capacity = min(capacity, limit)
        req.bsz = len(branches)
        req.cache = be.new_cache(req.bsz, capacity)
        with self._stage("prefill", "prefill"):
            _, logits = be.backbone(req.cache, embeds, 0, prefill_mask(flags), PREFILL)
        req.length = s_len
        return logits

    def decode_one(self, req: _Request, token_ids: Sequence[int]) -> np.ndarray:
        """Feed one token per batch row at the next position; returns the next logits (B,V)."""
        be = self.backend
        with self._stage("decode", "decode"):
            e = be.embed(np.asarray(token_ids, np.int64)[:, None])
            _, logits = be.backbone(req.cache, e, req.length, None, DECODE)
        req.length += 1
        return logits

    def denoise(self, req: _Request):
        """The flow-matching loop on top of the prompt cache; the image entries at start..start+M-1 are rewritten
        every step (equivalent to the official append-and-crop) and kept after the last step (§17.10)."""
        be, s, start = self.backend, req.image, req.length
        c, grid = req.latents.shape[1], req.grid
        if s.noise is not None:
            noise = np.asarray(s.noise, np.float32)
            if noise.shape != (c, grid, grid):
                raise InputError(f"noise must have shape {(c, grid, grid)}, got {noise.shape}")
        else:
            noise = req.rng.standard_normal((c, grid, grid), dtype=np.float32)
        x = be.from_numpy(noise[None])
        sched = FlowMatchEulerScheduler.for_edit(s.alpha) if s.edit else FlowMatchEulerScheduler(s.alpha)
        sched.set_timesteps(s.steps)
        if s.edit:
            x = req.latents[:1] * 0.1 + x * 0.9         # unshifted 0.1 (§17.29)
        n, bsz = len(sched), req.bsz
        for i, t in enumerate(sched.timesteps):
            with self._stage("vision_tokenizer", "denoise"):
                tok, pe = be.vision_tokenize(x)     # once per step, shared by both CFG branches
            if bsz > 1:
                tok, pe = be.repeat_batch(tok, bsz), be.repeat_batch(pe, bsz)
            with self._stage("image_step", "denoise"):
                hs, _ = be.backbone(req.cache, tok, start, None, IMAGE_STEP)
            with self._stage("cfm_head", "denoise"):
                v = be.cfm_head(hs, pe, np.full((bsz,), t, np.float32))
            if bsz > 1:
                v = v[1:2] + (v[0:1] - v[1:2]) * float(s.cfg_scale)
            x = sched.step(v, i, x)
            self._obs.on_step(i + 1, n, float(t), x)
        req.length += req.m_tokens
        return x

    # ------------------------------------------------------------------ the loop
    def _call(self, req: _Request, warnings: List[str], progress, observer) -> GenerateOutput:
        self.timer.reset()
        extra = [ProgressObserver(progress) if progress is not None else None, observer]
        self._obs = _Observers([self.timer] + self.observers + extra)
        req.rng = np.random.default_rng(req.seed)
        out = self._generate(req)
        out.timings = self.timer.summary()
        out.warnings = list(warnings)
        return out

    def _sample(self, req: _Request, logits: np.ndarray) -> List[int]:
        if req.suppress_tokens:
            logits = np.array(logits, dtype=np.float32, copy=True)
            logits[:, list(req.suppress_tokens)] = -np.inf
        return [sample_token(logits[b], req.temperature, req.top_p, req.rng) for b in range(logits.shape[0])]

    def _generate(self, req: _Request) -> GenerateOutput:
        be, sp = self.backend, self.special
        logits = self.prefill(req, self.encode_images(req))
        max_length = (req.m_tokens if req.image else 0) + req.max_new_tokens - 1
        images_max = 1 if req.image is not None else 0
        raw_ids, new_ids = list(req.ids), []
        out_images, out_latents = [], []
        n_out, n_images, last, stop = 0, 0, raw_ids[-1], "max_new_tokens"
        while True:
            if len(raw_ids) > MAX_RAW_IDS:
                stop = "max_ids"
                break
            if n_out > max_length:
                break
            if last == sp.img_start:
                if n_images >= images_max:
                    stop = "image_done" if n_images else "image_start"
                    break
                if req.length + req.m_tokens + 1 > req.cache.max_len:
                    stop = "context"
                    break
                x = self.denoise(req)
                logits = self.decode_one(req, [sp.img_end] * req.bsz)
                raw_ids.append(sp.img_end)
                new_ids.append(sp.img_end)
                n_out += req.m_tokens
                n_images += 1
                latent = be.to_numpy(x)[0]
                check_finite("latent", latent)
                out_latents.append(latent)
                with self._stage("vae_decode", "output"):
                    pixels = be.vae_decode(x)
                check_finite("image", pixels[0])
                out_images.append(to_uint8(pixels[0]))
                last = sp.img_end
                continue
            if last == sp.chat_end:
                stop = "end"
                break
            if req.length + 1 > req.cache.max_len:
                stop = "context"
                break
            toks = self._sample(req, logits)
            tok = toks[0]                               # batch element 0 drives control flow (§17.27)
            self._obs.on_token(len(new_ids), tok, logits[0])
            raw_ids.append(tok)
            new_ids.append(tok)
            logits = self.decode_one(req, toks)
            last = tok
            n_out += 1
        text = self.tokenizer.decode([i for i in new_ids if i >= 0], skip_special_tokens=True)
        return GenerateOutput(out_images[0] if out_images else None, out_latents[0] if out_latents else None,
                              new_ids, text, out_images, out_latents, stop_reason=stop)


def _pick(value, default):
    return default if value is None else value


def check_seed(seed) -> int:
    """A seed in 0..2^32-1 (SEED_MAX: numpy's legacy RandomState range, which the official dummy image uses), as a
    Python int. Takes Python and numpy integers, integral floats (7.0) and digit strings ("7", " 42 ")."""
    v = None
    if isinstance(seed, (bool, np.bool_)):
        v = None
    elif isinstance(seed, (int, np.integer)):
        v = int(seed)
    elif isinstance(seed, (float, np.floating)) and math.isfinite(float(seed)) and float(seed).is_integer():
        v = int(seed)
    elif isinstance(seed, str) and seed.strip().lstrip("+").isdigit() and seed.strip().isascii():
        v = int(seed.strip())
    if v is None or not 0 <= v <= SEED_MAX:
        raise InputError(f"seed must be an integer in 0..{SEED_MAX}, got {_show(seed)}")
    return v


def check_setting(name: str, value, low=None, high=None, why: str = ""):
    """`value` checked against SETTINGS[name] (low/high narrow the range for one call; `why` says why): an int
    setting must be an integer (numpy ints taken), a float setting a finite number. Returns it as a Python number."""
    kind, lo, hi, low_open = SETTINGS[name]
    lo = lo if low is None else low
    hi = hi if high is None else high
    if kind == "int":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi
        if not ok:
            raise InputError(f"{name} must be an integer in {lo}..{hi}{f' ({why})' if why else ''}, "
                             f"got {_show(value)}")
        return int(value)
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (lo < v if low_open else lo <= v) and v <= hi
    if not ok:
        raise InputError(f"{name} must be a finite number in {'(' if low_open else '['}{lo:g}, {hi:g}]"
                         f"{f' ({why})' if why else ''}, got {_show(value)}")
    return float(value)


def check_finite(what: str, array) -> None:
    """Refuse an output with NaN or infinite values: it is never reported (or written) as a result."""
    a = np.asarray(array)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise NonFiniteOutputError(f"the model produced a non-finite {what} ({bad} of {a.size} values are NaN or "
                                   f"infinite); nothing was written: check the weights, the precision and the "
                                   f"settings (cfg_scale, alpha)")


def _show(v) -> str:
    """A value for a one-line message: short, no newlines."""
    text = repr(v)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."
