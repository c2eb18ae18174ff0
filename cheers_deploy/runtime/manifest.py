"""The manifest (`manifest.json`) written next to the exported graphs: model config, every graph's I/O names,
shapes and dtypes, build profiles, the KV cache layout, context length, special-token ids and provenance.

Runtimes read names and shapes from here and check them against what they load, so nothing downstream
hard-codes a tensor name. No torch, no onnx: only json and the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT = "cheers-deploy-manifest/1"
EMBED_FILE = "embed_tokens.npy"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


class Manifest:
    """A thin view over the manifest dict (kept as plain JSON so other tools can read it)."""

    def __init__(self, data: dict, workdir: Optional[Path] = None):
        self.data = data
        self.workdir = Path(workdir) if workdir is not None else None

    # ---- io
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
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable manifest ({exc}); re-export with --force") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: manifest format {data.get('format') if isinstance(data, dict) else None!r}"
                                  f" is not {FORMAT!r}; re-export with this version (--force)")
        return cls(data, workdir)

    @classmethod
    def load_or_empty(cls, workdir) -> "Manifest":
        try:
            return cls.load(workdir)
        except CheckpointError:
            return cls({"format": FORMAT, "graphs": {}}, workdir)

    def save(self, workdir=None) -> Path:
        workdir = Path(workdir or self.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    # ---- accessors
    @property
    def graphs(self) -> Dict[str, dict]:
        return self.data.setdefault("graphs", {})

    def graph(self, name: str) -> dict:
        if name not in self.graphs:
            raise CheckpointError(f"{self._where()}: the manifest lists no graph '{name}' "
                                  f"(has: {', '.join(sorted(self.graphs)) or 'none'}); re-export")
        return self.graphs[name]

    @property
    def max_context(self) -> int:
        return int(self.data["max_context"])

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def image(self) -> dict:
        return self.data["image"]

    @property
    def cache(self) -> dict:
        return self.data["cache"]

    def graph_path(self, name: str) -> Path:
        return self.workdir / self.graph(name)["file"]

    def _where(self) -> str:
        return str(self.workdir / MANIFEST_NAME) if self.workdir else MANIFEST_NAME

    # ---- checks
    def check_files(self, required: Iterable[str]) -> None:
        """Every required graph (and its external data), the embedding table and the tokenizer files exist."""
        wd = self.workdir
        for name in required:
            g = self.graph(name)
            for key in ("file", "external_data"):
                f = g.get(key)
                if f and not (wd / f).is_file():
                    raise CheckpointError(f"workdir {wd}: graph '{name}' is missing its file {f} "
                                          f"(re-run cheers-deploy export --out {wd})")
        emb = self.data.get("embed_tokens", {}).get("file", EMBED_FILE)
        if not (wd / emb).is_file():
            raise CheckpointError(f"workdir {wd}: missing {emb} (re-run cheers-deploy export)")
        for f in TOKENIZER_FILES:
            if not (wd / f).is_file():
                raise CheckpointError(f"workdir {wd}: missing {f} (re-run cheers-deploy export)")


Tensor = Tuple[str, str, Sequence]   # (name, numpy dtype name, shape: ints for static dims, anything else dynamic)


def check_io(graph: str, entry: dict, inputs: List[Tensor], outputs: List[Tensor], where: str = "") -> None:
    """Compare what a loaded graph/engine declares with its manifest entry; raise one CheckpointError naming the
    graph and the first offending tensor (missing, unexpected, wrong dtype or wrong static dim)."""
    prefix = f"{where}: " if where else ""
    for kind, declared, actual in (("input", entry["inputs"], inputs), ("output", entry["outputs"], outputs)):
        want = {t["name"]: t for t in declared}
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
            if dtype != t["dtype"]:
                raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has dtype {dtype}, the manifest "
                                      f"says {t['dtype']}; re-export with --force")
            if len(shape) != len(t["shape"]):
                raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has rank {len(shape)}, the "
                                      f"manifest says {len(t['shape'])} ({t['shape']}); re-export with --force")
            for axis, (got, exp) in enumerate(zip(shape, t["shape"])):
                if isinstance(exp, int) and got != exp:
                    raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' has size {got} on axis {axis}, "
                                          f"the manifest says {exp} (shape {t['shape']}); re-export with --force")
                if isinstance(exp, str) and isinstance(got, int):
                    raise CheckpointError(f"{prefix}graph '{graph}' {kind} '{name}' is fixed to {got} on axis "
                                          f"{axis}, the manifest declares it dynamic ('{exp}'); re-export with --force")
