"""Names shared by export, precision, build and the runtime: the five graphs, the precisions, the workdir's file
names and the gated-residual plugin's identity. Defined here once; everything else imports them."""

from __future__ import annotations

VERSION = "0.1.0"

# The five exported graphs, in pipeline order (docs/DESIGN.md).
GRAPH_NAMES = ("vae_encoder", "vision_tokenizer", "backbone", "cfm_head", "vae_decoder")
# graphs without state (no KV cache): each call depends only on its inputs
STATELESS_GRAPHS = tuple(g for g in GRAPH_NAMES if g != "backbone")

# Precisions a graph (and so an engine) can be baked in; fp32 is what `export` writes.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed")
EXPORT_PRECISION = "fp32"

# Backbone modes: one TensorRT profile and one pipeline phase each.
MODES = ("prefill", "decode", "image_step")

# Workdir layout.
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cheers-deploy-manifest/1"
EMBED_FILE = "embed_tokens.npy"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engine_manifest.json"
ENGINE_FORMAT = "cheers-deploy-engines/1"

# KV cache layout of the backbone graph (docs/export.md): a static buffer of max_context positions fed whole as past,
# present = only the S new entries, written by the runtime at start..start+S-1.
CACHE_LAYOUT = "static-buffer/new-entries"

# protobuf's hard limit is 2 GiB: larger graphs keep their weights in <file>.data
EXTERNAL_DATA_BYTES = 1_900_000_000

# The fused gated-residual TensorRT plugin (engines/plugins/gated_residual, docs/architecture.md §10).
PLUGIN_NAME = "CheersGatedResidual"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_GRAPHS = ("cfm_head",)          # graphs that contain a hi gate
PLUGIN_ENV = "CHEERS_TRT_PLUGIN"


def sm_key(compute_capability) -> str:
    """'8.7' (or (8, 7)) -> 'sm87'; '11.0' -> 'sm110'. The GPU architecture folder of an engine."""
    if isinstance(compute_capability, (tuple, list)) and len(compute_capability) == 2:
        parts = [str(int(p)) for p in compute_capability]
    else:
        parts = str(compute_capability).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        from .errors import InputError

        raise InputError(f"compute capability must look like '8.7', got {compute_capability!r}")
    return f"sm{int(parts[0])}{int(parts[1])}"
