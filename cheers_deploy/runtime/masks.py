"""The prefill attention mask of §12.1 for one unpadded sequence (True = may attend)."""

from __future__ import annotations

import numpy as np


def prefill_mask(image_flags: np.ndarray) -> np.ndarray:
    """image_flags (S,) bool: True on positions filled from an explicit image placeholder (not the dummy
    block). Text is causal; tokens of one image run attend to each other bidirectionally. Returns (S, S)."""
    flags = np.asarray(image_flags, dtype=bool)
    s = len(flags)
    causal = np.tril(np.ones((s, s), dtype=bool))
    # run id: increments at every flag change, so two positions share a run iff equal ids
    run = np.concatenate([[0], np.cumsum(flags[1:] != flags[:-1])])
    same_image = flags[:, None] & flags[None, :] & (run[:, None] == run[None, :])
    return causal | same_image
