"""Where a model comes from: the bundled tiny-shapes model when none is named, a local folder in the official layout,
or a Hugging Face Hub repository id (`ai9stars/Cheers`) resolved through huggingface_hub's cache, as transformers and
diffusers do (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1, a pinned `revision`). Only the files a checkpoint needs are
fetched: configs, tokenizer files and safetensors weights; never code, never pickles."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .errors import CheckpointError, MissingDependencyError

BUNDLED = Path(__file__).resolve().parent / "assets" / "tiny-shapes"
BUNDLED_GRAPHS = BUNDLED / "graphs"                 # the bundled model's exported fp32 graphs (torch-free runs)
OFFICIAL_REPO = "ai9stars/Cheers"
# what a checkpoint is made of (docs/architecture.md §16): nothing executable, nothing pickled
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "tokenizer.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def bundled_checkpoint() -> Path:
    return BUNDLED


def bundled_workdir() -> Optional[Path]:
    """The bundled model's exported graphs, when the package ships them."""
    return BUNDLED_GRAPHS if (BUNDLED_GRAPHS / "manifest.json").is_file() else None


def is_repo_id(name) -> bool:
    """'owner/name' that is not an existing local path."""
    s = str(name)
    return bool(_REPO_ID.match(s)) and not Path(s).exists() and ".." not in s


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """The local snapshot folder of a Hub repository (from the cache when present; offline: the cache only)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:
        raise MissingDependencyError("loading a model by its Hub id needs huggingface_hub: pip install "
                                     "huggingface_hub") from exc
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS,
                                 local_files_only=_offline())
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id}{'@' + revision if revision else ''} is not in the Hugging Face cache and "
                              f"HF_HUB_OFFLINE is set: download it once with `huggingface-cli download {repo_id}` "
                              f"(or unset HF_HUB_OFFLINE)") from None
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo/revision: one line for the user
        raise CheckpointError(f"cannot get {repo_id}{'@' + revision if revision else ''} from the Hugging Face Hub: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return Path(path)


def resolve_checkpoint(path=None, revision: Optional[str] = None) -> Path:
    """`path` (a folder in the official layout), a Hub repository id, or the bundled tiny-shapes model when None."""
    if path is None:
        if not (BUNDLED / "config.json").is_file():
            raise CheckpointError("no --checkpoint given and the bundled default model is not installed "
                                  f"(expected {BUNDLED})")
        return BUNDLED
    p = Path(path).expanduser()
    if p.is_dir():
        if revision is not None:
            raise CheckpointError(f"--revision applies to a Hub repository id, not to the local folder {p}")
        return p
    if is_repo_id(path):
        return download(str(path), revision)
    if p.exists():
        raise CheckpointError(f"checkpoint must be a directory: {p}")
    raise CheckpointError(f"checkpoint directory not found: {p} (a local folder in the official layout, or a Hugging "
                          f"Face repository id such as {OFFICIAL_REPO})")
