"""The manifest (`manifest.json`) written next to the exported graphs, as typed objects: model config, every graph's
I/O (names, dtypes, shapes), build profiles and precision variants, the KV cache layout, the image geometry, the
generation defaults, special-token ids and provenance.

Runtimes read names and shapes from here and check them against what they load, so nothing downstream hard-codes a
tensor name (onnxruntime-genai's genai_config.json plays the same role). The file stays plain JSON for other tools;
`Manifest.load` validates it field by field (one error naming the file and the field) and turns it into the
dataclasses below; keys this version does not know are kept and written back unchanged. No torch, no onnx.

One file (over 400 lines) because it is one schema: the dataclasses of manifest.json and the reader that
validates them share their field names and error messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .constants import CACHE_LAYOUT, EMBED_FILE, EXPORT_PRECISION, MANIFEST_FORMAT, MANIFEST_NAME, TOKENIZER_FILES
from .errors import CheckpointError
from .fileio import write_json

FORMAT = MANIFEST_FORMAT
Dim = Union[int, str]                  # int = static, str = named dynamic axis


# ---------------------------------------------------------------------------------------------------------------------
# reading typed fields
# ---------------------------------------------------------------------------------------------------------------------
class _Reader:
    """Typed access to one JSON object, raising CheckpointError('<file>: field <path> ...') on a bad value."""

    def __init__(self, data: Any, where: str, path: str = ""):
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: {path or 'the file'} must be a JSON object, got {type(data).__name__}")
        self.data, self.where, self.path = data, where, path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _bad(self, key: str, want: str, got: Any) -> CheckpointError:
        return CheckpointError(f"{self.where}: field '{self._name(key)}' must be {want}, got {got!r:.80}; re-export")

    def get(self, key: str, kind, default=..., allow_none: bool = False):
        if key not in self.data:
            if default is ...:
                raise CheckpointError(f"{self.where}: field '{self._name(key)}' is missing; re-export")
            return default
        v = self.data[key]
        if v is None and allow_none:
            return None
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise self._bad(key, "an integer", v)
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise self._bad(key, "a number", v)
            v = float(v)
        elif kind is str:
            if not isinstance(v, str):
                raise self._bad(key, "a string", v)
        elif kind is dict:
            if not isinstance(v, dict):
                raise self._bad(key, "an object", v)
        elif kind is list:
            if not isinstance(v, list):
                raise self._bad(key, "a list", v)
        elif kind is bool:
            if not isinstance(v, bool):
                raise self._bad(key, "true or false", v)
        return v

    def obj(self, key: str, default=...) -> "_Reader":
        return _Reader(self.get(key, dict, default), self.where, self._name(key))

    def rest(self, known: Iterable[str]) -> dict:
        known = set(known)
        return {k: v for k, v in self.data.items() if k not in known}


def _to_dict(obj) -> dict:
    """Dataclass -> JSON dict: declared fields (None values kept only where the schema had them), then `extra`."""
    out = {}
    for f in fields(obj):
        if f.name in ("extra", "name"):
            continue
        v = getattr(obj, f.name)
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        elif isinstance(v, dict):
            v = {k: (x.to_dict() if hasattr(x, "to_dict") else x) for k, x in v.items()}
        elif isinstance(v, list):
            v = [x.to_dict() if hasattr(x, "to_dict") else x for x in v]
        out[f.name] = v
    out.update(getattr(obj, "extra", {}) or {})
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorEntry:
    name: str
    dtype: str                          # numpy dtype name: float32, int64, bool
    shape: List[Dim]

    @classmethod
    def from_dict(cls, d, where: str, path: str) -> "TensorEntry":
        r = _Reader(d, where, path)
        shape = r.get("shape", list)
        for i, s in enumerate(shape):
            if isinstance(s, bool) or not isinstance(s, (int, str)) or (isinstance(s, int) and s < 0):
                raise CheckpointError(f"{where}: field '{path}.shape[{i}]' must be a size or an axis name, got {s!r}")
        return cls(r.get("name", str), r.get("dtype", str), list(shape))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class PrecisionVariant:
    """One graph baked in another precision (written by `cheers-deploy calibrate convert/quantize`)."""
    file: str
    external_data: Optional[str] = None
    sha256: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d, where: str, path: str) -> "PrecisionVariant":
        r = _Reader(d, where, path)
        return cls(r.get("file", str), r.get("external_data", str, None, allow_none=True),
                   r.get("sha256", str, None, allow_none=True), r.rest(("file", "external_data", "sha256")))

    def to_dict(self) -> dict:
        return _to_dict(self)

    def hashes(self) -> dict:
        """What identifies this variant's content (for engine freshness checks)."""
        out = {k: v for k, v in self.extra.items() if "hash" in k}
        if self.sha256:
            out["sha256"] = self.sha256
        return out


Profile = Dict[str, List[List[int]]]     # input -> [min, opt, max] shapes


@dataclass
class GraphEntry:
    """One exported graph: its file (and external data), I/O, build profiles per mode, precision variants."""
    name: str
    file: str
    inputs: List[TensorEntry]
    outputs: List[TensorEntry]
    profiles: Dict[str, Profile] = field(default_factory=dict)
    external_data: Optional[str] = None
    spec_hash: Optional[str] = None
    source_hash: Optional[str] = None
    precisions: Dict[str, PrecisionVariant] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("file", "inputs", "outputs", "profiles", "external_data", "spec_hash", "source_hash", "precisions")

    @classmethod
    def from_dict(cls, name: str, d, where: str) -> "GraphEntry":
        path = f"graphs.{name}"
        r = _Reader(d, where, path)
        ins = [TensorEntry.from_dict(t, where, f"{path}.inputs[{i}]") for i, t in enumerate(r.get("inputs", list))]
        outs = [TensorEntry.from_dict(t, where, f"{path}.outputs[{i}]") for i, t in enumerate(r.get("outputs", list))]
        profiles = r.get("profiles", dict, {})
        for mode, prof in profiles.items():
            if not isinstance(prof, dict):
                raise CheckpointError(f"{where}: field '{path}.profiles.{mode}' must be an object")
        prec = {p: PrecisionVariant.from_dict(v, where, f"{path}.precisions.{p}")
                for p, v in r.get("precisions", dict, {}).items()}
        return cls(name, r.get("file", str), ins, outs, profiles, r.get("external_data", str, None, allow_none=True),
                   r.get("spec_hash", str, None, allow_none=True), r.get("source_hash", str, None, allow_none=True),
                   prec, r.rest(cls.KNOWN))

    def to_dict(self) -> dict:
        return _to_dict(self)

    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self.outputs]

    def variant(self, precision: str) -> Optional[PrecisionVariant]:
        """The file entry of `precision` (the exported entry itself for fp32), or None."""
        if precision == EXPORT_PRECISION:
            return PrecisionVariant(self.file, self.external_data, None,
                                    {"spec_hash": self.spec_hash, "source_hash": self.source_hash})
        return self.precisions.get(precision)


@dataclass
class CacheLayout:
    """How the backbone's KV cache is fed (docs/export.md): name templates take the layer index as {i}."""
    layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    dtype: str = "float32"
    max_context: Optional[int] = None
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("layout", "num_layers", "num_kv_heads", "head_dim", "past_key", "past_value", "present_key",
             "present_value", "dtype", "max_context", "note")

    @classmethod
    def from_dict(cls, d, where: str) -> "CacheLayout":
        r = _Reader(d, where, "cache")
        c = cls(r.get("layout", str), r.get("num_layers", int), r.get("num_kv_heads", int), r.get("head_dim", int),
                r.get("past_key", str), r.get("past_value", str), r.get("present_key", str),
                r.get("present_value", str), r.get("dtype", str, "float32"),
                r.get("max_context", int, None, allow_none=True), r.get("note", str, ""), r.rest(cls.KNOWN))
        for k in ("num_layers", "num_kv_heads", "head_dim"):
            if not 0 < getattr(c, k) <= 65536:
                raise CheckpointError(f"{where}: field 'cache.{k}' = {getattr(c, k)} is out of range; re-export")
        for k in ("past_key", "past_value", "present_key", "present_value"):
            if "{i}" not in getattr(c, k):
                raise CheckpointError(f"{where}: field 'cache.{k}' must contain the layer placeholder {{i}}")
        return c

    def to_dict(self) -> dict:
        return _to_dict(self)

    def names(self, key: str) -> List[str]:
        """Per-layer tensor names of one template ('past_key', 'present_value', ...)."""
        return [getattr(self, key).replace("{i}", str(i)) for i in range(self.num_layers)]


@dataclass
class ImageInfo:
    resolution: int
    patch_size: int
    latent_grid: int
    latent_channels: int
    tokens_per_image: int
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("resolution", "patch_size", "latent_grid", "latent_channels", "tokens_per_image")

    @classmethod
    def from_dict(cls, d, where: str) -> "ImageInfo":
        r = _Reader(d, where, "image")
        return cls(*(r.get(k, int) for k in cls.KNOWN), extra=r.rest(cls.KNOWN))

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass
class GenerationDefaults:
    """Settings a model is meant to run with when the caller gives none. The official model: 80 Euler steps, CFG
    9.5, time shift 0.5 (docs/architecture.md §13.3); a checkpoint's `generation_config.json` may set its own
    (`num_inference_steps`, `cfg_scale`, `alpha`, `max_new_tokens`, `image_max_new_tokens`)."""
    steps: int = 80
    cfg_scale: float = 9.5
    alpha: float = 0.5
    max_new_tokens: int = 64             # text answers (answer / chat)
    image_max_new_tokens: int = 8        # text decoded after a generated image
    temperature: float = 0.0             # greedy: the official loop's sampling settings are not read (§17.26)
    top_p: float = 1.0
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("steps", "cfg_scale", "alpha", "max_new_tokens", "image_max_new_tokens", "temperature", "top_p")
    # generation_config.json key -> our field (the official generate() names)
    HF_KEYS = {"num_inference_steps": "steps", "cfg_scale": "cfg_scale", "alpha": "alpha",
               "max_new_tokens": "max_new_tokens", "image_max_new_tokens": "image_max_new_tokens"}

    @classmethod
    def from_dict(cls, d, where: str, path: str = "generation") -> "GenerationDefaults":
        r = _Reader(d, where, path)
        base = cls()
        g = cls(r.get("steps", int, base.steps), r.get("cfg_scale", float, base.cfg_scale),
                r.get("alpha", float, base.alpha), r.get("max_new_tokens", int, base.max_new_tokens),
                r.get("image_max_new_tokens", int, base.image_max_new_tokens),
                r.get("temperature", float, base.temperature), r.get("top_p", float, base.top_p), r.rest(cls.KNOWN))
        g.check(where, path)
        return g

    @classmethod
    def from_generation_config(cls, path: Path) -> "GenerationDefaults":
        """The defaults of a checkpoint: ours, overridden by the keys its generation_config.json sets."""
        g = cls()
        if not Path(path).is_file():
            return g
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        r = _Reader(data, str(path))
        for key, attr in cls.HF_KEYS.items():
            kind = int if attr in ("steps", "max_new_tokens", "image_max_new_tokens") else float
            setattr(g, attr, r.get(key, kind, getattr(g, attr)))
        g.check(str(path), "")
        return g

    def check(self, where: str, path: str) -> None:
        import math

        pre = f"{path}." if path else ""
        if not 1 <= self.steps <= 10000:
            raise CheckpointError(f"{where}: field '{pre}steps' = {self.steps} is out of range 1..10000")
        if not (math.isfinite(self.cfg_scale) and 0.0 <= self.cfg_scale <= 100.0):
            raise CheckpointError(f"{where}: field '{pre}cfg_scale' = {self.cfg_scale} is out of range 0..100")
        if not (math.isfinite(self.alpha) and 0.0 < self.alpha <= 100.0):
            raise CheckpointError(f"{where}: field '{pre}alpha' = {self.alpha} must be in (0, 100]")
        if not 1 <= self.max_new_tokens <= 1 << 20 or not 1 <= self.image_max_new_tokens <= 1 << 20:
            raise CheckpointError(f"{where}: field '{pre}max_new_tokens' is out of range")

    def to_dict(self) -> dict:
        return _to_dict(self)


# ---------------------------------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    format: str = FORMAT
    precision: str = EXPORT_PRECISION
    opset: Optional[int] = None
    config: Dict[str, Any] = field(default_factory=dict)          # the model's config.json (CheersConfig.to_dict)
    checkpoint: Dict[str, Any] = field(default_factory=dict)      # {"path", "hash"} of the exported checkpoint
    exporter: Dict[str, Any] = field(default_factory=dict)        # library versions
    special_tokens: Dict[str, int] = field(default_factory=dict)
    image: Optional[ImageInfo] = None
    max_context: Optional[int] = None
    batch_max: Optional[int] = None
    cache: Optional[CacheLayout] = None
    graphs: Dict[str, GraphEntry] = field(default_factory=dict)
    embed_tokens: Dict[str, Any] = field(default_factory=lambda: {"file": EMBED_FILE})
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    calibration: Dict[str, Any] = field(default_factory=dict)     # owned by cheers_deploy.precision
    extra: Dict[str, Any] = field(default_factory=dict)
    workdir: Optional[Path] = None

    KNOWN = ("format", "precision", "opset", "config", "checkpoint", "exporter", "special_tokens", "image",
             "max_context", "batch_max", "cache", "graphs", "embed_tokens", "generation", "calibration")

    # ---- io
    @classmethod
    def from_dict(cls, data, where: str = MANIFEST_NAME, workdir=None) -> "Manifest":
        r = _Reader(data, where)
        fmt = r.get("format", str, None, allow_none=True)
        if fmt != FORMAT:
            raise CheckpointError(f"{where}: manifest format {fmt!r} is not {FORMAT!r}; re-export with this version "
                                  f"(--force)")
        special = r.get("special_tokens", dict, {})
        for k, v in special.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise CheckpointError(f"{where}: field 'special_tokens.{k}' must be an integer, got {v!r:.40}")
        m = cls(
            format=fmt, precision=r.get("precision", str, EXPORT_PRECISION), opset=r.get("opset", int, None),
            config=r.get("config", dict, {}), checkpoint=r.get("checkpoint", dict, {}),
            exporter=r.get("exporter", dict, {}), special_tokens=dict(special),
            image=ImageInfo.from_dict(data["image"], where) if "image" in data else None,
            max_context=r.get("max_context", int, None, allow_none=True),
            batch_max=r.get("batch_max", int, None, allow_none=True),
            cache=CacheLayout.from_dict(data["cache"], where) if "cache" in data else None,
            graphs={g: GraphEntry.from_dict(g, d, where) for g, d in r.get("graphs", dict, {}).items()},
            embed_tokens=r.get("embed_tokens", dict, {"file": EMBED_FILE}),
            generation=(GenerationDefaults.from_dict(data["generation"], where) if "generation" in data
                        else GenerationDefaults()),
            calibration=r.get("calibration", dict, {}), extra=r.rest(cls.KNOWN),
            workdir=Path(workdir) if workdir is not None else None)
        if m.max_context is not None and not 1 <= m.max_context <= 1 << 20:
            raise CheckpointError(f"{where}: field 'max_context' = {m.max_context} is out of range")
        return m

    def to_dict(self) -> dict:
        out = {"format": self.format, "precision": self.precision}
        for k in self.KNOWN[2:]:
            v = getattr(self, k)
            if v is None:
                continue
            if hasattr(v, "to_dict"):
                v = v.to_dict()
            elif k == "graphs":
                v = {g: e.to_dict() for g, e in v.items()}
            out[k] = v
        out.update(self.extra)
        return out

    @classmethod
    def load(cls, workdir) -> "Manifest":
        workdir = Path(workdir)
        path = workdir / MANIFEST_NAME
        if not workdir.is_dir():
            raise CheckpointError(f"workdir not found: {workdir} (create it with cheers-deploy export)")
        if not path.is_file():
            raise CheckpointError(f"{workdir} has no {MANIFEST_NAME}: not an exported workdir "
                                  f"(run cheers-deploy export --out {workdir})")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: unreadable manifest ({type(exc).__name__}: {str(exc)[:120]}); "
                                  f"re-export with --force") from None
        return cls.from_dict(data, str(path), workdir)

    @classmethod
    def load_or_empty(cls, workdir) -> "Manifest":
        try:
            return cls.load(workdir)
        except CheckpointError:
            return cls(workdir=Path(workdir))

    def save(self, workdir=None) -> Path:
        workdir = Path(workdir or self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return write_json(workdir / MANIFEST_NAME, self.to_dict())

    # ---- accessors
    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise CheckpointError(f"{self._where()}: the manifest lists no graph '{name}' "
                                  f"(has: {', '.join(sorted(self.graphs)) or 'none'}); re-export")
        return self.graphs[name]

    def require(self, *names: str):
        """The named top-level sections, or one error naming the first that is missing."""
        out = []
        for n in names:
            v = getattr(self, n)
            if v is None:
                raise CheckpointError(f"{self._where()}: the manifest has no '{n}' section; re-export")
            out.append(v)
        return out[0] if len(out) == 1 else out

    def graph_path(self, name: str) -> Path:
        return self.workdir / self.graph(name).file

    @property
    def embed_file(self) -> str:
        return str(self.embed_tokens.get("file", EMBED_FILE))

    def _where(self) -> str:
        return str(self.workdir / MANIFEST_NAME) if self.workdir else MANIFEST_NAME

    # ---- checks
    def check_files(self, required: Iterable[str]) -> None:
        """Every required graph (and its external data), the embedding table and the tokenizer files exist."""
        wd = self.workdir
        for name in required:
            g = self.graph(name)
            for f in (g.file, g.external_data):
                if f and not (wd / f).is_file():
                    raise CheckpointError(f"workdir {wd}: graph '{name}' is missing its file {f} "
                                          f"(re-run cheers-deploy export --out {wd})")
        if not (wd / self.embed_file).is_file():
            raise CheckpointError(f"workdir {wd}: missing {self.embed_file} (re-run cheers-deploy export)")
        for f in TOKENIZER_FILES:
            if not (wd / f).is_file():
                raise CheckpointError(f"workdir {wd}: missing {f} (re-run cheers-deploy export)")

    def check_cache_layout(self, supported: Sequence[str] = (CACHE_LAYOUT,)) -> CacheLayout:
        cache = self.require("cache")
        if cache.layout not in supported:
            raise CheckpointError(f"workdir {self.workdir}: KV cache layout {cache.layout!r} is not supported by this "
                                  f"runtime ({', '.join(supported)}); re-export with this version")
        return cache


Tensor = Tuple[str, str, Sequence]   # (name, numpy dtype name, shape: ints for static dims, anything else dynamic)


def check_io(graph: str, entry: GraphEntry, inputs: List[Tensor], outputs: List[Tensor], where: str = "") -> None:
    """Compare what a loaded graph/engine declares with its manifest entry; raise one CheckpointError naming the
    graph and the first offending tensor (missing, unexpected, wrong dtype or wrong static dim)."""
    prefix = f"{where}: " if where else ""
    for kind, declared, actual in (("input", entry.inputs, inputs), ("output", entry.outputs, outputs)):
        want = {t.name: t for t in declared}
        have = {name: (dtype, shape) for name, dtype, shape in actual}
        missing = [n for n in want if n not in have]
        unexpected = [n for n in have if n not in want]
        if missing:
            raise CheckpointError(f"{prefix}graph '{graph}' lacks {kind} tensor '{missing[0]}' that the manifest "
                                  f"declares" + (f" (it has unexpected '{unexpected[0]}')" if unexpected else "")
                                  + "; the workdir is inconsistent: re-export with --force")
        if unexpected:
            raise CheckpointError(f"{prefix}graph '{graph}' has {kind} tensor '{unexpected[0]}' that the manifest "
                                  f"does not declare; re-export with --force")
        for name, t in want.items():
            dtype, shape = have[name]
            if dtype != t.dtype:
                raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has dtype {dtype}, the manifest "
                                      f"says {t.dtype}; re-export with --force")
            if len(shape) != len(t.shape):
                raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has rank {len(shape)}, the "
                                      f"manifest says {len(t.shape)} ({t.shape}); re-export with --force")
            for axis, (got, exp) in enumerate(zip(shape, t.shape)):
                if isinstance(exp, int) and got != exp:
                    raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has size {got} on axis {axis}, "
                                          f"the manifest says {exp} (shape {t.shape}); re-export with --force")
                if isinstance(exp, str) and isinstance(got, int):
                    raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' is fixed to {got} on axis "
                                          f"{axis}, the manifest declares it dynamic ('{exp}'); re-export with --force")
