"""Per-graph error, end-to-end scores, the per-graph INT8 sensitivity sweep ("mixed") and the precision report.

* per-graph error: every graph file of a precision against the fp32 graph on the captured inputs (cosine, max abs);
  run by ORT CPU, or the ONNX reference evaluator where ORT CPU cannot run the dtype (bf16);
* end to end (precisions whose five graphs ORT CPU runs): cheers_deploy.eval.evaluate on held-out scenes
  (understanding exact match, generation color/shape/position) + image PSNR vs fp32 for the same noise and greedy
  agreement of the greedy answers vs fp32 (token level and whole answers);
* sweep: one graph at a time in INT8 (others fp32), end-to-end PSNR / answer agreement; graphs that fail the
  thresholds fall back to fp16 (or fp32) in the "mixed" precision written to the manifest, or, with a per-layer
  sweep, keep INT8 in the layer groups that pass alone (precision "int8_layers" of that graph).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..manifest import Manifest, PrecisionVariant
from ..fileio import sha256_file
from .common import GRAPHS, available_precisions, compare_outputs, graph_file, iter_feeds, psnr
from .convert import GraphRun
from ..fileio import atomic_path, atomic_write_text, write_json

PROMPTS = ("a red circle on the left", "a small blue square at the top", "a large green star in the center",
           "a yellow triangle at the bottom", "a purple cross on the right", "an orange circle at the top")
PSNR_MIN_DB = 30.0          # sweep thresholds: a graph (or layer group) stays INT8 when quantizing it alone keeps
AGREE_MIN = 0.99            # the images above PSNR_MIN_DB and >= AGREE_MIN of the answers identical to fp32
N_TEXT_SCENES = 60          # fingerprint: every question of 60 held-out scenes (~450 answers)


# ------------------------------------------------------------------------------------------------ per graph
def graph_errors(workdir, precision: str, limit: int = 4, graphs: Sequence[str] = GRAPHS) -> Dict[str, dict]:
    man = Manifest.load(workdir)
    out = {}
    for g in graphs:
        ref = GraphRun(man.graph_path(g), allow_reference=False)
        run = GraphRun(graph_file(man, g, precision))
        rows = [compare_outputs(run(f), ref(f)) for f in iter_feeds(workdir, g, limit=limit)]
        out[g] = {"cosine": min(r["cosine"] for r in rows), "max_abs": max(r["max_abs"] for r in rows),
                  "max_rel": max(r["max_rel"] for r in rows), "calls": len(rows),
                  "engine": "ort-cpu" if run.engine == "ort-cpu" else "onnx-reference"}
    return out


# ------------------------------------------------------------------------------------------------ end to end
def _pipe(workdir, precision, threads: Optional[int] = None):
    from ..runtime.pipeline import Pipeline

    return Pipeline.from_workdir(workdir, backend="ort", precision=None if precision == "fp32" else precision,
                                 threads=threads)


def ort_runs(workdir, precision: str) -> bool:
    man = Manifest.load(workdir)
    try:
        for g in GRAPHS:
            if GraphRun(graph_file(man, g, precision), allow_reference=False).engine != "ort-cpu":
                return False
    except Exception:
        return False
    return True


def fingerprint_outputs(pipe, n_images: int = 3, steps: int = 10, n_text: int = N_TEXT_SCENES, progress=None,
                        desc: str = "fingerprint") -> dict:
    """Images for fixed prompts and noise seeds, and the greedy ids of every question of `n_text` held-out
    scenes (~7.5 questions each): compared across precisions. progress: as in cheers_deploy.eval.evaluate (True =
    a tqdm bar on stderr over the images and answers)."""
    from ..data import shapes as W
    from ..eval.evaluate import progress_reporter

    prompts = PROMPTS[:n_images]
    questions = [(s.image, q) for s in W.make_split("heldout", n_text, seed=7) for _, q, _ in s.qa]
    total = len(prompts) + len(questions)
    imgs, ids = [], []
    with progress_reporter(progress, desc, total) as step:
        for i, p in enumerate(prompts):
            imgs.append(pipe.generate(p, steps=steps, cfg_scale=3.0, alpha=1.0, seed=100 + i, max_new_tokens=1).image)
            step(len(imgs), total)
        for image, q in questions:
            ids.append(pipe.answer(image, q, max_new_tokens=6).token_ids)
            step(len(imgs) + len(ids), total)
    return {"images": imgs, "ids": ids}


def compare_fingerprints(a: dict, ref: dict) -> dict:
    """image_psnr_db: mean PSNR vs the reference images (capped at 100 dB); id_agreement: mean per-token
    agreement of the greedy ids; answer_agreement: fraction of answers whose ids equal the reference's."""
    ps = [psnr(x, y) for x, y in zip(a["images"], ref["images"])]
    agree = [float(np.mean([i == j for i, j in zip(x, y)])) if y else 1.0 for x, y in zip(a["ids"], ref["ids"])]
    same = [list(x) == list(y) for x, y in zip(a["ids"], ref["ids"])]
    ps = [min(p, 100.0) for p in ps]          # identical images: capped at 100 dB (JSON has no infinity)
    return {"image_psnr_db": float(np.mean(ps)) if ps else None,
            "id_agreement": float(np.mean(agree)) if agree else 1.0,
            "answer_agreement": float(np.mean(same)) if same else 1.0, "answers": len(same)}


def evaluate_precision(workdir, precision: str, eval_n: int, steps: int, ref_fp: Optional[dict],
                       n_text: int = N_TEXT_SCENES, threads: Optional[int] = None, progress=None) -> dict:
    from ..eval.evaluate import evaluate

    pipe = _pipe(workdir, precision, threads)
    t0 = time.perf_counter()
    res = evaluate(pipe, n=eval_n, n_gen=eval_n, n_two=0, steps=steps, progress=progress)
    fp = fingerprint_outputs(pipe, steps=steps, n_text=n_text, progress=progress, desc=f"{precision} fingerprint")
    u, g = res["understanding"], res["generation"]
    out = {"understanding": {"exact_match": u["exact_match"], "per_type": u["per_type"],
                             "n_questions": u["n_questions"]},
           "generation": {k: g[k] for k in ("color", "shape", "position", "size", "single_object", "overall")},
           "validated_by": "ort-cpu end to end", "eval_seconds": round(time.perf_counter() - t0, 1)}
    out["generation"]["n"] = g["n_single"]
    out.update(compare_fingerprints(fp, ref_fp) if ref_fp is not None else {"image_psnr_db": None,
                                                                            "id_agreement": 1.0,
                                                                            "answer_agreement": 1.0,
                                                                            "note": "reference"})
    return out, fp


# ------------------------------------------------------------------------------------------------ sweep / mixed
def _set_variant(man: Manifest, precision: str, choice: Dict[str, str]) -> None:
    for g, p in choice.items():
        path = graph_file(man, g, p)
        source = man.graph(g).variant(p)
        man.graph(g).precisions[precision] = PrecisionVariant(path.name, source.external_data, sha256_file(path),
                                                              {"from": p})


def _passes(m: dict, psnr_min: float, agree_min: float) -> bool:
    return m["image_psnr_db"] >= psnr_min and m["answer_agreement"] >= agree_min


def _probe(workdir, man: Manifest, choice: Dict[str, str], ref: dict, steps: int, n_text: int,
           threads: Optional[int] = None) -> dict:
    """End-to-end fingerprint with `choice` ({graph: precision}) registered as "mixed", compared to `ref`."""
    _set_variant(man, "mixed", choice)
    man.save()
    return compare_fingerprints(fingerprint_outputs(_pipe(workdir, "mixed", threads), steps=steps, n_text=n_text),
                                ref)


def _fmt(m: dict) -> str:
    return f"PSNR {m['image_psnr_db']:.1f} dB, answers identical {m['answer_agreement']:.3f} ({m['answers']})"


def layer_sweep(workdir, man: Manifest, graph: str, ref: dict, steps: int, psnr_min: float, agree_min: float,
                method: Optional[str] = None, n_text: int = N_TEXT_SCENES, log=print,
                threads: Optional[int] = None) -> dict:
    """Per-layer sensitivity of one graph: each layer group alone in INT8 (the rest of that graph and the other
    graphs fp32). Groups that fail the thresholds stay in floating point; the others are quantized together into
    `<graph>.int8_layers.onnx` (precision "int8_layers"), which is checked end to end again."""
    import onnx

    from .quantize import DEFAULT_METHOD, OP_TYPES, excluded_nodes, layer_groups, quantize_graph

    model = onnx.load(str(man.graph_path(graph)), load_external_data=False)
    int8 = man.graph(graph).precisions["int8"].extra
    method = method or int8.get("method") or DEFAULT_METHOD
    outq = bool(int8.get("outputs_quantized", False))
    groups = layer_groups(model)
    always = set(excluded_nodes(model, graph))                   # the hi gate (plugin region)
    quantizable = {n.name for n in model.graph.node if n.op_type in OP_TYPES} - always
    per, keep = {}, []
    probe_file = f"{graph}.int8_probe.onnx"
    try:
        for name, nodes in groups.items():
            nodes = [n for n in nodes if n in quantizable]
            if not nodes:
                continue
            quantize_graph(workdir, graph, method, exclude=sorted(quantizable - set(nodes)), out_name=probe_file,
                           man=man, register_as="int8_probe", quantize_outputs=outq)
            m = _probe(workdir, man, {h: ("int8_probe" if h == graph else "fp32") for h in GRAPHS}, ref, steps, n_text,
                       threads)
            ok = _passes(m, psnr_min, agree_min)
            per[name] = dict(m, nodes=len(nodes), keep_int8=ok)
            keep += nodes if ok else []
            log(f"sweep: {graph} {name} ({len(nodes)} nodes) alone in int8: {_fmt(m)} -> {'int8' if ok else 'float'}")
    finally:
        man.graph(graph).precisions.pop("int8_probe", None)
        for f in Path(workdir).glob(probe_file + "*"):
            f.unlink()
    if not keep:
        return {"groups": per, "kept_nodes": 0, "combined": None, "ok": False}
    info = quantize_graph(workdir, graph, method, exclude=sorted(quantizable - set(keep)),
                          out_name=f"{graph}.int8_layers.onnx", man=man, register_as="int8_layers",
                          quantize_outputs=outq)
    m = _probe(workdir, man, {h: ("int8_layers" if h == graph else "fp32") for h in GRAPHS}, ref, steps, n_text,
               threads)
    ok = _passes(m, psnr_min, agree_min)
    log(f"sweep: {graph} with {len(per) - sum(not v['keep_int8'] for v in per.values())}/{len(per)} groups in int8: "
        f"{_fmt(m)} -> {'int8_layers' if ok else 'rejected'}")
    return {"groups": per, "kept_nodes": len(keep), "float_nodes": len(info["excluded_nodes"]), "combined": m,
            "ok": ok}


def sweep(workdir, steps: int = 10, psnr_min: float = PSNR_MIN_DB, agree_min: float = AGREE_MIN,
          fallback: Optional[str] = None, per_layer: Optional[Sequence[str]] = None, method: Optional[str] = None,
          n_text: int = N_TEXT_SCENES, log=print, threads: Optional[int] = None) -> dict:
    """Quantize one graph at a time (the others fp32); graphs whose end-to-end PSNR / answer agreement vs fp32
    stay above the thresholds keep INT8. With `per_layer` ([] = every graph that failed, or named graphs), a
    failing graph gets a per-layer sweep and keeps INT8 for the layer groups that pass alone (`layer_sweep`).
    The rest falls back to `fallback` (default fp16 when present and ORT runs it, else fp32).
    Registers the result as precision "mixed". Returns {"per_graph": {...}, "per_layer": {...}, "plan": {...}}."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    have = available_precisions(man)
    if "int8" not in have:
        raise InputError("sweep needs int8 graphs (cheers-deploy calibrate quantize)")
    bad = [g for g in (per_layer or []) if g not in GRAPHS]
    if bad:
        raise InputError(f"unknown graph(s) {bad}; choose from {', '.join(GRAPHS)}")
    if fallback is None:
        fallback = "fp16" if "fp16" in have and ort_runs(workdir, "fp16") else "fp32"
    ref = fingerprint_outputs(_pipe(workdir, "fp32", threads), steps=steps, n_text=n_text)
    per, plan, layers = {}, {}, {}
    for g in GRAPHS:
        m = _probe(workdir, man, {h: ("int8" if h == g else "fp32") for h in GRAPHS}, ref, steps, n_text, threads)
        ok = _passes(m, psnr_min, agree_min)
        per[g] = dict(m, keep_int8=ok)
        plan[g] = "int8" if ok else fallback
        log(f"sweep: {g} alone in int8: {_fmt(m)} -> {plan[g]}")
    if per_layer is not None:
        for g in (list(per_layer) or [g for g in GRAPHS if plan[g] != "int8"]):
            layers[g] = layer_sweep(workdir, man, g, ref, steps, psnr_min, agree_min, method, n_text, log, threads)
            if layers[g]["ok"]:
                plan[g] = "int8_layers"
    _set_variant(man, "mixed", plan)
    man.calibration["mixed"] = {
        "plan": plan, "sweep": per, "per_layer": layers, "psnr_min_db": psnr_min, "answer_agreement_min": agree_min,
        "fallback": fallback, "fingerprint": f"{len(PROMPTS[:3])} images x {steps} steps, "
                                             f"{len(ref['ids'])} answers of {n_text} held-out scenes"}
    man.save()
    return {"per_graph": per, "per_layer": layers, "plan": plan}


# ------------------------------------------------------------------------------------------------ report
def report(workdir, eval_n: int = 20, steps: int = 25, limit: int = 4, json_path=None, out_dir=None,
           precisions: Optional[Sequence[str]] = None, n_text: int = N_TEXT_SCENES, log=print,
           threads: Optional[int] = None, progress=None) -> dict:
    """Per-graph error and end-to-end scores of every precision (or `precisions`) against fp32; writes
    precision_report.md / .png to `out_dir` (default <workdir>/calib). threads: CPU threads of the ORT runs.
    progress: True = tqdm bars on stderr over the evaluation items (see cheers_deploy.eval.evaluate)."""
    workdir = Path(workdir)
    man = Manifest.load(workdir)
    precs = [p for p in (precisions or available_precisions(man)) if p in available_precisions(man)]
    res: dict = {"workdir": str(workdir), "settings": {"eval_n": eval_n, "steps": steps, "per_graph_calls": limit},
                 "precisions": {}}
    ref_fp = None
    order = ["fp32"] + [p for p in precs if p != "fp32"]
    for p in order:
        t0 = time.perf_counter()
        entry: dict = {"graphs": graph_errors(workdir, p, limit) if p != "fp32" else {}}
        if ort_runs(workdir, p):
            e2e, fp = evaluate_precision(workdir, p, eval_n, steps, ref_fp, n_text, threads, progress)
            if p == "fp32":
                ref_fp = fp
            entry.update(e2e)
        else:
            entry.update({"understanding": {"exact_match": None}, "generation": {"color": None, "shape": None,
                                                                                  "position": None},
                          "image_psnr_db": None, "validated_by": "onnx reference evaluator, per graph only "
                                                                 "(ORT CPU has no kernels for this dtype)"})
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        res["precisions"][p] = entry
        log(f"report: {p} done ({entry['seconds']} s)")
    if "mixed" in res["precisions"]:
        mixed = man.calibration.get("mixed", {})
        res["mixed_plan"] = mixed.get("plan")
        res["mixed_float_layers"] = {g: [k for k, v in r["groups"].items() if not v["keep_int8"]]
                                     for g, r in (mixed.get("per_layer") or {}).items() if r.get("ok")}
    out_dir = Path(out_dir) if out_dir else workdir / "calib"
    out_dir.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    atomic_write_text(out_dir / "precision_report.md", md)
    plot(res, out_dir / "precision_report.png")
    res["markdown"] = str(out_dir / "precision_report.md")
    res["plot"] = str(out_dir / "precision_report.png")
    if json_path:
        write_json(json_path, res)
    return res


def _f(x, fmt="{:.3f}"):
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return fmt.format(x)


def to_markdown(res: dict) -> str:
    lines = ["# Precision report", "", f"workdir `{res['workdir']}`; settings {res['settings']}", "",
             "## End to end (held-out shapes world)", "",
             "| precision | understanding EM | gen color | gen shape | gen position | image PSNR vs fp32 (dB) | "
             "answers identical to fp32 | validated by |", "|---|---|---|---|---|---|---|---|"]
    for p, e in res["precisions"].items():
        g = e["generation"]
        lines.append(f"| {p} | {_f(e['understanding']['exact_match'])} | {_f(g['color'])} | {_f(g['shape'])} | "
                     f"{_f(g['position'])} | {_f(e.get('image_psnr_db'), '{:.1f}')} | {_f(e.get('answer_agreement'))} | "
                     f"{e['validated_by']} |")
    lines += ["", "## Per-graph error vs fp32 (captured inputs)", "",
              "| precision | graph | cosine (min) | max abs | max rel | run by |", "|---|---|---|---|---|---|"]
    for p, e in res["precisions"].items():
        for g, r in e["graphs"].items():
            lines.append(f"| {p} | {g} | {r['cosine']:.6f} | {r['max_abs']:.3g} | {r['max_rel']:.3g} | {r['engine']} |")
    if res.get("mixed_plan"):
        lines += ["", f"mixed plan: {res['mixed_plan']}"]
    if res.get("mixed_float_layers"):
        lines += ["", "layer groups left in floating point by the per-layer sweep: "
                  + "; ".join(f"{g}: {', '.join(v)}" for g, v in res["mixed_float_layers"].items())]
    return "\n".join(lines) + "\n"


def plot_figure(res: dict):
    """The report's figure (matplotlib, Agg): per-graph 1 - cosine per precision, end-to-end scores per precision.
    Legends sit to the right of their axes, never over the bars. None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    precs = [p for p in res["precisions"] if p != "fp32"]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    width = 0.8 / max(1, len(precs))
    for i, p in enumerate(precs):
        gr = res["precisions"][p]["graphs"]
        ys = [max(1e-9, 1 - gr[g]["cosine"]) for g in GRAPHS if g in gr]
        ax[0].bar(np.arange(len(ys)) + i * width, ys, width=width, label=p)
    ax[0].set_xticks(np.arange(len(GRAPHS)) + width * (max(1, len(precs)) - 1) / 2)
    ax[0].set_xticklabels(GRAPHS, rotation=20, fontsize=8)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("1 - cosine vs fp32")
    ax[0].set_title("per-graph error")
    if precs:
        ax[0].legend(title="precision", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    names, keys = list(res["precisions"]), ["exact_match", "color", "shape", "position"]
    for j, k in enumerate(keys):
        vals = []
        for p in names:
            e = res["precisions"][p]
            v = e["understanding"].get(k) if k == "exact_match" else e["generation"].get(k)
            vals.append(np.nan if v is None else v)
        ax[1].bar(np.arange(len(names)) + j * 0.2, vals, width=0.2, label=k)
    ax[1].set_xticks(np.arange(len(names)) + 0.3)
    ax[1].set_xticklabels(names)
    ax[1].set_ylim(0, 1)
    ax[1].legend(title="score", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax[1].set_title("end-to-end scores")
    return fig


def plot(res: dict, path) -> None:
    fig = plot_figure(res)
    if fig is None:  # pragma: no cover
        return
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
