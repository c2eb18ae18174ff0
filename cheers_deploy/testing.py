"""Helpers for the test suite (and for anyone who needs a throw-away checkpoint): random checkpoints in the
official layout, the location of the in-repo official reference set.

`write_random_checkpoint` follows the weight recipe of the official-tiny reference set
(`tests/data/official-tiny/README.md`, "The recipe"): every parameter and buffer gets seeded random
values, the official zero-initialised layers (AdaLN modulation, hi-gate output) are non-zero so that every
path affects the outputs, BatchNorm statistics are realistic, the text q/k projections get a x3 gain and the
final velocity layer a 0.05 gain. Needs torch (the model is built with `CheersModel`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np

from .config import CheersConfig

PathLike = Union[str, Path]

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OFFICIAL_VOCAB_SIZE = 151936        # the Qwen2 table + the five Cheers tokens fit below this (§15.1)


def reference_dir() -> Path:
    """Where the official-tiny reference set lives: `<repo>/tests/data/official-tiny`, inside the repository
    (present in every clone; absent only from a non-editable install, which ships the package without tests/)."""
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "official-tiny"


def tiny_config(vocab_size: int = OFFICIAL_VOCAB_SIZE) -> CheersConfig:
    """The `tiny` preset with a text vocabulary large enough for the official tokenizer (the preset has 512)."""
    cfg = CheersConfig.from_name("tiny")
    cfg.text_config.vocab_size = int(vocab_size)
    return cfg


def _rule(name: str, module, shape) -> Dict[str, float]:
    """(dist, offset, scale) of one tensor, by the reference recipe's rules."""
    import torch.nn as nn

    from .model.layers import RMSNorm

    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.BatchNorm2d) or leaf in ("running_mean", "running_var", "num_batches_tracked"):
        if leaf == "running_mean":
            return {"dist": "normal", "offset": 0.0, "scale": 0.5}
        if leaf == "running_var":
            return {"dist": "uniform", "offset": 0.5, "scale": 1.5}      # U(0.5, 2)
        return {"dist": "constant", "value": 0}
    is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, RMSNorm))
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    if name == "model.hi_projector.diffusion_head_b.linear.weight":
        return {"dist": "normal", "offset": 0.0, "scale": 0.05 / math.sqrt(fan_in)}
    if name == "model.hi_projector.diffusion_head_b.linear.bias":
        return {"dist": "normal", "offset": 0.0, "scale": 0.0025}
    if is_norm and leaf == "weight":
        return {"dist": "normal", "offset": 1.0, "scale": 0.1}
    lm_qk = name.startswith("model.language_model.layers.") and (".q_proj." in name or ".k_proj." in name)
    if "bias" in leaf:                      # .bias, in_proj_bias
        return {"dist": "normal", "offset": 0.0, "scale": 0.15 if lm_qk else 0.05}
    if name == "model.language_model.embed_tokens.weight" or name.endswith("position_embedding.weight"):
        return {"dist": "normal", "offset": 0.0, "scale": 0.5}
    if leaf == "probe":
        return {"dist": "normal", "offset": 0.0, "scale": 1.0}
    return {"dist": "normal", "offset": 0.0, "scale": (3.0 if lm_qk else 1.0) / math.sqrt(fan_in)}


def fill_random_(model, seed: int = 0, prefix: str = ""):
    """Overwrite every parameter and buffer of a `CheersModel` in place with seeded random values (numpy RNG,
    one generator per tensor: `default_rng((seed, index))` over sorted names). Tied parameters are filled once.
    For a submodule, `prefix` is its path inside `CheersModel` (e.g. "model.language_model."), so that the
    name-based rules (text q/k gain, velocity-head gain, embeddings) apply. Returns the model."""
    import torch

    owners = {}
    for mod_name, mod in model.named_modules():
        for pname, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mod_name}.{pname}" if mod_name else pname] = mod
    seen = set()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for index, name in enumerate(sorted(tensors)):
            t = tensors[name]
            if id(t) in seen:
                continue
            seen.add(id(t))
            rule = _rule(prefix + name, owners[name], tuple(t.shape))
            if rule["dist"] == "constant":
                t.fill_(rule["value"])
                continue
            rng = np.random.default_rng((int(seed), index))
            shape = tuple(t.shape)
            if rule["dist"] == "normal":
                z = rng.standard_normal(shape, dtype=np.float32)
            else:
                z = rng.random(shape, dtype=np.float32)
            z *= np.float32(rule["scale"])
            z += np.float32(rule["offset"])
            t.copy_(torch.from_numpy(np.ascontiguousarray(z)).to(t.dtype))
    return model


def random_model(config: CheersConfig, seed: int = 0):
    """`CheersModel(config)` with every tensor filled by `fill_random_`, in eval mode, float32, on the CPU.
    (Built on the meta device to skip the default initialisation, then materialised and re-tied.)"""
    import torch

    from .model import CheersModel

    with torch.device("meta"):
        model = CheersModel(config)
    model = model.to_empty(device="cpu")
    # to_empty() replaces meta parameters by new ones, which unties lm_head from the embedding: re-tie
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return fill_random_(model, seed).eval()


def write_random_checkpoint(out_dir: PathLike, config: CheersConfig, seed: int = 0, shards: int = 1,
                            tokenizer_from: Optional[PathLike] = None) -> Path:
    """Write a complete checkpoint in the official layout with random weights into `out_dir`:
    config.json, model.safetensors (shards == 1) or about `shards` files + model.safetensors.index.json
    (via `checkpoint.save_state` and `max_shard_bytes`), the tokenizer files copied from `tokenizer_from`
    (default: the official-tiny reference folder) and preprocessor_config.json with `scale_resolution` =
    the ViT image size. The text vocabulary must cover the tokenizer's ids (see `tiny_config`)."""
    from .checkpoint import save_state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(config, seed)
    config.save(out / "config.json")
    if shards <= 1:
        save_state(model, out)
    else:
        total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        save_state(model, out, max_shard_bytes=int(math.ceil(total / shards)))
    src = Path(tokenizer_from) if tokenizer_from is not None else reference_dir()
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            raise FileNotFoundError(f"tokenizer file {name} not found in {src}")
        shutil.copyfile(src / name, out / name)
    v = config.vision_representation_config
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "UMMImageProcessor", "processor_class": "UMMProcessor",
         "scale_resolution": v.image_size, "patch_size": v.patch_size}, indent=2) + "\n")
    return out
