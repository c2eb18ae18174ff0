"""Errors a user can act on. The CLI prints their message on one line and exits with code 2."""


class CheersError(Exception):
    """Base class: bad input, a broken checkpoint or workdir, a missing dependency."""


class CheckpointError(CheersError):
    """A checkpoint directory or file is missing, corrupt or does not match the config."""


class InputError(CheersError):
    """A prompt, an image or an argument is not usable."""


class MissingDependencyError(CheersError):
    """An optional dependency (torch, TensorRT, cuda-python...) is not installed."""


def require_torch():
    """Import torch or raise the install hint (the base install runs without it).

    Before torch's first import, OpenMP worker threads are told to sleep rather than spin while they wait
    (OMP_WAIT_POLICY=PASSIVE, unless the user set it): on a machine where other programs run, spinning threads
    made one image 8x slower (docs/performance.md, "Threads on a busy machine"). It has no effect once torch is
    loaded."""
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised in the no-torch test
        raise MissingDependencyError(
            "this feature needs PyTorch: install cheers-deploy[torch] (pip install torch==2.13.0)") from exc
    return torch
