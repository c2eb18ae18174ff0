"""Watching a pipeline run without changing it: the observer hooks (diffusers' callback_on_step_end, widened to the
stages and the decoded tokens) and the stage timer built on them.

    Pipeline ─ stage ──► on_stage_start(stage, phase) … on_stage(stage, phase, seconds)
             ─ token ──► on_token(index, token_id, logits)        (after sampling, batch element 0's logits)
             ─ step  ──► on_step(step, num_steps, t, latent)      (after each Euler update; latent in the backend's type)

Phases: 'encode' (image features), 'prefill', 'decode', 'denoise', 'output' (VAE decode). A hook may raise (for
example to cancel a request whose client went away): the exception leaves the pipeline call unchanged.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

PHASES = ("encode", "prefill", "decode", "denoise", "output")


class PipelineObserver:
    """No-op hooks; subclass and override what you need."""

    def on_stage_start(self, stage: str, phase: str) -> None:
        pass

    def on_stage(self, stage: str, phase: str, seconds: Optional[float]) -> None:
        """After a stage call; `seconds` is its synchronised wall time when the pipeline collects timings."""

    def on_token(self, index: int, token_id: int, logits: np.ndarray) -> None:
        """After token `index` (0-based, new tokens only) was sampled from `logits` (V,) of batch element 0."""

    def on_step(self, step: int, num_steps: int, t: float, latent) -> None:
        """After Euler step `step` (1-based) of `num_steps`, taken from time `t`; `latent` is the updated x."""


class StageTimer(PipelineObserver):
    """Per stage, the wall time of every call (filled only when the pipeline collects timings)."""

    def __init__(self):
        self.times: Dict[str, List[float]] = {}

    def reset(self) -> None:
        self.times = {}

    def on_stage(self, stage, phase, seconds):
        if seconds is not None:
            self.times.setdefault(stage, []).append(seconds)

    def summary(self) -> Dict[str, Dict[str, float]]:
        return {k: {"calls": len(v), "total_s": float(sum(v)), "mean_ms": 1e3 * float(np.mean(v))}
                for k, v in self.times.items()}


class ProgressObserver(PipelineObserver):
    """Adapts a `progress(i, n)` callback to the step hook."""

    def __init__(self, progress):
        self.progress = progress

    def on_step(self, step, num_steps, t, latent):
        self.progress(step, num_steps)
