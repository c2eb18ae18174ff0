"""Cheers configuration: dataclasses that read and write the official ``config.json`` schema.

Absent fields take the official class defaults (docs/architecture.md §1), which differ from the
released values in several places (for example ``num_hidden_layers`` of the text model is absent
from the released file and defaults to 28). Unknown keys are kept and written back unchanged.
No torch here: the runtime reads the same config.

A config.json comes from outside: `from_dict` checks every known field's type (one error naming the field) and
`check` bounds every size (LIMITS) and the couplings the model relies on, before anything is allocated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import CheckpointError
from .fileio import atomic_write_text, read_json

# Sane bounds of every size field (inclusive), far outside any real Cheers model (the official one: hidden 1536 /
# 1152, 28 / 27 layers, vocabulary 151936), far inside what would exhaust memory before a check could run.
LIMITS: Dict[str, Tuple[int, int]] = {
    "resolution": (1, 16384), "in_channels": (1, 64), "out_ch": (1, 64), "num_channels": (1, 64),
    "ch": (1, 8192), "z_channels": (1, 4096), "num_res_blocks": (0, 64), "ch_mult": (1, 64),
    "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 18), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "image_size": (1, 16384),
    "patch_size": (1, 1024), "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24),
    "gen_head_depth": (0, 1024), "hi_head_depth": (0, 1024),
}
MAX_LEVELS = 8                      # VAE ch_mult entries
MAX_EMBED_VALUES = 1 << 32          # vocab_size * hidden_size


def _typed(value, default, where: str, name: str):
    """`value` checked against the type of the field's default (int, float, bool, str, list of int)."""
    def bad(want):
        return CheckpointError(f"{where}: field '{name}' must be {want}, got {value!r:.60}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise bad("a list of integers")
        value = list(value)
    return value


def _from_dict(cls, d: Optional[dict], where: str = "config", section: str = ""):
    if d is not None and not isinstance(d, dict):
        raise CheckpointError(f"{where}: field '{section}' must be an object, got {type(d).__name__}")
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    defaults = cls()
    known = {k: _typed(v, getattr(defaults, k), where, f"{section}.{k}" if section else k)
             for k, v in d.items() if k in fields}
    obj = cls(**known)
    obj.extra = {k: v for k, v in d.items() if k not in fields}
    return obj


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    out.update(copy.deepcopy(obj.extra))
    return out


@dataclass
class VAEEncoderConfig:
    resolution: int = 256           # bookkeeping only
    in_channels: int = 3
    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 32
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class VAEDecoderConfig:
    resolution: int = 256
    ch: int = 128                   # also the output width of the hi projector (§11)
    out_ch: int = 3
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2         # the decoder uses num_res_blocks + 1 blocks per level
    in_channels: int = 3            # unused by the decoder
    z_channels: int = 32
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 256
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class CheersConfig:
    vae_encoder_config: VAEEncoderConfig = field(default_factory=VAEEncoderConfig)
    vae_decoder_config: VAEDecoderConfig = field(default_factory=VAEDecoderConfig)
    vision_representation_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    # Hard-coded in the official code (7 and 3 DiT blocks); config fields here so that tiny models can
    # be shallower. Official files do not carry them, so they load with the official values.
    gen_head_depth: int = 7
    hi_head_depth: int = 3
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- derived values (computed, never stored) ----
    @property
    def latent_channels(self) -> int:
        """Channels of the normalised, 2x2-patchified latent (4 * z_channels)."""
        return 4 * self.vae_decoder_config.z_channels

    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae_encoder_config.ch_mult) - 1)

    def check_bounds(self, where: str = "config") -> None:
        """Every size field within LIMITS (and positive epsilons / rope base): a config.json with hidden_size 10**9
        is refused here, before a tensor, a graph or a buffer is sized from it."""
        sections = (("vae_encoder_config", self.vae_encoder_config), ("vae_decoder_config", self.vae_decoder_config),
                    ("vision_representation_config", self.vision_representation_config),
                    ("text_config", self.text_config), ("", self))
        for sname, sec in sections:
            for f in dataclasses.fields(sec):
                if f.name not in LIMITS:
                    continue
                lo, hi = LIMITS[f.name]
                value = getattr(sec, f.name)
                name = f"{sname}.{f.name}" if sname else f.name
                values = value if isinstance(value, list) else [value]
                if isinstance(value, list) and not 1 <= len(value) <= MAX_LEVELS:
                    raise CheckpointError(f"{where}: field '{name}' must have 1..{MAX_LEVELS} entries, "
                                          f"got {len(value)}")
                for v in values:
                    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                        raise CheckpointError(f"{where}: field '{name}' = {v!r:.40} is out of range {lo}..{hi}")
        t, v = self.text_config, self.vision_representation_config
        for name, x in (("text_config.rope_theta", t.rope_theta), ("text_config.rms_norm_eps", t.rms_norm_eps),
                        ("vision_representation_config.layer_norm_eps", v.layer_norm_eps)):
            if not (math.isfinite(x) and 0 < x <= 1e12):
                raise CheckpointError(f"{where}: field '{name}' = {x!r:.40} must be a positive number")
        if t.vocab_size * t.hidden_size > MAX_EMBED_VALUES:
            raise CheckpointError(f"{where}: field 'text_config.vocab_size' x 'hidden_size' = "
                                  f"{t.vocab_size * t.hidden_size} values is more than {MAX_EMBED_VALUES}")

    def check(self, where: str = "config") -> None:
        """The size bounds (check_bounds), then the couplings of docs/architecture.md §1.5 / §19.1 that the sampler
        relies on. Messages start with `where` (the file and field the config came from)."""
        self.check_bounds(where)
        enc, dec = self.vae_encoder_config, self.vae_decoder_config
        if enc.z_channels != dec.z_channels:
            raise CheckpointError(f"{where}: vae encoder z_channels {enc.z_channels} != decoder {dec.z_channels}")
        if dec.ch != self.latent_channels:
            raise CheckpointError(
                f"{where}: vae_decoder_config.ch ({dec.ch}) is the velocity width and must equal the latent "
                f"channel count 4*z_channels ({self.latent_channels})")
        if len(enc.ch_mult) != len(dec.ch_mult):
            raise CheckpointError(f"{where}: encoder and decoder ch_mult must have the same number of levels")
        v, t = self.vision_representation_config, self.text_config
        if v.hidden_size % v.num_attention_heads or t.hidden_size % t.num_attention_heads:
            raise CheckpointError(f"{where}: hidden_size must be divisible by num_attention_heads")
        if t.num_attention_heads % t.num_key_value_heads or v.num_attention_heads % t.num_key_value_heads:
            raise CheckpointError(f"{where}: attention heads must be a multiple of text num_key_value_heads")
        if t.head_dim % 2:
            raise CheckpointError(f"{where}: the text head size hidden_size/num_attention_heads = {t.head_dim} must "
                                  f"be even (rotary embeddings)")
        if v.image_size % v.patch_size:
            raise CheckpointError(f"{where}: vision image_size {v.image_size} must be a multiple of patch_size "
                                  f"{v.patch_size}")
        if 2 * self.vae_downsample != v.patch_size:
            raise CheckpointError(
                f"{where}: the VAE downsamples by {self.vae_downsample} and the latent is 2x2-patchified, so "
                f"the ViT patch size must be {2 * self.vae_downsample} (found {v.patch_size})")

    # ---- (de)serialisation in the official schema ----
    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "CheersConfig":
        """Typed: a known field of the wrong type is a CheckpointError naming `where` and the field (sizes are
        bounded by `check`)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        cfg = cls(
            vae_encoder_config=_from_dict(VAEEncoderConfig, d.pop("vae_encoder_config", None), where,
                                          "vae_encoder_config"),
            vae_decoder_config=_from_dict(VAEDecoderConfig, d.pop("vae_decoder_config", None), where,
                                          "vae_decoder_config"),
            vision_representation_config=_from_dict(VisionConfig, d.pop("vision_representation_config", None), where,
                                                    "vision_representation_config"),
            text_config=_from_dict(TextConfig, d.pop("text_config", None), where, "text_config"),
        )
        for name in ("gen_head_depth", "hi_head_depth"):
            if name in d:
                setattr(cfg, name, _typed(d.pop(name), 0, where, name))
        cfg.extra = d
        return cfg

    def to_dict(self) -> dict:
        out = {
            "architectures": ["Cheers"],
            "model_type": "umm",
            "vae_encoder_config": _to_dict(self.vae_encoder_config),
            "vae_decoder_config": _to_dict(self.vae_decoder_config),
            "vision_representation_config": _to_dict(self.vision_representation_config),
            "text_config": _to_dict(self.text_config),
        }
        if self.gen_head_depth != 7:
            out["gen_head_depth"] = self.gen_head_depth
        if self.hi_head_depth != 3:
            out["hi_head_depth"] = self.hi_head_depth
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_file(cls, path) -> "CheersConfig":
        """Read a config.json (fileio.read_json: size cap, strict JSON) and type its fields; `check` bounds them."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing config file: {path}")
        return cls.from_dict(read_json(path), str(path))

    def save(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str) -> "CheersConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name])


# The released config.json (docs/architecture.md §1), i.e. ~2.8B stored values.
_OFFICIAL = {
    "architectures": ["Cheers"],
    "model_type": "umm",
    "torch_dtype": "bfloat16",
    "vae_encoder_config": {"resolution": 512},
    "vae_decoder_config": {"resolution": 512},
    "vision_representation_config": {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_channels": 3, "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6, "attention_dropout": 0.0, "num_patches": 1024, "model_type": "umm"},
    "text_config": {
        "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "sliding_window": 32768,
        "max_window_layers": 21, "tie_word_embeddings": True},
}

# Small enough for unit tests on CPU; the widths follow the official couplings (§19.1).
_TINY = {
    "architectures": ["Cheers"],
    "model_type": "umm",
    "torch_dtype": "float32",
    "vae_encoder_config": {"resolution": 64, "ch": 32, "ch_mult": [1, 2, 4, 4], "z_channels": 32},
    "vae_decoder_config": {"resolution": 64, "ch": 128, "ch_mult": [1, 1, 2, 2], "z_channels": 32},
    "vision_representation_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 16},
    "text_config": {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "gen_head_depth": 2,
    "hi_head_depth": 1,
}

# The model trained on the synthetic shapes world (cheers_deploy.train, docs/training.md): the official
# architecture scaled down with every coupling kept (§1.5, §19.1): 64 px images, VAE downsample 8 (4 levels)
# and 2x2 patchify -> ViT patch 16; z_channels 8 -> 32 latent channels = vae_decoder ch (velocity width);
# 4x4 latent / 16 ViT patches / 4 LLM tokens per image; vocab = the world BPE (446 ids) padded to 448.
_TINY_SHAPES = {
    "architectures": ["Cheers"],
    "model_type": "umm",
    "torch_dtype": "float32",
    "vae_encoder_config": {"resolution": 64, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                           "z_channels": 8},
    "vae_decoder_config": {"resolution": 64, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 0,
                           "z_channels": 8},
    "vision_representation_config": {
        "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 16, "num_patches": 16},
    "text_config": {
        "vocab_size": 448, "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True},
    "gen_head_depth": 2,
    "hi_head_depth": 1,
}

PRESETS: Dict[str, dict] = {"cheers-official": _OFFICIAL, "tiny": _TINY, "tiny-shapes": _TINY_SHAPES}
