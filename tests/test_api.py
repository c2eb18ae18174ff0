"""The Python API a new user meets: constructors refuse keywords they do not know, take threads=, and the
generation defaults come from the model; the docs do not contradict the code."""

from pathlib import Path

import pytest

from cheers_deploy.errors import InputError
from cheers_deploy.hub import bundled_workdir
from cheers_deploy.runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def test_from_pretrained_refuses_unknown_keywords():
    with pytest.raises(TypeError, match="treads"):
        Pipeline.from_pretrained(None, treads=1)          # a typo is an error, not silently ignored


def test_from_workdir_refuses_options_the_backend_does_not_take():
    with pytest.raises(InputError, match="no option"):
        Pipeline.from_workdir(bundled_workdir(), backend="ort", engine_dir="x")
    with pytest.raises(InputError, match="threads"):
        Pipeline.from_workdir(bundled_workdir(), threads=0)


def test_from_workdir_threads_and_defaults():
    pipe = Pipeline.from_workdir(bundled_workdir(), threads=1)
    assert pipe.backend.threads == 1
    g = pipe.generation                                   # the bundled model's generation_config.json
    assert (g.steps, g.cfg_scale, g.alpha) == (25, 3.0, 1.0)


def test_check_inputs_names_the_setting():
    pipe = Pipeline.from_workdir(bundled_workdir(), threads=1)
    for kw, name in ((dict(steps=0), "steps"), (dict(cfg_scale=float("nan")), "cfg_scale"), (dict(alpha=0), "alpha"),
                     (dict(seed=-1), "seed"), (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(InputError, match=name):
            pipe.generate("a red circle", **kw)


def test_export_doc_no_longer_says_fp32_only():
    text = (REPO / "docs" / "export.md").read_text()
    assert "fp32 only" not in text and "precision.md" in text


def test_stream_methods_concatenate_to_the_answer():
    pipe = Pipeline.from_workdir(bundled_workdir(), threads=1)
    img = pipe.generate("a red circle on the left", seed=0).image
    want = pipe.answer(img, "what color is the circle?", seed=0)
    gen = pipe.stream_answer(img, "what color is the circle?", seed=0)
    deltas = []
    while True:
        try:
            deltas.append(next(gen))
        except StopIteration as stop:
            out = stop.value
            break
    assert "".join(deltas) == want.text == out.text and out.token_ids == want.token_ids
    assert "".join(pipe.stream_chat("where is the red circle?", seed=0)) == \
        pipe.chat("where is the red circle?", seed=0).text
