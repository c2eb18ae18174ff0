"""Open an exported workdir: read manifest.json, check the files, build the backend, tokenizer and processor and
hand them to the pipeline class. No torch."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Optional, Sequence

from ..errors import CheckpointError, InputError, MissingDependencyError
from ..manifest import Manifest
from ..processor import Processor
from ..vocabulary import Vocabulary
from .graph_backend import manifest_config
from .threads import resolve_threads

# backend name -> (module, class); imported on demand so that `ort` never needs TensorRT and vice versa
BACKENDS = {"ort": ("cheers_deploy.runtime.ort_backend", "OrtBackend"),
            "trt": ("cheers_deploy.runtime.trt_backend", "TrtBackend")}


def backend_class(backend: str):
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' for a workdir; choose from {sorted(BACKENDS)}")
    module, name = BACKENDS[backend]
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise MissingDependencyError(f"the '{backend}' backend is not available: {exc}") from exc


def open_workdir(cls, workdir, backend: str = "ort", threads: Optional[int] = None, precision: Optional[str] = None,
                 providers=None, observers: Sequence = (), timings: bool = True, **options):
    """`cls(backend, tokenizer, processor, config, ...)` for the graphs in `workdir`. Raises CheckpointError naming
    the graph and tensor when a file is missing or a graph does not match the manifest; InputError for an option
    the backend does not take."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    backend_cls = backend_class(backend)
    accepted = set(inspect.signature(backend_cls.__init__).parameters) - {"self", "workdir", "manifest"}
    kw = dict(options)
    if precision is not None:
        kw["precision"] = precision
    if providers is not None:
        kw["providers"] = providers
    if "threads" in accepted:
        kw["threads"] = resolve_threads(threads)
    elif threads is not None:
        raise InputError(f"the '{backend}' backend runs on the GPU: threads= does not apply")
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise InputError(f"the '{backend}' backend takes no option(s) {', '.join(unknown)} "
                         f"(it takes: {', '.join(sorted(accepted))})")
    be = backend_cls(workdir, manifest=man, **kw)
    cfg = manifest_config(man)                # typed and bounded (the backend checked it against the graphs)
    img = man.require("image")
    proc = Processor.from_dir(workdir, resolution=img.resolution)
    if proc.tokens_per_image != img.tokens_per_image:
        raise CheckpointError(f"{workdir}: the processor gives {proc.tokens_per_image} tokens per image, the "
                              f"graphs were exported for {img.tokens_per_image}; re-export")
    special = {k: int(v) for k, v in vars(proc.special).items()}
    if man.special_tokens and special != man.special_tokens:
        raise CheckpointError(f"{workdir}: tokenizer special-token ids {special} differ from the manifest's "
                              f"{man.special_tokens}; re-export")
    return cls(be, proc.tokenizer, proc, cfg, generation=man.generation, observers=observers, timings=timings,
               vocabulary=Vocabulary.load(workdir))
