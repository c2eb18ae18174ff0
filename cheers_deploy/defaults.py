"""Where the bundled default model lives, and how a missing --checkpoint resolves to it."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

BUNDLED = Path(__file__).resolve().parent / "assets" / "tiny-shapes"


def bundled_checkpoint() -> Path:
    return BUNDLED


def resolve_checkpoint(path=None) -> Path:
    """`path`, or the bundled tiny-shapes model when None."""
    if path is None:
        if not (BUNDLED / "config.json").is_file():
            raise CheckpointError("no --checkpoint given and the bundled default model is not installed "
                                  f"(expected {BUNDLED})")
        return BUNDLED
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {p}")
    return p
