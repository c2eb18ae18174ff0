"""Host-side pieces of the samplers (no torch): the flow-matching time grid and the text-token sampler."""

from __future__ import annotations

import numpy as np


def time_shift(t, alpha: float):
    """shift(t) = alpha*t / (1 + (alpha-1)*t); alpha < 1 spends more steps near t = 0 (noise) (§17.9)."""
    t = np.asarray(t, dtype=np.float32)
    return (np.float32(alpha) * t / (np.float32(1.0) + np.float32(alpha - 1.0) * t)).astype(np.float32)


def schedule(steps: int, alpha: float, t_start: float = 0.0) -> np.ndarray:
    """t_n = shift(linspace(t_start, 1, steps)) in float32; t_0 = shift(t_start), t_{N-1} = 1 (§13.3, §13.4)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return time_shift(np.linspace(t_start, 1.0, steps, dtype=np.float32), alpha)


def euler_dts(ts: np.ndarray) -> np.ndarray:
    """Step sizes: t_{n+1} - t_n, and 1/N for the last step (model evaluated at t = 1, §17.7)."""
    n = len(ts)
    return np.append(np.diff(ts).astype(np.float32), np.float32(1.0 / n))


def edit_steps(steps: int, t_start: float = 0.1) -> int:
    """Editing runs floor(N * (1 - 0.1)) steps (float product truncated, §13.4)."""
    return int(steps * (1 - t_start))


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from a (V,) logit row: argmax (first max) for T <= 1e-6, else nucleus sampling (§13.2)."""
    if temperature <= 1e-6:
        return int(np.argmax(logits))
    l = logits.astype(np.float32) / np.float32(temperature)
    if top_p < 1.0:
        order = np.argsort(-l, kind="stable")
        sl = l[order]
        p = np.exp(sl - sl.max())
        p /= p.sum()
        cum = np.cumsum(p)
        keep = np.ones_like(sl, dtype=bool)
        keep[1:] = cum[:-1] <= top_p
        kl = sl[keep]
        q = np.exp(kl - kl.max())
        q /= q.sum()
        return int(order[np.flatnonzero(keep)[rng.choice(len(kl), p=q)]])
    p = np.exp(l - l.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))
