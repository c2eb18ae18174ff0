"""Hugging Face Hub ids as checkpoints, offline: a fake hub cache in huggingface_hub's own layout (checked against
huggingface_hub 0.36: constants.HF_HUB_CACHE, file_download.repo_folder_name, _snapshot_download's offline branch)

    <HF_HUB_CACHE>/models--ai9stars--Cheers/
        refs/main                    the commit hash, no newline
        blobs/<sha256>               file contents
        snapshots/<hash>/<file>      -> ../../blobs/<sha256>

holding the bundled tiny-shapes checkpoint. Every test sets HF_HUB_OFFLINE=1: nothing touches the network."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")          # see tests/test_cli.py

hf = pytest.importorskip("huggingface_hub")

from cheers_deploy import cli  # noqa: E402
from cheers_deploy.data import shapes as W  # noqa: E402
from cheers_deploy.errors import CheckpointError  # noqa: E402
from cheers_deploy.hub import bundled_checkpoint, resolve_checkpoint  # noqa: E402

REPO = "ai9stars/Cheers"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _write_snapshot(storage: Path, commit: str, src: Path) -> Path:
    snap = storage / "snapshots" / commit
    snap.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache with ai9stars/Cheers at COMMIT (refs/main) and an older pinned-only snapshot OLD_COMMIT."""
    from huggingface_hub.file_download import repo_folder_name

    cache = tmp_path_factory.mktemp("hf") / "hub"
    storage = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    assert storage.name == "models--ai9stars--Cheers"
    snap = _write_snapshot(storage, COMMIT, bundled_checkpoint())
    old = _write_snapshot(storage, OLD_COMMIT, bundled_checkpoint())
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)                # huggingface_hub writes it without a newline
    return {"cache": cache, "snapshot": snap, "old": old}


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE=1 and the fake cache, for the env and for huggingface_hub's constants (read at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache["cache"]))
    return hub_cache


def test_hub_id_resolves_to_the_cached_snapshot(offline):
    path = resolve_checkpoint(REPO)
    assert path == offline["snapshot"]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_revision_pins_a_commit(offline):
    assert resolve_checkpoint(REPO, revision=COMMIT) == offline["snapshot"]
    assert resolve_checkpoint(REPO, revision=OLD_COMMIT) == offline["old"]
    assert resolve_checkpoint(REPO, revision="main") == offline["snapshot"]
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint(REPO, revision="f" * 40)


def test_missing_repo_offline_is_a_checkpoint_error(offline):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("ai9stars/NotThere")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "ai9stars/NotThere" in msg and "\n" not in msg


def test_revision_with_a_local_folder_is_refused(offline, tmp_path):
    with pytest.raises(CheckpointError, match="revision"):
        resolve_checkpoint(tmp_path, revision=COMMIT)


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "blue_square.png"
    scene = W.Scene((W.ShapeObject("square", "blue", "center", "large"),))
    Image.fromarray(W.render(scene)).save(path)
    return path


def test_ask_with_a_hub_id_offline(offline, shape_png, capsys):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["ask", "--checkpoint", REPO, "--revision", COMMIT, "--image", str(shape_png),
                       "--question", "what color is the shape?", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip().lower().startswith("blue")
    rc = cli.main(["ask", "--checkpoint", "ai9stars/NotThere", "--image", str(shape_png), "--question", "what?"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "HF_HUB_OFFLINE" in err and "\n" not in err


def test_console_script_with_a_hub_id_offline(offline, shape_png):
    """The installed `cheers-deploy` in a fresh process: HF_HUB_CACHE / HF_HUB_OFFLINE from the environment."""
    pytest.importorskip("torch")
    exe = Path(sys.executable).with_name("cheers-deploy")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "cheers_deploy.cli.main"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline["cache"]), OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run(cmd + ["ask", "--checkpoint", REPO, "--image", str(shape_png), "--question",
                                 "what shape is it?", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().lower().startswith("square")
    assert "Traceback" not in proc.stderr
