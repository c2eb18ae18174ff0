"""The bundled tiny-shapes model: size, layout, the documented eval numbers, and that it still scores them.

Fast subset (CI): the first 12 held-out scenes / 12 single-object prompts of the documented eval (same seed,
same settings) must score near the documented full-eval numbers. Slow (`make test-slow`): the full documented
eval (n=100) must reproduce `assets/tiny-shapes/eval.json` within noise.
"""
import json
import re
from pathlib import Path

import pytest

from cheers_deploy.hub import bundled_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CKPT = bundled_checkpoint()
DOC = json.loads((CKPT / "eval.json").read_text())
KEYS = [("understanding", "exact_match"), ("generation", "color"), ("generation", "shape"),
        ("generation", "position")]


def _get(res, key):
    return res[key[0]][key[1]]


def test_bundled_checkpoint_layout_and_size():
    assert (CKPT / "model.safetensors").stat().st_size <= 25 * 2 ** 20
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "eval.json"):
        assert (CKPT / f).is_file(), f
    for key in KEYS:
        assert 0.0 <= _get(DOC, key) <= 1.0


def test_documented_numbers_are_the_shipped_eval():
    """docs/training.md quotes the shipped eval.json (as percentages with one decimal)."""
    text = (ROOT / "docs" / "training.md").read_text()
    for key in KEYS:
        pct = f"{100 * _get(DOC, key):.1f}"
        assert re.search(rf"\b{re.escape(pct)}\s*%", text), f"{key} = {pct} % not quoted in docs/training.md"


def _eval(n, n_gen, n_two):
    torch = pytest.importorskip("torch")
    from cheers_deploy.cli.eval import load_pipeline
    from cheers_deploy.eval.evaluate import evaluate

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    s = DOC["settings"]
    pipe = load_pipeline(CKPT)
    return evaluate(pipe, n=n, n_gen=n_gen, n_two=n_two, seed=s["seed"], steps=s["steps"],
                    cfg_scale=s["cfg_scale"], alpha=s["alpha"], split=s["split"])


def test_bundled_model_fast_subset_scores():
    """12 scenes / 12 prompts: a model that regressed (or a wrong default checkpoint) falls well below."""
    res = _eval(12, 12, 2)
    assert _get(res, ("understanding", "exact_match")) >= _get(DOC, ("understanding", "exact_match")) - 0.10
    for k in ("color", "shape", "position"):
        # one prompt in 12 is 8.3 points: allow two misses below the documented rate
        assert res["generation"][k] >= DOC["generation"][k] - 2 / 12 - 1e-9, (k, res["generation"][k])


@pytest.mark.slow
def test_bundled_model_reproduces_documented_eval():
    s = DOC["settings"]
    res = _eval(s["n"], s["n_gen"], s["n_two"])
    tol = {"understanding": 0.02, "generation": 0.05}
    for key in KEYS:
        assert abs(_get(res, key) - _get(DOC, key)) <= tol[key[0]], (key, _get(res, key), _get(DOC, key))
