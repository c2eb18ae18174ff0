"""What the two exported-graph backends (ONNX Runtime, TensorRT) share: the manifest checks, the KV-cache name
templates, the attention mask over the static cache, position ids, cache bounds and the host embedding lookup.
No torch.

    backbone feed:  inputs_embeds (B,S,D), position_ids (B,S) = start..start+S-1,
                    attention_mask (B,1,S,T+S) bool over [cache slots 0..T-1 | the S new positions],
                    past_key_values.{i}.key/.value = the whole (B,Hkv,T,Dh) buffer of layer i
    backbone out:   hidden_states (B,S,D), logits (B,V) of the last position, present.{i}.key/.value (B,Hkv,S,Dh)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..config import CheersConfig
from ..errors import CheckpointError, InputError
from ..fileio import load_npy
from ..manifest import Manifest
from .backend import Backend, lookup_embeddings


def manifest_config(man: Manifest) -> CheersConfig:
    """The manifest's 'config' section as a CheersConfig: typed field by field and bounded (config.check), errors
    naming manifest.json and the field."""
    where = f"{man._where()}: field 'config'"
    if not man.config:
        raise CheckpointError(f"{man._where()}: the manifest has no 'config' section; re-export")
    cfg = CheersConfig.from_dict(man.config, where=where)
    cfg.check(where)
    return cfg


class GraphBackend(Backend):
    """Base of OrtBackend and TrtBackend: call `_open_workdir` first in __init__."""

    def _open_workdir(self, workdir, manifest: Optional[Manifest], graphs: Sequence[str],
                      graph_files: bool = True) -> None:
        """Load and check the manifest; `graph_files=False` checks the graphs' entries but not their ONNX files.

        Before anything large is loaded or run: every file the manifest names stays inside the workdir
        (Manifest.path), the graphs all come from the manifest's checkpoint (check_provenance: a mixed workdir is
        refused), the sections agree with the model config and the backbone's cache tensors (check_model), and the
        embedding table is a plain 2-D float32 (vocab, hidden) array (load_npy: never pickles)."""
        self.workdir = Path(workdir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.workdir)
        if self.manifest.workdir is None:
            self.manifest.workdir = self.workdir
        self.where = f"workdir {self.workdir}"
        self.manifest.check_provenance()
        cfg = manifest_config(self.manifest)
        self.manifest.check_model(cfg)
        self.manifest.check_files(graphs if graph_files else ())
        cache = self.manifest.check_cache_layout()
        self.max_context = int(self.manifest.require("max_context"))
        self.tokens_per_image = int(self.manifest.require("image").tokens_per_image)
        self.num_layers, self.kv_heads, self.head_dim = cache.num_layers, cache.num_kv_heads, cache.head_dim
        self._past_k, self._past_v = cache.names("past_key"), cache.names("past_value")
        self._present_k, self._present_v = cache.names("present_key"), cache.names("present_value")
        self._bb_in: Sequence[str] = ()
        self._bb_out: Sequence[str] = ()
        if "backbone" in graphs:
            bb = self.manifest.graph("backbone")
            if len(bb.inputs) < 3 or len(bb.outputs) < 2:
                raise CheckpointError(f"{self.where}: the backbone entry lacks its inputs/outputs; re-export")
            self._bb_in = bb.input_names[:3]          # inputs_embeds, position_ids, attention_mask
            self._bb_out = bb.output_names[:2]        # hidden_states, logits
            if bb.inputs[1].dtype != "int64" or bb.inputs[2].dtype != "bool":
                raise CheckpointError(f"{self.where}: backbone inputs 2-3 must be int64 position_ids and a bool "
                                      f"attention_mask; re-export")
        t = cfg.text_config
        self.embed_table = load_npy(self.manifest.embed_path,                   # (V,D) float32, memory-mapped
                                    f"{self.manifest.embed_path} (manifest field 'embed_tokens.file')",
                                    dtype=np.float32, ndim=2, shape=(t.vocab_size, t.hidden_size))
        self._mask_memo: Optional[tuple] = None

    # -- host <-> backend (numpy on the host; the TensorRT backend extends these for device arrays)
    def from_numpy(self, a):
        a = np.asarray(a)
        return np.ascontiguousarray(a, np.float32) if np.issubdtype(a.dtype, np.floating) else a

    def to_numpy(self, a):
        return np.asarray(a)

    def repeat_batch(self, a, n):
        return np.repeat(np.asarray(a), n, axis=0)

    def concat_seq(self, parts):
        return np.concatenate([np.asarray(p) for p in parts], axis=1)

    def concat_batch(self, parts):
        return np.concatenate([np.asarray(p) for p in parts], axis=0)

    def embed(self, ids):
        return lookup_embeddings(self.embed_table, ids)

    # -- backbone feeds
    def _check_new_cache(self, max_len: int) -> None:
        if max_len > self.max_context:
            raise InputError(f"{max_len} positions requested, more than the context of {self.max_context} this "
                             f"workdir was exported for (re-export with a larger --max-context)")

    @staticmethod
    def _check_bounds(cache_batch: int, total: int, b: int, s: int, start: int) -> None:
        if b > cache_batch:
            raise InputError(f"batch {b} exceeds the cache batch {cache_batch}")
        if start < 0 or start + s > total:
            raise InputError(f"KV cache overflow: positions {start}..{start + s - 1} do not fit {total} slots")

    @staticmethod
    def _positions(b: int, s: int, start: int) -> np.ndarray:
        return np.ascontiguousarray(np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (b, s)))

    def _attention_mask(self, b: int, s: int, start: int, total: int,
                        mask: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[tuple]]:
        """(B,1,S,T+S) bool over [cache slots 0..T-1, the S new positions]: slots < start are the past, slots >= start
        are stale or empty and always hidden. Returns the mask and, for the all-allowed mask, a key naming its
        content (image steps repeat the same one; it is built once and may be uploaded once)."""
        if mask is None:
            key = ("all", b, s, start, total)
            if self._mask_memo is not None and self._mask_memo[0] == key:
                return self._mask_memo[1], key
            full = np.zeros((b, 1, s, total + s), dtype=bool)
            full[..., :start] = True
            full[..., total:] = True
            self._mask_memo = (key, full)
            return full, key
        mask = np.asarray(mask, dtype=bool)
        if mask.shape[-2:] != (s, start + s):
            raise InputError(f"mask must have shape (S, start+S) = {(s, start + s)}, got {mask.shape}")
        m = mask if mask.ndim == 3 else mask[None]  # (B|1,S,start+S)
        full = np.zeros((b, 1, s, total + s), dtype=bool)
        full[:, 0, :, :start] = m[..., :start]
        full[:, 0, :, total:] = m[..., start:]
        return full, None
