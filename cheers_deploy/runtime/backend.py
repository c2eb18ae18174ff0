"""The contract between the pipeline loop and a backend (torch, onnxruntime, TensorRT).

A backend runs the five graph-shaped stages and owns the KV cache storage. The pipeline owns all control flow
(prefill, decode, Euler loop, CFG, cache lengths) and tells the backend which phase a backbone call belongs to, so
the loop is written once and no backend guesses the phase from shapes or positions.

Arrays passed between stages are the backend's own type (torch tensors, numpy arrays, device buffers); the loop only
applies `+`, `-`, `*` and slicing on the batch axis to latents and velocities, which every array type supports.
Host-side data enters through numpy. Every array a stage returns belongs to the caller: a later call never
overwrites it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..constants import MODES
from ..errors import InputError

PREFILL, DECODE, IMAGE_STEP = MODES


class Backend:
    name = "abstract"
    max_context: Optional[int] = None     # the most positions a cache may hold (None: whatever new_cache is asked)

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

    def backbone(self, cache, embeds, start: int, mask: Optional[np.ndarray], mode: str) -> Tuple[object, Optional[np.ndarray]]:
        """Run the LM on embeds (B,S,D) at positions start..start+S-1 over cache[:start]; write the new K/V at
        cache[start:start+S]. mask: (S, start+S) bool for prefill, None for all-allowed. mode: 'prefill', 'decode'
        or 'image_step' (which TensorRT profile / CUDA graph runs it).
        Returns (hidden (B,S,D), logits of the last position (B,V) float32 on the host), the logits None for
        'image_step' (nothing samples from them)."""
        raise NotImplementedError

    def cfm_head(self, hidden, patch_embeds, t: np.ndarray):
        """hidden (B,M,Dt), patch_embeds (B,4M,Dv), t (B,) float32 -> velocity (B,C,h,w)."""
        raise NotImplementedError

    def vae_decode(self, latent) -> np.ndarray:
        """latent (B,C,h,w) -> pixels (B,3,H,W) float32 on the host (unclamped)."""
        raise NotImplementedError

    def synchronize(self):
        """Wait for queued device work (for honest stage timings)."""

    def close(self):
        """Release what the backend holds (sessions, engines, device memory)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"backbone mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def lookup_embeddings(table: np.ndarray, ids) -> np.ndarray:
    """Token embedding lookup on the host from the exported table (no torch): ids (B,S) -> (B,S,D) float32."""
    ids = np.asarray(ids, dtype=np.int64)
    v = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= v):
        raise InputError(f"token id out of range [0, {v}): {int(ids.min())}..{int(ids.max())}")
    return np.asarray(table[ids], dtype=np.float32)
