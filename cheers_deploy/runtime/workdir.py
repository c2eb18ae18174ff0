"""Open an exported workdir: read manifest.json, check the files, build the backend, tokenizer and processor
and hand them to the pipeline class. No torch."""

from __future__ import annotations

import importlib
from pathlib import Path

from ..config import CheersConfig
from ..errors import CheckpointError, InputError, MissingDependencyError
from ..processor import Processor
from .manifest import Manifest

# backend name -> (module, class); imported on demand so that `ort` never needs TensorRT and vice versa
BACKENDS = {"ort": ("cheers_deploy.runtime.ort_backend", "OrtBackend"),
            "trt": ("cheers_deploy.runtime.trt_backend", "TrtBackend")}


def open_workdir(cls, workdir, backend: str = "ort", providers=None, **kw):
    """`cls(backend, tokenizer, processor, config)` for the graphs in `workdir`. Raises CheckpointError naming
    the graph and tensor when a file is missing or a graph does not match the manifest."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' for a workdir; choose from {sorted(BACKENDS)}")
    module, name = BACKENDS[backend]
    try:
        backend_cls = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise MissingDependencyError(f"the '{backend}' backend is not available: {exc}") from exc
    if providers is not None:
        kw["providers"] = providers
    be = backend_cls(workdir, manifest=man, **kw)
    try:
        cfg = CheersConfig.from_dict(man.config)
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"{workdir}/manifest.json: bad model config ({exc}); re-export") from None
    img = man.image
    proc = Processor.from_dir(workdir, resolution=int(img["resolution"]))
    if proc.tokens_per_image != int(img["tokens_per_image"]):
        raise CheckpointError(f"{workdir}: the processor gives {proc.tokens_per_image} tokens per image, the "
                              f"graphs were exported for {img['tokens_per_image']}; re-export")
    special = {k: int(v) for k, v in vars(proc.special).items()}
    if man.data.get("special_tokens") and special != man.data["special_tokens"]:
        raise CheckpointError(f"{workdir}: tokenizer special-token ids {special} differ from the manifest's "
                              f"{man.data['special_tokens']}; re-export")
    return cls(be, proc.tokenizer, proc, cfg)
