"""Evaluation command: documented keys, fractions in [0, 1], determinism, CLI JSON, answer normalisation."""
import argparse
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.checkpoint import save_state  # noqa: E402
from cheers_deploy.data import shapes as W  # noqa: E402
from cheers_deploy.cli.eval import add_eval_args, load_pipeline  # noqa: E402
from cheers_deploy.eval.evaluate import evaluate, format_table, normalize_answer  # noqa: E402
from cheers_deploy.world_tokenizer import train_world_tokenizer  # noqa: E402

from helpers import tiny_test_config  # noqa: E402  (tests/ is on sys.path)

U_KEYS = {"exact_match", "per_type"}
G_KEYS = {"color", "shape", "position", "size", "single_object", "two_object", "two_object_position", "counting",
          "overall"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random 32 px model in the official layout with the world tokenizer."""
    from cheers_deploy.model import CheersModel

    d = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = tiny_test_config()
    torch.manual_seed(0)
    save_state(CheersModel(cfg), d)
    cfg.save(d / "config.json")
    train_world_tokenizer().save(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"scale_resolution": 32, "patch_size": 16}))
    return d


def _run(pipe):
    return evaluate(pipe, n=2, n_gen=2, n_two=1, steps=2, cfg_scale=2.0, seed=3)


def test_evaluate_keys_ranges_and_determinism(tiny_ckpt):
    torch.set_num_threads(1)
    pipe = load_pipeline(tiny_ckpt)
    a, b = _run(pipe), _run(pipe)
    assert U_KEYS <= set(a["understanding"]) and G_KEYS <= set(a["generation"])
    assert set(a["understanding"]["per_type"]) == set(W.QUESTION_TYPES)
    vals = [a["understanding"]["exact_match"], *a["understanding"]["per_type"].values()]
    vals += [a["generation"][k] for k in G_KEYS]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in vals)
    assert a["generation"]["n_single"] == 2 and a["generation"]["n_two"] == 1
    # two scenes: every question of each is asked
    assert a["understanding"]["n_questions"] == sum(len(s.qa) for s in W.make_split("heldout", 2, seed=3))
    a.pop("settings"), b.pop("settings")
    assert a == b
    table = format_table({**a, "settings": {}})
    assert "exact match" in table and "two objects" in table


def test_eval_cli_writes_json(tiny_ckpt, tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_eval_args(sub)
    out = tmp_path / "r.json"
    args = parser.parse_args(["eval", "--checkpoint", str(tiny_ckpt), "--n", "1", "--n-gen", "1", "--n-two", "0",
                              "--steps", "2", "--json", str(out), "--samples", str(tmp_path / "s.png")])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert 0.0 <= res["understanding"]["exact_match"] <= 1.0
    assert 0.0 <= res["generation"]["single_object"] <= 1.0
    assert (tmp_path / "s.png").stat().st_size > 0


def test_normalize_answer():
    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("yes, there is") == "yes"
    assert normalize_answer("\n") == ""


def test_scores_are_exact_on_rendered_truth():
    """The generation metrics judge a perfect generator (the renderer itself) as perfect."""
    from cheers_deploy.eval.detector import score_generation

    single, two = [], []
    for s in W.make_split("heldout", 40, seed=1):
        (single if len(s.scene.objects) == 1 else two).append(s)
    ok = [score_generation(W.render(s.scene, 64), s.prompts[0]) for s in single[:10] + two[:5]]
    assert np.mean([r["overall"] for r in ok]) >= 0.9
