"""Training batches for the shapes world: training chat template, §14.1 labels, CFG dropout, splice layout.

Everything random about a step (which scenes, questions, prompts, CFG dropout, t, noise) is a pure function
of (seed, step), so a resumed run sees exactly the batches an uninterrupted run would. Images are rendered
once into a pool (numpy, seeded generator); a step only indexes it.

Spliced sequence of one sample (S positions, right-padded to the fixed batch length):

    [dummy block, M, I=0]?  <|im_start|>system ... <|im_start|>user\\n ... <im_start> [image, M, I=1] <im_end> ...
     (generation samples only,                       understanding: <image> -> -200, labels ignored
      with prob. gen_dummy_prob)                     generation:    <image_gen> -> -300, labels ignored
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import numpy as np

from ..data import shapes as W
from ..processor import IMAGE_PROMPT_PREFIX, make_dummy_image, preprocess_understanding, render_chat
from ..runtime.masks import prefill_mask
from ..tokenizer import IGNORE_INDEX, IMAGE_GEN_PLACEHOLDER, IMAGE_PLACEHOLDER, CheersTokenizer
from ..world_tokenizer import DESCRIBE_QUESTION

GEN_ASSISTANT = "<im_start><image_gen><im_end>"
ROLES = ("system", "user", "assistant")   # turn order of every training conversation (default system turn)


@dataclass
class DataConfig:
    resolution: int = 64
    pool_size: int = 4000          # pre-rendered training scenes
    seed: int = 0
    gen_fraction: float = 0.5      # share of generation samples in a batch
    cfg_dropout: float = 0.2       # §14.1: generation sample -> <no_mean> inputs
    caption_prob: float = 0.15     # understanding samples that ask for the full caption
    gen_dummy_prob: float = 0.5    # generation samples that carry the inference-time dummy block (see docs)
    dummy_pool: int = 64           # distinct random dummy images


# ------------------------------------------------------------------------------------------------ text


class SequenceBuilder:
    """Token ids and §14.1 labels of the two conversation kinds, cached by content."""

    def __init__(self, tokenizer: CheersTokenizer):
        self.tok = tokenizer
        sp = tokenizer.special
        self.special = sp
        self.always = np.array([sp.newline, sp.chat_start, sp.chat_end, sp.img_start, sp.img_end, sp.no_mean])
        self.keep_in_uncond = np.array([IMAGE_PLACEHOLDER, IMAGE_GEN_PLACEHOLDER, sp.img_start, sp.img_end])
        self._cache: Dict[Tuple[str, str], Tuple[np.ndarray, np.ndarray]] = {}

    def encode(self, user: str, assistant: str) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of a user/assistant exchange rendered with the training template (trim=True).

        ids: `<image>` -> -200, `<image_gen>` -> -300. labels (not yet shifted): assistant turn supervised, plus
        \\n, <|im_start|>, <|im_end|>, <im_start>, <im_end>, <no_mean> anywhere; placeholders ignored."""
        key = (user, assistant)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        text = render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                           add_generation_prompt=False, trim=True)
        sp = self.special
        raw = np.asarray(self.tok.encode(text), np.int64)
        ids = raw.copy()
        ids[raw == sp.image] = IMAGE_PLACEHOLDER
        ids[raw == sp.image_gen] = IMAGE_GEN_PLACEHOLDER
        turn = np.cumsum(raw == sp.chat_start) - 1                       # turn index of every token
        if turn.max() != len(ROLES) - 1 or turn.min() < 0:
            raise ValueError(f"unexpected turn structure in {text!r}")
        sup = (turn == ROLES.index("assistant")) | np.isin(ids, self.always)
        labels = np.where(sup & (ids >= 0), ids, IGNORE_INDEX)
        self._cache[key] = (ids, labels)
        return ids, labels

    def understanding(self, question: str, answer: str):
        return self.encode(IMAGE_PROMPT_PREFIX + question, answer)

    def generation(self, prompt: str):
        return self.encode(prompt, GEN_ASSISTANT)

    def uncond(self, ids: np.ndarray) -> np.ndarray:
        """CFG dropout of the inputs (§14.1): all but the image placeholders, <im_start>, <im_end> -> <no_mean>."""
        return np.where(np.isin(ids, self.keep_in_uncond), ids, self.special.no_mean)


# ------------------------------------------------------------------------------------------------ pool


class ShapesPool:
    """Pre-rendered training scenes (the "train" split) with their questions and prompts."""

    def __init__(self, size: int, seed: int = 0, resolution: int = 64):
        self.samples = W.make_split("train", size, seed=seed, resolution=resolution, eager=True)
        self.images = np.stack([s.image for s in self.samples])         # (N,H,W,3) uint8
        self.qa_by_type: List[Dict[str, List[Tuple[str, str]]]] = []
        for s in self.samples:
            d: Dict[str, List[Tuple[str, str]]] = {}
            for qtype, q, a in s.qa:
                d.setdefault(qtype, []).append((q, a))
            self.qa_by_type.append(d)
        self.resolution = resolution

    def __len__(self):
        return len(self.samples)

    def pixels(self, idx) -> np.ndarray:
        """(B,3,H,W) float32 in [0,1] (what the processor feeds the VAE, §15.3)."""
        return (self.images[idx].astype(np.float32) * np.float32(1 / 255)).transpose(0, 3, 1, 2).copy()


def dummy_pixels(n: int, resolution: int) -> np.ndarray:
    """Random dummy images preprocessed exactly like the pipeline's (§13.1): (n,3,R,R) float32."""
    return np.stack([preprocess_understanding(make_dummy_image(1_000_003 + i), resolution) for i in range(n)])


# ------------------------------------------------------------------------------------------------ batches


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32 (§14.2: t is cast to bf16)."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


@dataclass
class Batch:
    """Host arrays of one step (B samples, S spliced positions, L raw ids, M tokens per image)."""
    text_ids: np.ndarray     # (B,L) int64, embedding ids (placeholders/padding -> pad id)
    gather: np.ndarray       # (B,S) int64 row of [text (B*L) | image tokens (B*M) | dummy tokens (Bd*M) | zero]
    mask: np.ndarray         # (B,1,S,S) bool, §12.1 incl. padding runs
    targets: np.ndarray      # (B,S) int64, shifted labels, -100 ignored
    image_pos: np.ndarray    # (B,M) int64, positions of the explicit image block
    latent_idx: np.ndarray   # (B,) int64 pool index of each image
    dummy_idx: np.ndarray    # (Bd,) int64 dummy-pool index
    t: np.ndarray            # (B,) float32 (bf16 values); 1 for understanding images
    noise: np.ndarray        # (B,C,h,w) float32, x0
    is_gen: np.ndarray       # (B,) bool


class BatchBuilder:
    """Batch for step `step`: a pure function of (seed, step) and the pool."""

    def __init__(self, pool: ShapesPool, tokenizer: CheersTokenizer, cfg: DataConfig, batch_size: int,
                 tokens_per_image: int, latent_shape: Tuple[int, int, int]):
        self.pool, self.cfg, self.bsz = pool, cfg, int(batch_size)
        self.seq = SequenceBuilder(tokenizer)
        self.M = int(tokens_per_image)
        self.latent_shape = tuple(latent_shape)
        self.n_gen = int(round(self.bsz * cfg.gen_fraction))
        self.n_und = self.bsz - self.n_gen
        self.n_dummy = int(round(self.n_gen * cfg.gen_dummy_prob))
        self.pad_id = tokenizer.special.endoftext
        # fixed lengths over everything the pool can produce -> static shapes on every step
        lens = [len(self.seq.understanding(DESCRIBE_QUESTION, s.caption)[0]) for s in pool.samples]
        for d in pool.qa_by_type:
            lens += [len(self.seq.understanding(q, a)[0]) for qa in d.values() for q, a in qa]
        und_max = max(lens)
        gen_max = max(len(self.seq.generation(p)[0]) for s in pool.samples for p in s.prompts)
        self.L = max(und_max, gen_max)
        self.S = max(und_max - 1 + self.M, gen_max - 1 + self.M + (self.M if self.n_dummy else 0))
        self._templates: Dict[tuple, tuple] = {}

    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([int(self.cfg.seed) & 0xFFFFFFFF, 0x7EA1, int(step)])

    def _template(self, key, ids: np.ndarray, labels: np.ndarray, has_dummy: bool):
        """Per-sample layout, cached by content: kind (S,) 0 pad / 1 text / 2 image / 3 dummy, local index (S,),
        shifted targets (S,), §12.1 mask (S,S) with the padding run, image positions (M,)."""
        hit = self._templates.get(key)
        if hit is not None:
            return hit
        M, S = self.M, self.S
        n = len(ids)
        ph = int(np.flatnonzero(ids < 0)[0])
        kind = np.zeros(S, np.int8)
        local = np.zeros(S, np.int64)
        lab = np.full(S, IGNORE_INDEX, np.int64)
        p = 0
        if has_dummy:
            kind[:M], local[:M] = 3, np.arange(M)
            p = M
        kind[p:p + ph], local[p:p + ph], lab[p:p + ph] = 1, np.arange(ph), labels[:ph]   # text before the image
        p += ph
        kind[p:p + M], local[p:p + M] = 2, np.arange(M)                                 # image block
        image_pos = p + np.arange(M)
        p += M
        rest = n - ph - 1
        kind[p:p + rest], local[p:p + rest] = 1, ph + 1 + np.arange(rest)              # text after the image
        lab[p:p + rest] = labels[ph + 1:]
        p += rest
        flags = np.zeros(p, bool)
        flags[image_pos] = True
        mask = np.zeros((S, S), bool)
        mask[:p, :p] = prefill_mask(flags)
        mask[p:, p:] = True                                     # padding attends to its own run only
        targets = np.full(S, IGNORE_INDEX, np.int64)
        targets[:-1] = lab[1:]                                  # next-token shift
        targets[image_pos[-1]] = IGNORE_INDEX                   # no "<im_end> after the last image token" label
        text = np.full(self.L, self.pad_id, np.int64)
        text[:n] = np.where(ids >= 0, ids, self.pad_id)
        hit = (kind, local, targets, mask, image_pos, text)
        self._templates[key] = hit
        return hit

    def __call__(self, step: int) -> Batch:
        rng = self.rng(step)
        cfg, seq, pool = self.cfg, self.seq, self.pool
        B, M, L = self.bsz, self.M, self.L
        latent_idx = rng.integers(len(pool), size=B)
        rows = []
        types = W.QUESTION_TYPES
        for b in range(B):
            k = int(latent_idx[b])
            if b < self.n_und:
                if rng.random() < cfg.caption_prob:
                    q, a = DESCRIBE_QUESTION, pool.samples[k].caption
                else:
                    qa = pool.qa_by_type[k][types[int(rng.integers(len(types)))]]
                    q, a = qa[int(rng.integers(len(qa)))]
                key = ("u", q, a)
                ids, labels = seq.understanding(q, a)
                rows.append(self._template(key, ids, labels, False))
            else:
                prompts = pool.samples[k].prompts
                prompt = prompts[int(rng.integers(len(prompts)))]
                ids, labels = seq.generation(prompt)
                drop = bool(rng.random() < cfg.cfg_dropout)
                if drop:
                    ids = seq.uncond(ids)               # labels stay unchanged (§14.1)
                has_dummy = b - self.n_und < self.n_dummy
                rows.append(self._template(("g", prompt, drop, has_dummy), ids, labels, has_dummy))
        t = np.ones(B, np.float32)
        u = rng.random(self.n_gen).astype(np.float32)
        t[self.n_und:] = bf16_round(np.clip(u, 1e-6, 1 - 1e-6))
        noise = rng.standard_normal((B,) + self.latent_shape, dtype=np.float32)
        dummy_idx = rng.integers(cfg.dummy_pool, size=self.n_dummy)

        kind, local, targets, mask, image_pos, text_ids = (np.stack(x) for x in zip(*rows))
        bcol = np.arange(B)[:, None]
        dslot = np.clip(bcol - self.n_und, 0, None)             # dummy slot of generation sample b
        zero_row = B * L + B * M + self.n_dummy * M
        gather = np.select([kind == 1, kind == 2, kind == 3],
                           [bcol * L + local, B * L + bcol * M + local, B * L + B * M + dslot * M + local],
                           zero_row)
        is_gen = np.arange(B) >= self.n_und
        return Batch(text_ids, gather.astype(np.int64), mask[:, None], targets, image_pos,
                     latent_idx.astype(np.int64), dummy_idx.astype(np.int64), t, noise, is_gen)


def prefetch(builder: BatchBuilder, start: int, stop: int, depth: int = 3) -> Iterator[Tuple[int, Batch]]:
    """Yield (step, batch) for start <= step < stop, built `depth` steps ahead in a background thread."""
    if depth <= 0:
        for s in range(start, stop):
            yield s, builder(s)
        return
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    stop_flag = threading.Event()

    def work():
        try:
            for s in range(start, stop):
                if stop_flag.is_set():
                    return
                q.put((s, builder(s)))
        except BaseException as exc:  # surface errors in the consumer
            q.put(exc)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        for _ in range(start, stop):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop_flag.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)
