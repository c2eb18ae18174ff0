"""One spec per exported graph: the single source of truth for tensor names, dtypes, dynamic axes, sample
inputs, the submodules a graph reads and the TensorRT min/opt/max build profiles.

Export (`exporter.py`), the manifest written next to the graphs, the ONNX Runtime backend and engine builds
all read these objects (the runtimes through the manifest, which is `GraphSpec.to_manifest()` verbatim).
Importing this module needs no torch; `sample_inputs` and `wrapper` import it lazily.

Shape vocabulary: B batch, S new sequence positions, P past positions fed to the graph, T = P + S keys,
C latent channels, h/w latent grid, M LLM tokens per image, D widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

from ..config import CheersConfig
from ..constants import GRAPH_NAMES
from ..fileio import sha256_json

Dim = Union[int, str]                    # int = static, str = named dynamic axis
Profile = Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]   # input -> (min, opt, max)

DEFAULT_MAX_CONTEXT = 2048



@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                           # numpy dtype name: float32, int64, bool
    shape: Tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    """Base class; one subclass per graph. `dims` maps every dynamic axis name to its (min, opt, max) per
    build profile; sample inputs use sizes that differ from every static dim so that tracing cannot
    specialise a dynamic axis to a constant."""

    name: str
    cfg: CheersConfig
    image_size: int
    batch_max: int
    max_context: int
    inputs: List[TensorSpec] = field(default_factory=list)
    outputs: List[TensorSpec] = field(default_factory=list)
    modules: Tuple[str, ...] = ()        # CheersModel submodules the graph reads (partial loading)

    # ---- derived sizes shared by the five graphs
    @property
    def grid(self) -> int:
        """Latent grid h = w (= ViT patch grid of the decoded image)."""
        return self.image_size // self.cfg.vision_representation_config.patch_size

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // 2) ** 2

    @property
    def latent_shape(self) -> Tuple[Dim, ...]:
        return ("batch", self.cfg.latent_channels, self.grid, self.grid)

    # ---- what the exporter and the runtime read
    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`: every named (str) dim of every input and output."""
        out = {}
        for t in self.inputs + self.outputs:
            axes = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if axes:
                out[t.name] = axes
        return out

    def axis_sizes(self, mode: str) -> Dict[str, Tuple[int, int, int]]:
        """(min, opt, max) of every dynamic axis in a build profile."""
        raise NotImplementedError

    def profile_modes(self) -> Tuple[str, ...]:
        return ("default",)

    def profiles(self) -> Dict[str, Profile]:
        """TensorRT optimization profiles: mode -> input -> (min, opt, max) shapes."""
        out = {}
        for mode in self.profile_modes():
            sizes = self.axis_sizes(mode)
            prof = {}
            for t in self.inputs:
                shapes = []
                for k in range(3):
                    shapes.append(tuple(sizes[d][k] if isinstance(d, str) else d for d in t.shape))
                prof[t.name] = tuple(shapes)
            out[mode] = prof
        return out

    def concrete_shape(self, t: TensorSpec, sizes: Dict[str, int]) -> Tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)

    def trace_sizes(self) -> Dict[str, int]:
        """Dynamic-axis sizes for the tracing sample (distinct from each other and from static dims)."""
        return {"batch": 2}

    def sample_inputs(self, batch: int = 2, seed: int = 0, **sizes):
        """Random torch inputs in input order (a tuple), e.g. for export tracing and parity tests."""
        import torch

        g = torch.Generator().manual_seed(seed)
        dims = dict(self.trace_sizes(), batch=batch, **sizes)
        return tuple(self._sample(t, self.concrete_shape(t, dims), g, dims) for t in self.inputs)

    def _sample(self, t: TensorSpec, shape, g, dims):
        import torch

        return torch.randn(shape, generator=g)

    def wrapper(self, model):
        """An nn.Module whose forward(*inputs) returns the outputs in spec order, around CheersModel methods."""
        from . import wrappers

        return wrappers.make_wrapper(self.name, model)

    def to_manifest(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": {m: {k: [list(s) for s in v] for k, v in p.items()} for m, p in self.profiles().items()},
        }

    def spec_hash(self, opset: int, precision: str = "fp32") -> str:
        """Identity of what the graph file is (idempotent export skips a graph whose hash is unchanged). Build
        profiles are left out: they depend on max_context/batch_max, which do not change the graph."""
        blob = {"graph": self.name, "opset": opset, "precision": precision, "config": self.cfg.to_dict(),
                "image_size": self.image_size, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "modules": list(self.modules)}
        return sha256_json(blob)


def _batch_axis(batch_max: int, opt: int = 1) -> Tuple[int, int, int]:
    return (1, min(opt, batch_max), batch_max)


class VaeEncoderSpec(GraphSpec):
    """pixels (B,3,H,W) in [0,1] -> normalised, patchified latent (B,C,h,w)."""

    def __init__(self, cfg, image_size, batch_max, max_context):
        super().__init__("vae_encoder", cfg, image_size, batch_max, max_context)
        r = image_size
        self.inputs = [TensorSpec("pixels", "float32", ("batch", 3, r, r))]
        self.outputs = [TensorSpec("latent", "float32", self.latent_shape)]
        self.modules = ("model.vae_model.encoder", "model.vae_model.bn")

    def axis_sizes(self, mode):
        return {"batch": _batch_axis(self.batch_max)}

    def _sample(self, t, shape, g, dims):
        import torch

        return torch.rand(shape, generator=g)


class VisionTokenizerSpec(GraphSpec):
    """latent x_t (B,C,h,w) -> semantic tokens (B,M,Dt) (the LLM's image inputs_embeds) and the ViT patch
    embeddings (B,4M,Dv) of the decoded image (the hi-gate's high-frequency input)."""

    def __init__(self, cfg, image_size, batch_max, max_context):
        super().__init__("vision_tokenizer", cfg, image_size, batch_max, max_context)
        m, dt, dv = self.tokens_per_image, cfg.text_config.hidden_size, cfg.vision_representation_config.hidden_size
        self.inputs = [TensorSpec("latent", "float32", self.latent_shape)]
        self.outputs = [TensorSpec("semantic_tokens", "float32", ("batch", m, dt)),
                        TensorSpec("patch_embeds", "float32", ("batch", 4 * m, dv))]
        self.modules = ("model.vae_decoder_projector", "model.vision_representation.embeddings",
                        "model.vision_representation.encoder", "model.vision_representation.post_layernorm",
                        "model.und_projector")

    def axis_sizes(self, mode):
        return {"batch": _batch_axis(self.batch_max)}


class CfmHeadSpec(GraphSpec):
    """(final-normed LLM states at the image positions (B,M,Dt), patch embeddings (B,4M,Dv), t (B,))
    -> velocity (B,C,h,w)."""

    def __init__(self, cfg, image_size, batch_max, max_context):
        super().__init__("cfm_head", cfg, image_size, batch_max, max_context)
        m, dt, dv = self.tokens_per_image, cfg.text_config.hidden_size, cfg.vision_representation_config.hidden_size
        self.inputs = [TensorSpec("hidden", "float32", ("batch", m, dt)),
                       TensorSpec("patch_embeds", "float32", ("batch", 4 * m, dv)),
                       TensorSpec("t", "float32", ("batch",))]
        self.outputs = [TensorSpec("velocity", "float32", self.latent_shape)]
        self.modules = ("model.time_embed", "model.gen_projector", "model.hi_gate", "model.hi_projector")

    def axis_sizes(self, mode):
        return {"batch": _batch_axis(self.batch_max, opt=self.batch_max)}   # CFG runs B = 2

    def _sample(self, t, shape, g, dims):
        import torch

        if t.name == "t":
            return torch.rand(shape, generator=g)
        return torch.randn(shape, generator=g)


class VaeDecoderSpec(GraphSpec):
    """normalised latent (B,C,h,w) -> pixels (B,3,H,W), unclamped."""

    def __init__(self, cfg, image_size, batch_max, max_context):
        super().__init__("vae_decoder", cfg, image_size, batch_max, max_context)
        r = image_size
        self.inputs = [TensorSpec("latent", "float32", self.latent_shape)]
        self.outputs = [TensorSpec("pixels", "float32", ("batch", 3, r, r))]
        self.modules = ("model.vae_model.decoder", "model.vae_model.bn")

    def axis_sizes(self, mode):
        return {"batch": _batch_axis(self.batch_max)}


class BackboneSpec(GraphSpec):
    """Qwen2 over inputs_embeds with a KV cache (layout: constants.CACHE_LAYOUT).

        inputs_embeds (B,S,D), position_ids (B,S) int64, attention_mask (B,1,S,P+S) bool (True = may attend;
        keys are [past slots 0..P-1, the S new positions]), past_key_values.{i}.key/.value (B,Hkv,P,Dh)
        -> hidden_states (B,S,D) final-normed, logits (B,V) of the last position, present.{i}.key/.value
           (B,Hkv,S,Dh): the new entries only (keys already rotated).

    The mask is boolean and applied with Where (never an additive -inf/finfo.min mask: safe in fp16)."""

    def __init__(self, cfg, image_size, batch_max, max_context):
        super().__init__("backbone", cfg, image_size, batch_max, max_context)
        t = cfg.text_config
        kv = ("batch", t.num_key_value_heads, "past", t.head_dim)
        new = ("batch", t.num_key_value_heads, "seq", t.head_dim)
        self.num_layers = t.num_hidden_layers
        self.inputs = [TensorSpec("inputs_embeds", "float32", ("batch", "seq", t.hidden_size)),
                       TensorSpec("position_ids", "int64", ("batch", "seq")),
                       TensorSpec("attention_mask", "bool", ("batch", 1, "seq", "total"))]
        self.outputs = [TensorSpec("hidden_states", "float32", ("batch", "seq", t.hidden_size)),
                        TensorSpec("logits", "float32", ("batch", t.vocab_size))]
        for i in range(self.num_layers):
            self.inputs += [TensorSpec(past_name(i, "key"), "float32", kv),
                            TensorSpec(past_name(i, "value"), "float32", kv)]
            self.outputs += [TensorSpec(present_name(i, "key"), "float32", new),
                             TensorSpec(present_name(i, "value"), "float32", new)]
        self.modules = ("model.language_model",)

    def profile_modes(self):
        return ("prefill", "decode", "image_step")

    def axis_sizes(self, mode):
        """P is pinned to max_context in every mode (static buffer); only B and S vary, and S is a constant
        within the decode and image-step modes, so each of those runs on fixed shapes (CUDA-graph friendly)."""
        n, m, bm = self.max_context, self.tokens_per_image, self.batch_max
        if mode == "prefill":
            s = (1, min(m + 64, n - 1), n - 1)
            batch = _batch_axis(bm)
        elif mode == "decode":
            s, batch = (1, 1, 1), _batch_axis(bm, opt=bm)
        elif mode == "image_step":
            s, batch = (m, m, m), _batch_axis(bm, opt=bm)
        else:
            raise KeyError(mode)
        return {"batch": batch, "seq": s, "past": (n, n, n), "total": tuple(n + x for x in s)}

    def trace_sizes(self):
        return {"batch": 2, "seq": 7, "past": 11, "total": 18}

    def sample_inputs(self, batch: int = 2, seed: int = 0, seq: int = 7, past: int = 11, start: int = None):
        """Random embeddings and cache; positions start..start+S-1 (start defaults to P); mask = the past
        slots below `start` plus a causal block over the new positions."""
        import torch

        g = torch.Generator().manual_seed(seed)
        t = self.cfg.text_config
        start = past if start is None else start
        embeds = torch.randn(batch, seq, t.hidden_size, generator=g)
        pos = (start + torch.arange(seq))[None].expand(batch, seq).contiguous()
        mask = torch.zeros(batch, 1, seq, past + seq, dtype=torch.bool)
        mask[..., :start] = True
        mask[..., past:] = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        cache = [torch.randn(batch, t.num_key_value_heads, past, t.head_dim, generator=g)
                 for _ in range(2 * self.num_layers)]
        return (embeds, pos, mask, *cache)


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


SPEC_CLASSES = {"vae_encoder": VaeEncoderSpec, "vision_tokenizer": VisionTokenizerSpec, "backbone": BackboneSpec,
                "cfm_head": CfmHeadSpec, "vae_decoder": VaeDecoderSpec}


def graph_specs(cfg: CheersConfig, image_size: int, batch_max: int = 2, max_context: int = DEFAULT_MAX_CONTEXT,
                names: Sequence[str] = GRAPH_NAMES) -> Dict[str, GraphSpec]:
    """The specs of the requested graphs for one checkpoint config and working resolution."""
    patch = cfg.vision_representation_config.patch_size
    if image_size % (2 * patch):
        raise ValueError(f"image_size {image_size} must be a multiple of {2 * patch} (2 x patch size)")
    if batch_max < 1:
        raise ValueError("batch_max must be >= 1")
    m = (image_size // (2 * patch)) ** 2
    if max_context < m + 2:
        raise ValueError(f"max_context {max_context} cannot hold one image ({m} tokens) and a text token")
    unknown = [n for n in names if n not in SPEC_CLASSES]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; choose from {list(GRAPH_NAMES)}")
    return {n: SPEC_CLASSES[n](cfg, image_size, batch_max, max_context) for n in names}
