"""Read and write ONNX graphs: a clear error for an unreadable file, atomic saves, and weights in `<name>.data` when
the graph is too large for one protobuf."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..constants import EXTERNAL_DATA_BYTES
from ..errors import CheckpointError, MissingDependencyError
from ..fileio import atomic_path


def import_onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a base dependency
        raise MissingDependencyError("this needs the onnx package: pip install onnx") from exc
    return onnx


def load_model(path, load_external_data: bool = True):
    onnx = import_onnx()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"graph not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise assorted types
        raise CheckpointError(f"{path}: not a readable ONNX model ({exc})") from None


def save_model(model, path) -> Optional[str]:
    """Save atomically. Weights go to `<name>.data` next to the file when the graph exceeds ~2 GB (a stale `.data`
    of an earlier, larger save is removed). Returns the external data file name or None."""
    onnx = import_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    with atomic_path(path) as tmp:
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
    if not large:
        (path.parent / data_name).unlink(missing_ok=True)
    return data_name if large else None
