"""The contract between the pipeline loop and a backend (torch, onnxruntime, TensorRT).

A backend runs the five graph-shaped stages and owns the KV cache storage. The pipeline owns all
control flow (prefill, decode, Euler loop, CFG, cache lengths), so it is written once.

Arrays passed between stages are the backend's own type (torch tensors, numpy arrays, device
buffers); the loop only applies `+`, `-`, `*` and slicing on the batch axis to latents and velocities,
which every array type supports. Host-side data enters through numpy.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import numpy as np


class Backend:
    name = "abstract"

    # -- host <-> backend --
    def from_numpy(self, a: np.ndarray):
        raise NotImplementedError

    def to_numpy(self, a) -> np.ndarray:
        raise NotImplementedError

    def repeat_batch(self, a, n: int):
        """(1,...) -> (n,...)."""
        raise NotImplementedError

    def concat_seq(self, parts):
        """Concatenate (B,S_i,D) arrays along the sequence axis."""
        raise NotImplementedError

    def concat_batch(self, parts):
        """Concatenate (B_i,...) arrays along the batch axis."""
        raise NotImplementedError

    # -- stages --
    def embed(self, ids: np.ndarray):
        """ids (B,S) int64 -> embeddings (B,S,D)."""
        raise NotImplementedError

    def vae_encode(self, pixels: np.ndarray):
        """pixels (B,3,H,W) float32 in [0,1] -> latent (B,C,h,w)."""
        raise NotImplementedError

    def vision_tokenize(self, latent):
        """latent (B,C,h,w) -> (semantic tokens (B,M,Dt), patch embeddings (B,4M,Dv))."""
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int):
        """Preallocate the KV cache for `max_len` positions; never reallocated afterwards."""
        raise NotImplementedError

    def backbone(self, cache, embeds, start: int, mask: Optional[np.ndarray]):
        """Run the LM on embeds (B,S,D) at positions start..start+S-1 over cache[:start]; write the new K/V at
        cache[start:start+S]. mask: (S, start+S) bool for prefill, None for all-allowed. -> hidden (B,S,D)."""
        raise NotImplementedError

    def logits(self, hidden_last) -> np.ndarray:
        """hidden (B,D) -> float32 logits (B,V) on the host."""
        raise NotImplementedError

    def cfm_head(self, hidden, patch_embeds, t: np.ndarray):
        """hidden (B,M,Dt), patch_embeds (B,4M,Dv), t (B,) float32 -> velocity (B,C,h,w)."""
        raise NotImplementedError

    def vae_decode(self, latent) -> np.ndarray:
        """latent (B,C,h,w) -> pixels (B,3,H,W) float32 on the host (unclamped)."""
        raise NotImplementedError

    def synchronize(self):
        """Wait for queued device work (for honest stage timings)."""


def lookup_embeddings(table: np.ndarray, ids) -> np.ndarray:
    """Token embedding lookup on the host from the exported table (no torch): ids (B,S) -> (B,S,D) float32."""
    from ..errors import InputError

    ids = np.asarray(ids, dtype=np.int64)
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise InputError(f"token id out of range [0, {v}): {int(ids.min())}..{int(ids.max())}")
    return np.asarray(table[ids], dtype=np.float32)


class StageTimer:
    """Wall-clock per stage; backends with asynchronous devices synchronise before reading the clock."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.times: Dict[str, List[float]] = {}
        self.enabled = True

    @contextmanager
    def __call__(self, stage: str):
        if not self.enabled:
            yield
            return
        self.backend.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.backend.synchronize()
            self.times.setdefault(stage, []).append(time.perf_counter() - t0)

    def reset(self):
        self.times = {}

    def summary(self) -> Dict[str, Dict[str, float]]:
        return {k: {"calls": len(v), "total_s": float(sum(v)), "mean_ms": 1e3 * float(np.mean(v))}
                for k, v in self.times.items()}
