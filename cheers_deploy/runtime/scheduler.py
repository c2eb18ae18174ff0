"""The flow-matching Euler scheduler (docs/architecture.md §13.3, §13.4), shaped like diffusers'
FlowMatchEulerDiscreteScheduler: the time table lives on the host in float32, `step` is one Euler update.

    set_timesteps(N):  t_n = shift(linspace(t_start, 1, N)), dt_n = t_{n+1} - t_n, and 1/N for the last step
    step(v, n, x):     x + v * dt_n        (v: the guided velocity at t_n)
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .sampling import edit_steps, euler_dts, schedule


class FlowMatchEulerScheduler:
    def __init__(self, alpha: float, t_start: float = 0.0):
        self.alpha = float(alpha)
        self.t_start = float(t_start)
        self.timesteps = np.zeros(0, np.float32)
        self.dts = np.zeros(0, np.float32)

    @classmethod
    def for_edit(cls, alpha: float) -> "FlowMatchEulerScheduler":
        """Editing starts from t = 0.1 (the source latent mixed into the noise, §13.4)."""
        return cls(alpha, t_start=0.1)

    def num_steps(self, steps: int) -> int:
        """Steps actually run: editing runs floor(N * 0.9) of the N asked for (§13.4)."""
        return edit_steps(steps, self.t_start) if self.t_start > 0 else int(steps)

    def set_timesteps(self, steps: int) -> "FlowMatchEulerScheduler":
        n = self.num_steps(steps)
        if n < 1:
            raise InputError("editing needs at least 2 steps" if self.t_start > 0 else "steps must be >= 1")
        self.timesteps = schedule(n, self.alpha, t_start=self.t_start)
        self.dts = euler_dts(self.timesteps)
        return self

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, velocity, n: int, x):
        """One Euler update of the latent x (any array type with + and *)."""
        return x + velocity * float(self.dts[n])
