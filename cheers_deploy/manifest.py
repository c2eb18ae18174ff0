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

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .constants import CACHE_LAYOUT, EMBED_FILE, EXPORT_PRECISION, MANIFEST_FORMAT, MANIFEST_NAME, TOKENIZER_FILES
from .errors import CheckpointError
from .fileio import check_relative, contained, read_json, write_json

VOCABULARY_FILE = "vocabulary.json"     # vocabulary.py (a layer above) reads it; check_files checks it is contained

FORMAT = MANIFEST_FORMAT
Dim = Union[int, str]                  # int = static, str = named dynamic axis
# tensor dtypes a manifest may declare (numpy names; graph I/O keeps the export's dtypes in every precision)
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
MAX_DIM = 1 << 31                      # a static tensor size
MAX_RANK = 8
MAX_COUNT = 4096                       # tensors per graph, profiles, graphs...


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

    def int_in(self, key: str, lo: int, hi: int, default=..., allow_none: bool = False):
        """An integer field within lo..hi."""
        v = self.get(key, int, default, allow_none)
        if key in self.data and v is not None and not lo <= v <= hi:
            raise CheckpointError(f"{self.where}: field '{self._name(key)}' = {v!r:.40} is out of range {lo}..{hi}; "
                                  f"re-export")
        return v

    def file(self, key: str, default=..., allow_none: bool = False):
        """A file name relative to the manifest's folder (no absolute path, no '..'; links are checked where the
        file is opened: `Manifest.path`)."""
        v = self.get(key, str, default, allow_none)
        if key in self.data and v is not None:
            check_relative(v, f"{self.where}: field '{self._name(key)}'")
        return v

    def items(self, key: str, kind, default=...):
        """A list (kind=list) or object (kind=dict) field with at most MAX_COUNT entries."""
        v = self.get(key, kind, default)
        if v is not None and len(v) > MAX_COUNT:
            raise CheckpointError(f"{self.where}: field '{self._name(key)}' has {len(v)} entries (at most "
                                  f"{MAX_COUNT})")
        return v

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
        if len(shape) > MAX_RANK:
            raise CheckpointError(f"{where}: field '{path}.shape' has rank {len(shape)} (at most {MAX_RANK})")
        for i, s in enumerate(shape):
            if isinstance(s, bool) or not isinstance(s, (int, str)) or (isinstance(s, int) and not 0 <= s <= MAX_DIM) \
                    or (isinstance(s, str) and not 0 < len(s) <= 128):
                raise CheckpointError(f"{where}: field '{path}.shape[{i}]' must be a size or an axis name, "
                                      f"got {s!r:.60}")
        name, dtype = r.get("name", str), r.get("dtype", str)
        if not 0 < len(name) <= 1024:
            raise CheckpointError(f"{where}: field '{path}.name' must be a tensor name, got {name!r:.60}")
        if dtype not in DTYPES:
            raise CheckpointError(f"{where}: field '{path}.dtype' = {dtype!r:.40} is not one of {', '.join(DTYPES)}")
        return cls(name, dtype, list(shape))

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
        return cls(r.file("file"), r.file("external_data", None, allow_none=True),
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


def _check_profile(prof, where: str, path: str) -> None:
    """{input: [min, opt, max]}, each a list of sizes 0..MAX_DIM of one rank."""
    if not isinstance(prof, dict) or len(prof) > MAX_COUNT:
        raise CheckpointError(f"{where}: field '{path}' must be an object of input -> [min, opt, max] shapes")
    for name, shapes in prof.items():
        ok = isinstance(shapes, list) and len(shapes) == 3 and all(
            isinstance(s, list) and len(s) == len(shapes[0]) and len(s) <= MAX_RANK
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in s) for s in shapes)
        if not ok:
            raise CheckpointError(f"{where}: field '{path}.{name}' must be [min, opt, max] shapes of one rank, got "
                                  f"{shapes!r:.80}; re-export")


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
    checkpoint_hash: Optional[str] = None     # the checkpoint it was exported from (a mixed workdir is refused)
    extra: Dict[str, Any] = field(default_factory=dict)

    KNOWN = ("file", "inputs", "outputs", "profiles", "external_data", "spec_hash", "source_hash", "precisions",
             "checkpoint_hash")

    @classmethod
    def from_dict(cls, name: str, d, where: str) -> "GraphEntry":
        path = f"graphs.{name}"
        r = _Reader(d, where, path)
        ins = [TensorEntry.from_dict(t, where, f"{path}.inputs[{i}]") for i, t in enumerate(r.items("inputs", list))]
        outs = [TensorEntry.from_dict(t, where, f"{path}.outputs[{i}]")
                for i, t in enumerate(r.items("outputs", list))]
        profiles = r.items("profiles", dict, {})
        for mode, prof in profiles.items():
            _check_profile(prof, where, f"{path}.profiles.{mode}")
        prec = {p: PrecisionVariant.from_dict(v, where, f"{path}.precisions.{p}")
                for p, v in r.items("precisions", dict, {}).items()}
        return cls(name, r.file("file"), ins, outs, profiles, r.file("external_data", None, allow_none=True),
                   r.get("spec_hash", str, None, allow_none=True), r.get("source_hash", str, None, allow_none=True),
                   prec, r.get("checkpoint_hash", str, None, allow_none=True), r.rest(cls.KNOWN))

    def field_name(self, precision: str, key: str = "file") -> str:
        """The manifest field that names the `precision` file of this graph ('graphs.<g>.file' for the export)."""
        if precision == EXPORT_PRECISION:
            return f"graphs.{self.name}.{key}"
        return f"graphs.{self.name}.precisions.{precision}.{key}"

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
        if c.dtype not in DTYPES:
            raise CheckpointError(f"{where}: field 'cache.dtype' = {c.dtype!r:.40} is not one of {', '.join(DTYPES)}")
        if c.max_context is not None and not 0 < c.max_context <= 1 << 20:
            raise CheckpointError(f"{where}: field 'cache.max_context' = {c.max_context} is out of range")
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
    LIMITS = (16384, 1024, 4096, 4096, 1 << 20)

    @classmethod
    def from_dict(cls, d, where: str) -> "ImageInfo":
        r = _Reader(d, where, "image")
        return cls(*(r.int_in(k, 1, hi) for k, hi in zip(cls.KNOWN, cls.LIMITS)), extra=r.rest(cls.KNOWN))

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
        path = Path(path)
        path = contained(path.parent, path.name, str(path))
        if not path.is_file():
            return g
        r = _Reader(read_json(path), str(path))
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
        special = r.items("special_tokens", dict, {})
        for k, v in special.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 31:
                raise CheckpointError(f"{where}: field 'special_tokens.{k}' must be a token id, got {v!r:.40}")
        checkpoint = r.get("checkpoint", dict, {})
        ck = _Reader(checkpoint, where, "checkpoint")
        ck.get("hash", str, None, allow_none=True), ck.get("path", str, None, allow_none=True)
        embed = r.get("embed_tokens", dict, {"file": EMBED_FILE})
        er = _Reader(embed, where, "embed_tokens")
        er.file("file", EMBED_FILE)
        for k in ("source_hash", "checkpoint_hash", "dtype"):
            er.get(k, str, None, allow_none=True)
        m = cls(
            format=fmt, precision=r.get("precision", str, EXPORT_PRECISION), opset=r.int_in("opset", 1, 1000, None),
            config=r.get("config", dict, {}), checkpoint=checkpoint,
            exporter=r.get("exporter", dict, {}), special_tokens=dict(special),
            image=ImageInfo.from_dict(data["image"], where) if "image" in data else None,
            max_context=r.get("max_context", int, None, allow_none=True),
            batch_max=r.int_in("batch_max", 1, 4096, None, allow_none=True),
            cache=CacheLayout.from_dict(data["cache"], where) if "cache" in data else None,
            graphs={g: GraphEntry.from_dict(g, d, where) for g, d in r.items("graphs", dict, {}).items()},
            embed_tokens=embed,
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
        """Read and validate `<workdir>/manifest.json` (fileio.read_json: size cap, strict JSON; then every field)."""
        workdir = Path(workdir)
        if not workdir.is_dir():
            raise CheckpointError(f"workdir not found: {workdir} (create it with cheers-deploy export)")
        path = contained(workdir, MANIFEST_NAME, f"workdir {workdir}: {MANIFEST_NAME}")
        if not path.is_file():
            raise CheckpointError(f"{workdir} has no {MANIFEST_NAME}: not an exported workdir "
                                  f"(run cheers-deploy export --out {workdir})")
        data = read_json(path)
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

    # ---- files: every path the manifest names is resolved inside the workdir (fileio.contained)
    def path(self, relative: str, field_name: str) -> Path:
        """`<workdir>/<relative>` for a file named by the manifest field `field_name`; refuses an absolute path,
        '..' and a link out of the workdir (one-line CheckpointError naming the manifest and the field)."""
        return contained(self.workdir, relative, f"{self._where()}: field '{field_name}'")

    def graph_path(self, name: str) -> Path:
        return self.path(self.graph(name).file, f"graphs.{name}.file")

    def graph_files(self, name: str, precision: str = EXPORT_PRECISION) -> Tuple[Optional[Path], Optional[Path]]:
        """(graph file, external data file or None) of `name` in `precision`, contained in the workdir; (None, None)
        when the manifest has no such variant."""
        entry = self.graph(name)
        v = entry.variant(precision)
        if v is None:
            return None, None
        src = self.path(v.file, entry.field_name(precision, "file"))
        data = self.path(v.external_data, entry.field_name(precision, "external_data")) if v.external_data else None
        return src, data

    @property
    def embed_file(self) -> str:
        return str(self.embed_tokens.get("file", EMBED_FILE))

    @property
    def embed_path(self) -> Path:
        return self.path(self.embed_file, "embed_tokens.file")

    def side_file(self, name: str) -> Path:
        """A file of fixed name in the workdir (tokenizer, preprocessor config, vocabulary), contained."""
        return contained(self.workdir, name, f"workdir {self.workdir}: {name}")

    def _where(self) -> str:
        return str(self.workdir / MANIFEST_NAME) if self.workdir else MANIFEST_NAME

    # ---- checks
    def check_files(self, required: Iterable[str]) -> None:
        """Every required graph (and its external data), the embedding table and the tokenizer files exist."""
        wd = self.workdir
        for name in required:
            g = self.graph(name)
            for f, p in zip((g.file, g.external_data), self.graph_files(name)):
                if f and not p.is_file():
                    raise CheckpointError(f"workdir {wd}: graph '{name}' is missing its file {f} "
                                          f"(re-run cheers-deploy export --out {wd})")
        if not self.embed_path.is_file():
            raise CheckpointError(f"workdir {wd}: missing {self.embed_file} (re-run cheers-deploy export)")
        for f in TOKENIZER_FILES:
            if not self.side_file(f).is_file():
                raise CheckpointError(f"workdir {wd}: missing {f} (re-run cheers-deploy export)")
        self.side_file(VOCABULARY_FILE)

    def check_cache_layout(self, supported: Sequence[str] = (CACHE_LAYOUT,)) -> CacheLayout:
        cache = self.require("cache")
        if cache.layout not in supported:
            raise CheckpointError(f"workdir {self.workdir}: KV cache layout {cache.layout!r} is not supported by this "
                                  f"runtime ({', '.join(supported)}); re-export with this version")
        return cache

    def check_model(self, cfg) -> None:
        """Cross-check the manifest's sections against each other and against `cfg` (the CheersConfig of the 'config'
        section, already typed and bounded: runtime.graph_backend.manifest_config) before anything large is loaded:
        the KV cache layout against the config and against the backbone entry's past/present tensors (names, heads,
        head size), the image geometry, the embedding table record and the special-token ids."""
        where = self._where()
        t = cfg.text_config
        cache = self.check_cache_layout()
        for k, want in (("num_layers", t.num_hidden_layers), ("num_kv_heads", t.num_key_value_heads),
                        ("head_dim", t.head_dim)):
            if getattr(cache, k) != want:
                raise CheckpointError(f"{where}: field 'cache.{k}' = {getattr(cache, k)} but the model config has "
                                      f"{want}; the workdir is inconsistent: re-export with --force")
        if "backbone" in self.graphs:
            self._check_backbone_cache(self.graphs["backbone"], cache, t)
        if self.image is not None:
            img, v = self.image, cfg.vision_representation_config
            grid = img.resolution // v.patch_size
            for k, got, want in (("latent_channels", img.latent_channels, cfg.latent_channels),
                                 ("latent_grid", img.latent_grid, grid),
                                 ("tokens_per_image", img.tokens_per_image, (grid // 2) ** 2)):
                if got != want:
                    raise CheckpointError(f"{where}: field 'image.{k}' = {got} does not fit the model config and "
                                          f"resolution (expected {want}); re-export with --force")
        shape = self.embed_tokens.get("shape")
        if shape is not None and shape != [t.vocab_size, t.hidden_size]:
            raise CheckpointError(f"{where}: field 'embed_tokens.shape' = {shape!r:.60} but the model config has "
                                  f"{[t.vocab_size, t.hidden_size]}; re-export with --force")
        bad = {k: v for k, v in self.special_tokens.items() if v >= t.vocab_size}
        if bad:
            k = next(iter(bad))
            raise CheckpointError(f"{where}: field 'special_tokens.{k}' = {bad[k]} is not below the vocabulary size "
                                  f"{t.vocab_size}")

    def _check_backbone_cache(self, bb: GraphEntry, cache: CacheLayout, t) -> None:
        where = self._where()
        for kind, tensors, keys, lead in (("inputs", bb.inputs, ("past_key", "past_value"), 3),
                                          ("outputs", bb.outputs, ("present_key", "present_value"), 2)):
            want = [n for k in keys for n in cache.names(k)]
            have = {x.name: x for x in tensors[lead:]}
            extra = sorted(set(have) - set(want))
            missing = [n for n in want if n not in have]
            if missing or extra or len(tensors) != lead + len(want):
                what = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}' beyond" if extra else "does not fit"
                raise CheckpointError(f"{where}: field 'graphs.backbone.{kind}' {what} the KV cache layout of "
                                      f"'cache' ({cache.num_layers} layers); the workdir is inconsistent: re-export "
                                      f"with --force")
            for n in want:
                x = have[n]
                dims = x.shape
                if not (len(dims) == 4 and dims[1] == cache.num_kv_heads and dims[3] == cache.head_dim
                        and x.dtype == cache.dtype):
                    raise CheckpointError(f"{where}: field 'graphs.backbone.{kind}' tensor '{n}' has shape {dims} "
                                          f"({x.dtype}), but 'cache' says (B, {cache.num_kv_heads}, T, "
                                          f"{cache.head_dim}) {cache.dtype}; re-export with --force")
        emb = bb.inputs[0].shape if bb.inputs else []
        if len(emb) != 3 or emb[2] != t.hidden_size:
            raise CheckpointError(f"{where}: field 'graphs.backbone.inputs[0]' has shape {emb}, the model's hidden "
                                  f"size is {t.hidden_size}; re-export with --force")

    def check_provenance(self) -> None:
        """Refuse a mixed workdir (an interrupted re-export from another checkpoint): every graph entry (and its
        precision variants, and the embedding table) records the checkpoint hash it was exported from, and all must
        equal the manifest's `checkpoint.hash`. Manifests written before graphs recorded it are accepted only when
        every graph and the table share one source hash (same checkpoint and code)."""
        where = self._where()
        want = self.checkpoint.get("hash")
        recorded = {g: e.checkpoint_hash for g, e in self.graphs.items()}
        recorded.update({f"{g} ({p})": v.extra["checkpoint_hash"] for g, e in self.graphs.items()
                         for p, v in e.precisions.items() if isinstance(v.extra.get("checkpoint_hash"), str)})
        if "checkpoint_hash" in self.embed_tokens:
            recorded[self.embed_file] = self.embed_tokens["checkpoint_hash"]
        have = {k: v for k, v in recorded.items() if v is not None}
        if have:
            lacking = sorted(k for k, v in recorded.items() if v is None)
            if lacking:
                raise CheckpointError(f"{where}: graph(s) {', '.join(lacking)} do not record the checkpoint they were "
                                      f"exported from, others do: a mixed workdir; re-export with --force")
            ref = want or next(iter(have.values()))
            other = sorted(k for k, v in have.items() if v != ref)
            if other:
                same = sorted(k for k, v in have.items() if v == ref)
                raise CheckpointError(f"{where}: a mixed workdir: {', '.join(other)} come(s) from another checkpoint "
                                      f"than {', '.join(same) or 'the manifest'} (checkpoint.hash {str(ref)[:12]}); "
                                      f"an export was interrupted? re-export with --force")
            return
        sources = {g: e.source_hash for g, e in self.graphs.items() if e.source_hash}
        if self.embed_tokens.get("source_hash"):
            sources[self.embed_file] = self.embed_tokens["source_hash"]
        if len(set(sources.values())) > 1:
            groups: Dict[str, List[str]] = {}
            for k, v in sources.items():
                groups.setdefault(v, []).append(k)
            desc = "; ".join(", ".join(sorted(v)) for v in groups.values())
            raise CheckpointError(f"{where}: a mixed workdir: the graphs come from different exports ({desc}); "
                                  f"re-export with --force")


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
