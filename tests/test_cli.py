"""`cheers-deploy` in-process: --threads, --version, help texts (every default shown), one-line errors, what a new
user sees on the bundled model (warnings, why `chat` gave no text), timings, progress bars, commands whose module
does not import, the suggested commands of the engine builder, the precision plot and the quantizer's log.

The runs use the bundled tiny-shapes model on the CPU (about a second each); nothing is exported.

One file (over 400 lines): the command line as a user meets it, one test per promise, sharing the bundled model.
"""
import argparse
import importlib
import logging
import os
import re
import shlex

# as cheers_deploy.errors.require_torch does before torch's first import: OpenMP threads that spin while they wait
# made these runs ~10x slower on a busy 2-core machine (no effect when torch is already loaded)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from PIL import Image

from cheers_deploy import cli
from cheers_deploy.cli.common import HelpFormatter, shows_default
from cheers_deploy.constants import VERSION
from cheers_deploy.data import shapes as W


# ----------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def torch_threads():
    """Leave torch's process-wide thread count as it was (the CLI sets it)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red_circle.png"
    scene = W.Scene((W.ShapeObject("circle", "red", "left", "large"),))
    Image.fromarray(W.render(scene)).save(path)
    return path


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str, *words) -> bool:
    err = err.strip()
    return err.startswith("error: ") and "\n" not in err and all(w in err for w in words)


def subparsers(parser, prefix=()):
    """(command path, parser) of every sub-command, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield prefix + (name,), sp
                yield from subparsers(sp, prefix + (name,))


# ----------------------------------------------------------------------------------------------------- version, help
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cheers-deploy {VERSION}"


def test_every_default_is_in_the_help():
    parser = cli.build_parser()
    checked = 0
    for path, sp in subparsers(parser):
        assert sp.formatter_class is HelpFormatter, path
        text = sp.format_help()
        squeezed = re.sub(r"\s+", "", text)
        fmt = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or not shows_default(action.default):
                continue
            shown = fmt._expand_help(action)
            assert "default" in shown.lower() and str(action.default) in shown, (path, action.dest, shown)
            # the option's help, wrapped anywhere, is part of the printed help
            assert re.sub(r"\s+", "", shown) in squeezed, (path, action.dest)
            checked += 1
    assert checked > 40


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    out = capsys.readouterr().out
    for name in ("generate", "edit", "ask", "chat", "eval", "export", "calibrate", "build", "bench", "--version"):
        assert name in out


def test_calibrate_without_subcommand_prints_help_and_fails(capsys):
    rc, out, err = run(capsys, "calibrate")
    assert rc == 2
    assert "usage: cheers-deploy calibrate" in err and "capture" in err and "report" in err


# ----------------------------------------------------------------------------------------------------- threads
MODEL_COMMANDS = {
    "generate": ["generate", "--prompt", "a red circle", "--out", "OUT.png"],
    "edit": ["edit", "--image", "IMG", "--instruction", "make it blue", "--out", "OUT.png"],
    "ask": ["ask", "--image", "IMG", "--question", "what color is the shape?"],
    "chat": ["chat", "--prompt", "hello"],
    "eval": ["eval", "--n", "1"],
    "bench": ["bench", "--workdir", "WD"],
    "calibrate report": ["calibrate", "report", "--workdir", "WD"],
    "calibrate sweep": ["calibrate", "sweep", "--workdir", "WD"],
}


@pytest.mark.parametrize("name", sorted(MODEL_COMMANDS))
def test_threads_option_everywhere_and_zero_is_one_line_error(name, capsys, tmp_path):
    argv = [a.replace("WD", str(tmp_path / "wd")).replace("OUT", str(tmp_path / "o")) for a in MODEL_COMMANDS[name]]
    sp = dict(subparsers(cli.build_parser()))[tuple(name.split())]
    assert "physical cores" in re.sub(r"\s+", " ", sp.format_help())
    rc, out, err = run(capsys, *argv, "--threads", "0")
    assert rc == 2 and one_line_error(err, "--threads", "0"), err
    assert not (tmp_path / "wd").exists() and not list(tmp_path.glob("o*"))


def test_threads_reach_torch(capsys, torch_threads, shape_png):
    torch_threads.set_num_threads(2)
    rc, out, err = run(capsys, "ask", "--backend", "torch", "--image", str(shape_png), "--question",
                       "what color is the shape?", "--max-new-tokens", "2", "--threads", "1")
    assert rc == 0, err
    assert torch_threads.get_num_threads() == 1


def test_threads_reach_the_workdir_backend(capsys, monkeypatch, tmp_path, shape_png):
    """--workdir: the CLI hands threads= to Pipeline.from_workdir (which gives it to OrtBackend)."""
    from cheers_deploy.errors import InputError
    from cheers_deploy.runtime.pipeline import Pipeline

    seen = {}

    def from_workdir(workdir, **kw):
        seen.update(kw, workdir=workdir)
        raise InputError("stop here")

    monkeypatch.setattr(Pipeline, "from_workdir", staticmethod(from_workdir))
    rc, out, err = run(capsys, "chat", "--workdir", str(tmp_path), "--prompt", "hi", "--threads", "1")
    assert rc == 2 and "stop here" in err
    assert seen["threads"] == 1 and seen["backend"] == "ort" and str(seen["workdir"]) == str(tmp_path)
    rc, out, err = run(capsys, "eval", "--workdir", str(tmp_path), "--threads", "1", "--quiet")
    assert rc == 2 and seen["threads"] == 1


def test_ort_backend_takes_threads():
    """What from_workdir does with threads=: OrtBackend gets it (a keyword it accepts) and keeps it."""
    import inspect

    pytest.importorskip("onnxruntime")
    from cheers_deploy.runtime.ort_backend import OrtBackend

    assert "threads" in inspect.signature(OrtBackend.__init__).parameters


def test_bundled_graphs_run_on_ort_by_default(capsys, monkeypatch, tmp_path):
    """When the package ships the bundled model's graphs, a plain run uses them on onnxruntime; --backend torch
    (or --checkpoint) takes the torch path."""
    from cheers_deploy import hub
    from cheers_deploy.errors import InputError
    from cheers_deploy.runtime.pipeline import Pipeline

    calls = []

    def recorder(kind):
        def load(*a, **kw):
            calls.append((kind, a, kw))
            raise InputError(f"{kind} called")
        return staticmethod(load)

    monkeypatch.setattr(hub, "bundled_workdir", lambda: tmp_path)
    monkeypatch.setattr(Pipeline, "from_workdir", recorder("ort"))
    monkeypatch.setattr(Pipeline, "from_pretrained", recorder("torch"))
    assert run(capsys, "chat", "--prompt", "hi")[0] == 2
    assert calls[-1][0] == "ort" and calls[-1][1] == (tmp_path,) and calls[-1][2]["backend"] == "ort"
    assert run(capsys, "chat", "--prompt", "hi", "--backend", "torch")[0] == 2
    assert calls[-1][0] == "torch" and calls[-1][1] == (None,)
    assert run(capsys, "eval", "--n", "1", "--quiet")[0] == 2
    assert calls[-1][0] == "ort"
    monkeypatch.setattr(hub, "bundled_workdir", lambda: None)
    assert run(capsys, "chat", "--prompt", "hi")[0] == 2
    assert calls[-1][0] == "torch"


def test_revision_needs_a_hub_id(capsys, tmp_path):
    rc, out, err = run(capsys, "chat", "--prompt", "hi", "--revision", "main")
    assert rc == 2 and one_line_error(err, "--revision", "--checkpoint")
    rc, out, err = run(capsys, "chat", "--prompt", "hi", "--revision", "main", "--checkpoint", str(tmp_path))
    assert rc == 2 and one_line_error(err, "--revision")
    rc, out, err = run(capsys, "export", "--out", str(tmp_path / "wd"), "--revision", "main")
    assert rc == 2 and one_line_error(err, "--revision", "--checkpoint")
    assert not (tmp_path / "wd").exists()


def test_doctor_reports_threads_bundled_model_and_hub(capsys):
    rc, out, err = run(capsys, "doctor")
    assert rc == 0
    assert "cpu threads" in out and "bundled model" in out and "hf hub" in out


# ----------------------------------------------------------------------------------------------------- bundled model
def test_chat_on_the_bundled_model_explains_the_missing_text(capsys, torch_threads):
    rc, out, err = run(capsys, "chat", "--prompt", "hello")
    assert rc == 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    notes = [ln for ln in lines if ln.startswith("note: ")]
    assert len(notes) == 1 and "began an image" in notes[0] and "ask --image" in notes[0] and "generate" in notes[0]
    warnings = [ln for ln in lines if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "'hello'" in warnings[0]


def test_generate_defaults_draw_what_was_asked(capsys, tmp_path, torch_threads):
    from cheers_deploy.eval.detector import score_generation

    out = tmp_path / "x.png"
    rc, stdout, err = run(capsys, "generate", "--prompt", "a red circle on the left", "--out", str(out))
    assert rc == 0, err
    assert "warning:" not in err
    image = np.asarray(Image.open(out).convert("RGB"))
    score = score_generation(image, "a red circle on the left")
    assert score["color"] and score["shape"] and score["position"] and score["count"], score["matched"]


def test_generate_warns_about_unknown_words(capsys, tmp_path, torch_threads):
    rc, out, err = run(capsys, "generate", "--prompt", "a red dragon", "--out", str(tmp_path / "d.png"),
                       "--steps", "2")
    assert rc == 0
    assert any(ln.startswith("warning: ") and "'dragon'" in ln for ln in err.splitlines())


def test_chat_timings(capsys, torch_threads):
    rc, out, err = run(capsys, "chat", "--prompt", "what color is the shape?", "--max-new-tokens", "2", "--timings")
    assert rc == 0
    assert "stage timings:" in err and "prefill" in err


def test_edit_timings(capsys, tmp_path, shape_png, torch_threads):
    out = tmp_path / "e.png"
    rc, stdout, err = run(capsys, "edit", "--image", str(shape_png), "--instruction", "make the circle blue",
                          "--out", str(out), "--steps", "2", "--timings")
    assert rc == 0, err
    assert out.is_file() and "stage timings:" in err and "cfm_head" in err


# ----------------------------------------------------------------------------------------------------- progress
def test_eval_progress_bars_and_quiet(capsys, torch_threads):
    argv = ["eval", "--n", "1", "--n-gen", "1", "--n-two", "0", "--steps", "2"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and "exact match" in out
    assert "understanding" in err and "generation" in err and "%" in err
    rc, out, err = run(capsys, *argv, "--quiet")
    assert rc == 0 and err.strip() == ""


def test_evaluate_progress_callable_and_bool(capsys):
    from cheers_deploy.eval.evaluate import progress_reporter

    calls = []
    with progress_reporter(lambda i, n: calls.append((i, n)), "x", 3) as step:
        for i in range(3):
            step(i + 1, 3)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with progress_reporter(True, "items", 2) as step:
        step(1, 2)
        step(2, 2)
    assert "items" in capsys.readouterr().err
    with progress_reporter(False, "items", 2) as step:
        step(1, 2)
    assert capsys.readouterr().err == ""


def test_precision_report_fingerprint_progress(capsys):
    from cheers_deploy.precision import report as rep

    class Out:
        image = np.zeros((4, 4, 3), np.uint8)
        token_ids = [1, 2]

    class FakePipe:
        def generate(self, *a, **kw):
            return Out()

        def answer(self, *a, **kw):
            return Out()

    fp = rep.fingerprint_outputs(FakePipe(), n_images=2, steps=1, n_text=1, progress=True, desc="fp32 fingerprint")
    assert len(fp["images"]) == 2 and fp["ids"]
    assert "fp32 fingerprint" in capsys.readouterr().err
    rep.fingerprint_outputs(FakePipe(), n_images=1, steps=1, n_text=1)
    assert capsys.readouterr().err == ""


def test_report_and_calibrate_options():
    sp = dict(subparsers(cli.build_parser()))
    report_help = sp[("calibrate", "report")].format_help()
    assert "--quiet" in report_help and "--threads" in report_help
    assert "--quiet" in sp[("eval",)].format_help()


# ----------------------------------------------------------------------------------------------------- missing module
def test_unavailable_command_is_listed_and_explains(capsys, monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **kw):
        if name == "cheers_deploy.cli.export":
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    assert "(unavailable here: No module named 'torch')" in " ".join(capsys.readouterr().out.split())
    for argv in (["export"], ["export", "--help"], ["export", "--out", "x", "--force"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 2, argv
        assert one_line_error(err, "`cheers-deploy export` is unavailable", "No module named 'torch'",
                              "pip install cheers-deploy[torch]"), err
    rc, out, err = run(capsys, "doctor")           # the other commands are unaffected
    assert rc == 0


# ----------------------------------------------------------------------------------------------------- build hint
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "mixed"])
def test_missing_precision_suggests_a_command_that_parses(precision, tmp_path):
    from cheers_deploy.errors import CheckpointError
    from cheers_deploy.manifest import GraphEntry, Manifest, TensorEntry
    from cheers_deploy.trt.layout import graph_source

    wd = tmp_path / "wd"
    wd.mkdir()
    entry = GraphEntry("backbone", "backbone.onnx", [TensorEntry("x", "float32", [1, 4])],
                       [TensorEntry("y", "float32", [1, 4])])
    man = Manifest(graphs={"backbone": entry}, workdir=wd)
    man.save()
    man = Manifest.load(wd)
    with pytest.raises(CheckpointError) as e:
        graph_source(man, "backbone", precision)
    msg = str(e.value)
    commands = re.findall(r"`([^`]+)`", msg)
    assert commands, msg
    parser = cli.build_parser()
    for part in commands[0].split("&&"):
        words = shlex.split(part)
        assert words[0] == "cheers-deploy"
        args = parser.parse_args(words[1:])       # exits (SystemExit) if the suggestion does not parse
        assert args.workdir == str(wd)
    if precision in ("fp16", "bf16"):
        assert commands[0].strip() == f"cheers-deploy calibrate convert --workdir {wd} --precision {precision}"


# ----------------------------------------------------------------------------------------------------- quantize log
def test_quiet_preprocess_warning_drops_only_that_warning(caplog):
    from cheers_deploy.precision.quantize import quiet_preprocess_warning

    caplog.set_level(logging.WARNING)
    with quiet_preprocess_warning():
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: https://x ")
        logging.warning("something else")
    logging.warning("Please consider to run pre-processing before quantization. after")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["something else", "Please consider to run pre-processing before quantization. after"]


def test_quantize_graph_is_quiet(tmp_path, monkeypatch, caplog):
    """A real quantize_static run on a one-MatMul graph: onnxruntime's pre-processing suggestion is dropped."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime.quantization")
    from onnx import TensorProto, helper, numpy_helper

    from cheers_deploy.manifest import GraphEntry, Manifest, TensorEntry
    from cheers_deploy.precision import quantize as quant

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "vae_decoder.onnx"))
    man = Manifest(graphs={"vae_decoder": GraphEntry("vae_decoder", "vae_decoder.onnx",
                                                     [TensorEntry("x", "float32", [1, 8])],
                                                     [TensorEntry("y", "float32", [1, 8])])}, workdir=tmp_path)
    man.save()

    class Reader:
        def __init__(self, *a, **kw):
            rng = np.random.default_rng(1)
            self.feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(4)]
            self._it = iter(self.feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.feeds)

        def __len__(self):
            return len(self.feeds)

    monkeypatch.setattr(quant, "ShardReader", Reader)
    caplog.set_level(logging.WARNING)

    def pre_processing_lines():
        return [r for r in caplog.records if "pre-processing before quantization" in r.getMessage()]

    import contextlib
    with monkeypatch.context() as m:                       # control: without the filter onnxruntime says it
        m.setattr(quant, "quiet_preprocess_warning", contextlib.nullcontext)
        quant.quantize_graph(tmp_path, "vae_decoder", "minmax", man=man, register_as=None, out_name="a.onnx")
    assert pre_processing_lines()
    caplog.clear()
    info = quant.quantize_graph(tmp_path, "vae_decoder", "minmax", man=man, register_as=None, out_name="b.onnx")
    assert (tmp_path / info["file"]).is_file()
    assert not pre_processing_lines()


# ----------------------------------------------------------------------------------------------------- plot
def test_precision_plot_legends_do_not_cover_bars():
    pytest.importorskip("matplotlib")
    from cheers_deploy.precision import report as rep
    from cheers_deploy.precision.common import GRAPHS

    def entry(cos, em, c):
        return {"graphs": {g: {"cosine": cos} for g in GRAPHS}, "understanding": {"exact_match": em},
                "generation": {"color": c, "shape": c, "position": c}}

    res = {"precisions": {"fp32": {"graphs": {}, "understanding": {"exact_match": 0.99},
                                   "generation": {"color": 1.0, "shape": 1.0, "position": 0.98}},
                          "fp16": entry(0.99999, 0.99, 0.99), "int8": entry(0.999, 0.98, 1.0),
                          "mixed": entry(0.9999, 0.99, 1.0)}}
    fig = rep.plot_figure(res)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 2
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches]
    bars = [b for b in bars if np.all(np.isfinite(b.get_points())) and b.width > 0 and b.height > 0]
    assert len(bars) > 10
    fig_box = fig.bbox
    for leg in legends:
        box = leg.get_window_extent(renderer)
        assert not any(box.overlaps(b) for b in bars)
        assert fig_box.x0 <= box.x0 and box.x1 <= fig_box.x1 and fig_box.y0 <= box.y0 and box.y1 <= fig_box.y1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_calibrate_refuses_the_shipped_graphs(capsys):
    """Calibration writes into its workdir: never into the package's own bundled graphs."""
    from cheers_deploy.hub import BUNDLED_GRAPHS

    before = sorted(p.name for p in BUNDLED_GRAPHS.iterdir())
    for sub in ("capture", "quantize", "convert", "sweep", "report"):
        extra = ["--precision", "fp16"] if sub == "convert" else []
        assert cli.main(["calibrate", sub, "--workdir", str(BUNDLED_GRAPHS), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "copy" in err and "\n" not in err
    assert sorted(p.name for p in BUNDLED_GRAPHS.iterdir()) == before
