"""Building a torch-backend pipeline from a checkpoint (local folder, Hub id or the bundled model): config, weights,
processor, generation defaults and vocabulary. Imported lazily (it needs torch)."""

from __future__ import annotations

from typing import Optional, Sequence

from ..checkpoint import load_config, load_state_into
from ..hub import resolve_checkpoint
from ..manifest import GenerationDefaults
from ..processor import Processor
from ..vocabulary import Vocabulary


def load_checkpoint_pipeline(cls, checkpoint=None, device: str = "cpu", dtype: str = "float32",
                             threads: Optional[int] = None, revision: Optional[str] = None,
                             observers: Sequence = (), timings: bool = True, cuda_graphs: bool = False,
                             compile: Optional[str] = None):
    from ..errors import require_torch

    torch = require_torch()
    from ..model import CheersModel
    from .torch_backend import TorchBackend, check_fast_path

    check_fast_path(device, None, cuda_graphs, compile)        # refused before the weights are read

    ckpt = resolve_checkpoint(checkpoint, revision=revision)
    cfg = load_config(ckpt)
    proc = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size)
    generation = GenerationDefaults.from_generation_config(ckpt / "generation_config.json")
    vocabulary = Vocabulary.load(ckpt)
    with torch.device("meta"):
        model = CheersModel(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    load_state_into(model, ckpt)
    backend = TorchBackend(model, device=device, dtype=dtype, threads=threads, cuda_graphs=cuda_graphs,
                           compile=compile)
    return cls(backend, proc.tokenizer, proc, cfg, generation=generation, observers=observers, timings=timings,
               vocabulary=vocabulary)
