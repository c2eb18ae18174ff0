"""`cheers-deploy bench`: one small CPU run (tiny random checkpoint, exported by the bench itself into an empty
workdir) whose report is checked for structure and for positive, finite figures (not for values: timings depend on
the machine); argument errors (the energy samplers: test_energy.py).

The export inside the bench is the real `export_all`, run without onnxslim and without the ORT-vs-torch check
(test_export.py covers those), and with one intra-op thread per backend (two-thread pools slow down several
fold on a loaded 2-core machine), to keep the module under ~90 s."""
import csv
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cheers_deploy import cli  # noqa: E402
from cheers_deploy.bench.run import BenchSettings, prepare_workdir  # noqa: E402
from cheers_deploy.errors import CheckpointError  # noqa: E402

BACKENDS = ["torch", "ort"]
TASKS = ["t2i", "vqa", "chat"]
STEPS, RUNS, TOKENS = 2, 2, 4
# stages each task must time, with calls per run
EXPECTED_STAGES = {
    "t2i": {"vae_encode": 1, "vision_tokenizer": 1 + STEPS, "prefill": 1, "image_step": STEPS, "cfm_head": STEPS,
            "vae_decode": 1},
    "vqa": {"vae_encode": 1, "vision_tokenizer": 1, "prefill": 1, "decode": TOKENS},      # decode includes the LM head
    "chat": {"vae_encode": 1, "vision_tokenizer": 1, "prefill": 1, "decode": TOKENS},
}
EXPECTED_E2E = {"t2i": {"image_ms", "euler_step_ms"}, "vqa": {"ttft_ms", "tokens_per_s", "total_ms"},
                "chat": {"ttft_ms", "tokens_per_s", "total_ms"}}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_run(tiny_ckpt, tmp_path_factory):
    from cheers_deploy.export import exporter

    base = tmp_path_factory.mktemp("bench")
    wd, out = base / "workdir", base / "report"
    real_export = exporter.export_all

    def fast_export(ckpt, out_dir, **kw):
        kw.update(simplify=False, verify=False, progress=False)
        return real_export(ckpt, out_dir, **kw)

    argv = ["bench", "--workdir", str(wd), "--checkpoint", str(tiny_ckpt), "--backends", ",".join(BACKENDS),
            "--task", ",".join(TASKS), "--steps", str(STEPS), "--runs", str(RUNS), "--warmup", "1",
            "--max-new-tokens", str(TOKENS), "--threads", "1", "--energy", "--quiet", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exporter, "export_all", fast_export)
            rc = cli.main(argv)
    finally:
        torch.set_num_threads(threads)          # --threads 1 is process-wide; leave later tests as they were
    assert rc == 0
    return {"out": out, "workdir": wd, "ckpt": tiny_ckpt, "report": json.loads((out / "bench.json").read_text())}


def test_report_files(bench_run):
    out = bench_run["out"]
    for name in ("bench.json", "bench.csv", "bench.md", "stages.png", "backends.png"):
        assert (out / name).is_file(), name
    for name in ("stages.png", "backends.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (bench_run["workdir"] / "manifest.json").is_file()        # the bench exported the empty workdir


def test_report_header(bench_run):
    rep = bench_run["report"]
    assert rep["schema"] == "cheers-deploy-bench/1"
    assert rep["date"][:2] == "20" and "T" in rep["date"]
    m = rep["machine"]
    assert m["cpu_model"] and _positive(m["cpu_cores"]) and isinstance(m["gpus"], list)
    assert rep["libraries"]["torch"] and rep["libraries"]["onnxruntime"] and rep["libraries"]["numpy"]
    assert rep["command"].startswith("cheers-deploy bench") and "--steps 2" in rep["command"]
    assert rep["model"]["exported_now"] is True
    assert rep["model"]["checkpoint_hash"] == rep["model"]["workdir_checkpoint_hash"]
    s = rep["settings"]
    assert (s["steps"], s["runs"], s["warmup"], s["backends"], s["tasks"]) == (STEPS, RUNS, 1, BACKENDS, TASKS)
    for when in ("at_start", "at_end"):          # what makes the numbers reproducible: a reading or "unavailable: why"
        r = rep["reproducibility"][when]
        assert set(r) == {"gpu_driver", "cuda_driver", "cuda_runtime_torch", "gpus", "jetson", "cpu_governor"}
        assert set(r["jetson"]) == {"l4t", "nvpmodel", "jetson_clocks"}
        for v in [r[k] for k in ("gpu_driver", "cuda_driver", "gpus", "cpu_governor")] + list(r["jetson"].values()):
            assert v and (not isinstance(v, str) or not v.startswith("unavailable") or len(v) > len("unavailable: "))


def test_report_figures_positive_and_finite(bench_run):
    rep = bench_run["report"]
    assert list(rep["backends"]) == BACKENDS
    for b in BACKENDS:
        br = rep["backends"][b]
        assert _positive(br["load_s"]) and br["info"]["clock"]
        assert list(br["tasks"]) == TASKS
        for task in TASKS:
            t = br["tasks"][task]
            for stage, calls in EXPECTED_STAGES[task].items():
                st = t["stages_ms"][stage]
                assert st["n"] == calls * RUNS and st["calls_per_run"] == calls, (b, task, stage)
                assert t["stage_totals_ms"][stage]["n"] == RUNS
            for group in ("stages_ms", "stage_totals_ms", "end_to_end"):
                for k, st in t[group].items():
                    for f in ("median", "p90", "mean", "min", "max"):
                        assert _positive(st[f]), (b, task, group, k, f, st[f])
                    assert st["min"] <= st["median"] <= st["p90"] <= st["max"]
            assert set(t["end_to_end"]) == EXPECTED_E2E[task]
            assert t["end_to_end"]["tokens_per_s" if task != "t2i" else "image_ms"]["n"] == RUNS
            if task != "t2i":
                assert t["tokens_per_run"] == TOKENS
            e = t["energy"]
            assert e["status"] in ("ok", "unavailable")
            if e["status"] == "ok":
                assert _positive(e["joules"]) and _positive(e["avg_power_w"])
                assert _positive(e["joules_per_image" if task == "t2i" else "joules_per_token"])
            else:
                assert e["reason"] and "joules" not in e
        host = br["memory"]["host_peak_rss"]
        assert _positive(host["bytes"]) if "bytes" in host else host["status"] == "unavailable"
        gpu = br["memory"]["gpu"]
        assert gpu["status"] == "unavailable" and gpu["reason"]          # CPU run
    ratios = rep["ratios"]["torch/ort"]
    for task in TASKS:
        assert set(ratios[task]["stages"]) == set(rep["backends"]["torch"]["tasks"][task]["stages_ms"])
        assert set(ratios[task]["end_to_end"]) == EXPECTED_E2E[task]
        assert all(_positive(v) for part in ("stages", "end_to_end") for v in ratios[task][part].values())


def test_csv_and_markdown(bench_run):
    rep = bench_run["report"]
    rows = list(csv.DictReader((bench_run["out"] / "bench.csv").open()))
    assert rows and {"backend", "task", "section", "metric", "median", "p90", "date", "cpu_model"} <= set(rows[0])
    sections = {r["section"] for r in rows}
    assert {"stage_per_call", "end_to_end", "memory", "energy", "ratio_stage", "ratio_end_to_end"} <= sections
    for r in rows:
        if r["median"] != "unavailable":
            assert _positive(float(r["median"])), r
        assert r["date"] == rep["date"]
    md = (bench_run["out"] / "bench.md").read_text()
    assert rep["date"] in md and rep["machine"]["cpu_model"] in md and rep["command"] in md
    assert "torch/ort" in md and "time per Euler step" in md and "time to first token" in md
    assert "## Peak memory" in md and "## Energy" in md and "peak power" in md
    assert "- clocks and power mode at start: " in md and "CPU governor" in md


def test_mismatched_workdir_is_refused(bench_run, monkeypatch):
    """The torch backend must run the weights the graphs were exported from, else the ratios mean nothing."""
    import cheers_deploy.checkpoint as ck

    monkeypatch.setattr(ck, "checkpoint_hash", lambda path: "0" * 64)
    s = BenchSettings(workdir=str(bench_run["workdir"]), backends=BACKENDS, checkpoint=str(bench_run["ckpt"]))
    with pytest.raises(CheckpointError, match="different weights"):
        prepare_workdir(s, lambda msg: None)


@pytest.mark.parametrize("args, words", [
    (["--backends", "torch,foo"], "unknown backend 'foo'"),
    (["--task", "t2i,draw"], "unknown task 'draw'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--backends", "ort,ort"], "twice"),
])
def test_argument_errors_are_one_line(args, words, tmp_path, capsys):
    rc = cli.main(["bench", "--workdir", str(tmp_path / "wd"), "--quiet"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and words in err and "\n" not in err
    assert not (tmp_path / "wd").exists()                  # nothing exported or written before the check


def test_interleaved_runs_alternate_backends(monkeypatch):
    """--interleave: every backend warms up, then run r of each backend comes before run r+1 of any."""
    from cheers_deploy.bench import run as bench_run_mod

    order = []

    def fake_run_task(task, pipe, clock, s, seed):
        order.append(pipe)
        return {"stages": {"prefill": [0.01]}, "metrics": {"ttft_ms": 5.0, "tokens_per_s": 10.0, "total_ms": 9.0},
                "images": 0, "tokens": 4}

    class Fake:
        def __init__(self, name):
            self.name, self.pipe, self.clock, self.sampler, self.tasks = name, name, None, None, {}

        timed = bench_run_mod._Loaded.timed

    monkeypatch.setattr(bench_run_mod, "run_task", fake_run_task)
    group = [Fake("torch"), Fake("ort")]
    s = BenchSettings(workdir="unused", backends=["torch", "ort"], runs=3, warmup=1)
    bench_run_mod._measure("chat", group, s, lambda msg: None)
    assert order == ["torch", "ort"] + ["torch", "ort"] * 3
    for f in group:
        t = f.tasks["chat"]
        assert t["stages_ms"]["prefill"]["n"] == 3 and t["end_to_end"]["ttft_ms"]["median"] == 5.0
        assert t["energy"]["status"].startswith("not requested")
