"""The one Cheers pipeline: prefill, text decoding, the flow-matching Euler loop with time shift and
batched classifier-free guidance, editing (ARCHITECTURE.md §13). Every backend runs this same loop.

    ids ─ splice(image tokens | dummy block) ─ prefill (B=1, or B=2 cond+uncond for CFG)
        └ decode loop: sample; on <im_start> run the Euler loop on the cache, force <im_end>; stop on <|im_end|>
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..processor import load_image, make_dummy_image, preprocess_understanding
from ..tokenizer import IMAGE_PLACEHOLDER
from .backend import Backend, StageTimer
from .masks import prefill_mask
from .sampling import edit_steps, euler_dts, sample_token, schedule

MAX_RAW_IDS = 1024       # the official loop stops once the raw id sequence exceeds this (§17.26)


@dataclass
class GenerateOutput:
    image: Optional[np.ndarray]          # uint8 (H, W, 3) RGB, the first generated image
    latent: Optional[np.ndarray]         # float32 (C, h, w) final latent of that image
    token_ids: List[int]                 # new ids (start with the forced <im_end> after an image)
    text: str
    images: List[np.ndarray] = field(default_factory=list)
    latents: List[np.ndarray] = field(default_factory=list)
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)


@dataclass
class AnswerOutput:
    text: str
    token_ids: List[int]                 # new ids only
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)


@dataclass
class _ImageSpec:
    steps: int
    cfg_scale: Optional[float]
    alpha: float
    noise: Optional[np.ndarray]
    edit_latent: Optional[object] = None  # backend latent of the edit source (editing mode)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(3,H,W) float in ~[0,1] -> (H,W,3) uint8, clamp then x*255+0.5 truncated (torchvision save_image)."""
    x = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
    return np.floor(x * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


class Pipeline:
    def __init__(self, backend: Backend, tokenizer, processor, config=None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.special = tokenizer.special
        self.timer = StageTimer(backend)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, checkpoint_dir=None, backend: str = "torch", device: str = "cpu",
                        dtype: str = "float32", **kw) -> "Pipeline":
        """A checkpoint in the official layout, run by the torch reference backend."""
        from ..checkpoint import load_config, load_state_into
        from ..defaults import resolve_checkpoint
        from ..processor import Processor
        
        if backend != "torch":
            raise InputError(f"a checkpoint runs on the torch backend; for '{backend}' export it first "
                             f"(cheers-deploy export) and use Pipeline.from_workdir")
        ckpt = resolve_checkpoint(checkpoint_dir)
        cfg = load_config(ckpt)
        from ..model import CheersModel
        from .torch_backend import TorchBackend

        import torch
        with torch.device("meta"):
            model = CheersModel(cfg)
        model = model.to_empty(device="cpu")
        model.tie_weights()
        load_state_into(model, ckpt)
        proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size)
        return cls(TorchBackend(model, device=device, dtype=dtype), proc.tokenizer, proc, cfg)

    @classmethod
    def from_workdir(cls, workdir, backend: str = "ort", **kw) -> "Pipeline":
        """Exported graphs (cheers-deploy export) run by onnxruntime ('ort') or TensorRT ('trt')."""
        from .workdir import open_workdir

        return open_workdir(cls, workdir, backend=backend, **kw)

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: str, steps: int = 80, cfg_scale: Optional[float] = 9.5, alpha: float = 0.5,
                 seed: int = 0, noise: Optional[np.ndarray] = None, dummy_image: Optional[np.ndarray] = None,
                 max_new_tokens: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                 progress: Optional[Callable[[int, int], None]] = None) -> GenerateOutput:
        """Text to image. `max_new_tokens` bounds the text decoded after the image (official max_length =
        tokens per image + max_new_tokens - 1)."""
        self._check_prompt(prompt)
        ids = self.processor.t2i_ids(prompt)
        spec = _ImageSpec(steps, cfg_scale, alpha, noise)
        return self._run(ids, [], dummy_image, seed, spec, max_new_tokens, temperature, top_p, progress)

    def edit(self, image, instruction: str, steps: int = 80, cfg_scale: Optional[float] = 9.5,
             alpha: float = 0.5, seed: int = 0, noise: Optional[np.ndarray] = None, max_new_tokens: int = 8,
             temperature: float = 0.0, top_p: float = 1.0,
             progress: Optional[Callable[[int, int], None]] = None) -> GenerateOutput:
        """Image editing (§13.4): the source enters the context and initialises the latent at t = 0.1."""
        self._check_prompt(instruction)
        img = load_image(image)
        ids = self.processor.edit_ids(instruction)
        spec = _ImageSpec(steps, cfg_scale, alpha, noise, edit_latent=True)
        return self._run(ids, [img], None, seed, spec, max_new_tokens, temperature, top_p, progress)

    def answer(self, image, question: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> AnswerOutput:
        """Image understanding: the question goes verbatim after `<im_start><image><im_end>\\n`."""
        img = load_image(image)
        ids = self.processor.understanding_ids(question)
        out = self._run(ids, [img], None, seed, None, max_new_tokens, temperature, top_p, None)
        return AnswerOutput(out.text, out.token_ids, out.timings)

    def chat(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, dummy_image: Optional[np.ndarray] = None) -> AnswerOutput:
        """Text-only chat; the seeded random dummy image is prepended as the official processor does."""
        self._check_prompt(prompt)
        ids = self.processor.chat_ids(prompt)
        out = self._run(ids, [], dummy_image, seed, None, max_new_tokens, temperature, top_p, None)
        return AnswerOutput(out.text, out.token_ids, out.timings)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_prompt(prompt):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty")

    def _image_features(self, pixels: np.ndarray):
        """(B,3,R,R) understanding pixels -> latent, semantic tokens (t = 1: x_t is the clean latent)."""
        be, timer = self.backend, self.timer
        with timer("vae_encode"):
            latent = be.vae_encode(pixels)
        with timer("vision_tokenizer"):
            tokens, _ = be.vision_tokenize(latent)
        return latent, tokens

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
            text = np.asarray(ids, np.int64)[None]
            segments.append(be.embed(text))
            flags += [False] * len(ids)
            return segments, np.asarray(flags)
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

    def _run(self, ids, images: List[np.ndarray], dummy_image, seed: int, spec: Optional[_ImageSpec],
             max_new_tokens: int, temperature: float, top_p: float, progress) -> GenerateOutput:
        be, timer, sp, proc = self.backend, self.timer, self.special, self.processor
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be >= 1")
        timer.reset()
        rng = np.random.default_rng(seed)
        # --- image inputs: explicit images, else the seeded dummy image (§13.1)
        if images:
            pix = np.stack([preprocess_understanding(im, proc.resolution) for im in images]).astype(np.float32)
        else:
            dummy = make_dummy_image(seed) if dummy_image is None else load_image(dummy_image)
            pix = preprocess_understanding(dummy, proc.resolution)[None].astype(np.float32)
        latents, tokens = self._image_features(pix)
        per_image = [tokens[i:i + 1] for i in range(tokens.shape[0])]
        grid = latents.shape[-1]                       # latent grid of the conditioning image (§17.28)
        m_tokens = tokens.shape[1]

        use_cfg = spec is not None and spec.cfg_scale is not None and float(spec.cfg_scale) != 1.0
        branches = [list(ids)] + ([proc.uncond_ids(ids)] if use_cfg else [])
        seg_flags = [self._splice(b, per_image) for b in branches]
        flags = seg_flags[0][1]
        embeds = self._concat([s for s, _ in seg_flags])
        s_len = embeds.shape[1]
        n_images_max = 1 if spec is not None else 0
        if spec is not None:
            max_length = m_tokens + max_new_tokens - 1
        else:
            max_length = max_new_tokens - 1
        capacity = s_len + max_new_tokens + n_images_max * (m_tokens + 1) + 1
        limit = getattr(be, "max_context", None)
        if limit is not None and s_len + (m_tokens + 1 if spec else 1) > limit:
            raise InputError(f"the prompt needs {s_len} positions, more than the context of {limit} "
                             f"this workdir was exported for (--max-context)")
        if limit is not None:
            capacity = min(capacity, limit)
        bsz = len(branches)
        cache = be.new_cache(bsz, capacity)
        with timer("prefill"):
            hidden = be.backbone(cache, embeds, 0, prefill_mask(flags))
        length = s_len
        h_last = hidden[:, -1]

        raw_ids = list(ids)
        new_ids: List[int] = []
        out_images, out_latents = [], []
        n_out, n_images = 0, 0
        last = raw_ids[-1]
        while True:
            if len(raw_ids) > MAX_RAW_IDS or n_out > max_length:
                break
            if last == sp.img_start:
                if n_images >= n_images_max or length + m_tokens + 1 > cache.max_len:
                    break
                x_final = self._euler(cache, length, spec, grid, m_tokens, latents, rng, bsz, progress)
                length += m_tokens                      # the last step's image entries stay (§17.10)
                with timer("decode"):
                    e = be.embed(np.full((bsz, 1), sp.img_end, np.int64))
                    hidden = be.backbone(cache, e, length, None)
                length += 1
                h_last = hidden[:, -1]
                raw_ids.append(sp.img_end)
                new_ids.append(sp.img_end)
                n_out += m_tokens
                n_images += 1
                out_latents.append(be.to_numpy(x_final)[0])
                with timer("vae_decode"):
                    pixels = be.vae_decode(x_final)
                out_images.append(to_uint8(pixels[0]))
                last = sp.img_end
                continue
            if last == sp.chat_end:
                break
            if length + 1 > cache.max_len:
                break
            with timer("lm_head"):
                logits = be.logits(h_last)
            toks = [sample_token(logits[b], temperature, top_p, rng) for b in range(bsz)]
            tok = toks[0]                               # batch element 0 drives control flow (§17.27)
            raw_ids.append(tok)
            new_ids.append(tok)
            with timer("decode"):
                hidden = be.backbone(cache, be.embed(np.asarray(toks, np.int64)[:, None]), length, None)
            length += 1
            h_last = hidden[:, -1]
            last = tok
            n_out += 1
        text = self.tokenizer.decode([i for i in new_ids if i >= 0], skip_special_tokens=True)
        return GenerateOutput(out_images[0] if out_images else None, out_latents[0] if out_latents else None,
                              new_ids, text, out_images, out_latents, timer.summary())

    def _concat(self, per_branch_segments):
        be = self.backend
        rows = [be.concat_seq(segs) for segs in per_branch_segments]
        return be.concat_batch(rows)

    def _euler(self, cache, start, spec: _ImageSpec, grid, m_tokens, latents, rng, bsz, progress):
        """The flow-matching loop on top of the prompt cache; image entries at start..start+M-1 are rewritten
        every step (equivalent to the official append-and-crop) and kept after the last step."""
        be, timer = self.backend, self.timer
        c = latents.shape[1]
        if spec.noise is not None:
            noise = np.asarray(spec.noise, np.float32)
            if noise.shape != (c, grid, grid):
                raise InputError(f"noise must have shape {(c, grid, grid)}, got {noise.shape}")
        else:
            noise = rng.standard_normal((c, grid, grid), dtype=np.float32)
        x = be.from_numpy(noise[None])
        if spec.edit_latent is not None:
            n = edit_steps(spec.steps)
            if n < 1:
                raise InputError("editing needs at least 2 steps")
            ts = schedule(n, spec.alpha, t_start=0.1)
            x = latents[:1] * 0.1 + x * 0.9         # unshifted 0.1 (§17.29)
        else:
            n = spec.steps
            if n < 1:
                raise InputError("steps must be >= 1")
            ts = schedule(n, spec.alpha)
        dts = euler_dts(ts)
        for i in range(n):
            with timer("vision_tokenizer"):
                tok, pe = be.vision_tokenize(x)     # once per step, shared by both CFG branches
            if bsz > 1:
                tok, pe = be.repeat_batch(tok, bsz), be.repeat_batch(pe, bsz)
            with timer("image_step"):
                hs = be.backbone(cache, tok, start, None)
            with timer("cfm_head"):
                v = be.cfm_head(hs, pe, np.full((bsz,), ts[i], np.float32))
            if bsz > 1:
                v = v[1:2] + (v[0:1] - v[1:2]) * float(spec.cfg_scale)
            x = x + v * float(dts[i])
            if progress is not None:
                progress(i + 1, n)
        return x
