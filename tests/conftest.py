"""Shared fixtures: the official-tiny reference set (arrays + rebuilt checkpoint + a pipeline on it) and
random tiny checkpoints in the official layout (single file and sharded, same weights).

Nothing here imports torch at module level, so the torch-free tests still collect on a base install."""
import os
import subprocess
import sys

# OpenMP threads sleep while they wait (what the package sets before its own torch import): on a busy machine,
# spinning threads made torch tests ~10x slower. Set here because a test may import torch before the package does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import pytest

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "official-tiny"
TINY_SEED = 1234


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "reference.npz").is_file():
        pytest.skip(f"official-tiny reference set missing from the repository (expected at {REFERENCE_DIR})")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict:
    with np.load(reference_dir / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference_ckpt(reference_dir, tmp_path_factory) -> Path:
    """The official-tiny checkpoint rebuilt from its recipe (numpy + safetensors, sha256-verified)."""
    out = tmp_path_factory.mktemp("official-tiny") / "ckpt"
    proc = subprocess.run([sys.executable, str(reference_dir / "make_checkpoint.py"), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"make_checkpoint.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out


@pytest.fixture(scope="session")
def ref_pipeline(reference_ckpt):
    pytest.importorskip("torch")
    from cheers_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(reference_ckpt)


@pytest.fixture(scope="session")
def tiny_config():
    """The `tiny` preset with the official 151936-id vocabulary (the official tokenizer's ids must fit)."""
    from cheers_deploy.testing import tiny_config

    return tiny_config()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_config, reference_dir, tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from cheers_deploy.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tiny_config, seed=TINY_SEED,
                                   tokenizer_from=reference_dir)


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tiny_config, reference_dir, tmp_path_factory) -> Path:
    """Same weights as `tiny_ckpt`, split into several safetensors shards + index."""
    pytest.importorskip("torch")
    from cheers_deploy.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-sharded") / "ckpt", tiny_config,
                                   seed=TINY_SEED, shards=3, tokenizer_from=reference_dir)
