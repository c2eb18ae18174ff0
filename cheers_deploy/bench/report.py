"""Write a `cheers-deploy bench` report: bench.json (everything), bench.csv (one row per figure), bench.md (the
tables, backends side by side with their ratios) and two PNG plots (stage breakdown per backend, per-stage
latency of the backends side by side). Every file carries the date, the machine and the library versions."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional

from .reproducibility import summary_line
from .run import METRIC_UNITS, STAGE_LABELS
from ..fileio import atomic_path, atomic_write_text, json_safe

FILES = {"json": "bench.json", "csv": "bench.csv", "md": "bench.md", "stages_png": "stages.png",
         "backends_png": "backends.png"}
TASK_TITLES = {"t2i": "text to image (per image)", "vqa": "image understanding (VQA)",
               "chat": "text chat"}
METRIC_LABELS = {"image_ms": "time per image", "euler_step_ms": "time per Euler step", "ttft_ms": "time to first token",
                 "total_ms": "total per answer", "tokens_per_s": "decode rate"}


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}g}"


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def repro_lines(rep: dict) -> List[str]:
    """Clocks, power limit, persistence, Jetson power mode and CPU governor at the start and end of the run."""
    r = rep.get("reproducibility")
    if not r:
        return ["- clocks and power mode: not recorded in this report (an older schema)"]
    return [f"- clocks and power mode {when.replace('_', ' ')}: {summary_line(r[when])}" for when in ("at_start", "at_end")
            if when in r]


def header_lines(rep: dict) -> List[str]:
    m, lib = rep["machine"], rep["libraries"]
    gpus = ", ".join(f"{g['name']}" for g in m.get("gpus") or []) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in lib.items() if v)
    mem = _gib(m["memory_bytes"]) if m.get("memory_bytes") else "?"
    load = f"; load average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end" \
        if m.get("loadavg_start") is not None else ""
    return [f"- date: {rep['date']} (UTC)",
            f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), {mem} RAM, "
            f"GPU: {gpus}; {m['os']}{load}",
            f"- libraries: {libs}",
            *repro_lines(rep),
            f"- command: `{rep['command']}`" if rep.get("command") else "- command: (library call)"]


# ================================================================================================ markdown

def markdown(rep: dict) -> str:
    backends = list(rep["backends"])
    st = rep["settings"]
    model = rep["model"]
    pairs = list(rep.get("ratios", {}))
    L = ["# cheers-deploy bench", ""] + header_lines(rep)
    L.append(f"- model: checkpoint `{model.get('checkpoint') or model.get('workdir_checkpoint')}`, workdir "
             f"`{model.get('workdir')}` ({model.get('resolution')} px, {model.get('tokens_per_image')} tokens/image)")
    L.append(f"- settings: tasks {','.join(st['tasks'])}; {st['steps']} Euler steps, CFG {st['cfg_scale']}; "
             f"{st['max_new_tokens']} new tokens (stop tokens masked); {st['warmup']} warm-up + {st['runs']} timed "
             f"runs; median (p90) over the timed runs' calls; backends {st.get('backend_order', 'sequential')}")
    for b in backends:
        info = rep["backends"][b]["info"]
        L.append(f"- {b}: " + ", ".join(f"{k} {v}" for k, v in info.items()) +
                 f"; load {rep['backends'][b]['load_s']:.1f} s")
    L.append("")
    L.append("Ratios a/b are medians of times (for tokens/s: b's rate over a's), so > 1 means b is faster.")
    if "ort" in backends:
        L.append("The ort backbone graph returns the logits with the hidden states, so ort's 'per-token decode' "
                 "includes the LM head and its 'LM head' row is a copy: compare decode + LM head, or the decode rate.")
    for task in st["tasks"]:
        if not all(task in rep["backends"][b]["tasks"] for b in backends):
            continue
        title = TASK_TITLES.get(task, task)
        if task == "t2i":
            title += (", CFG off: batch 1" if float(st["cfg_scale"]) == 1.0 else
                      f", CFG {st['cfg_scale']}: backbone and head at batch 2")
        L += ["", f"## {title}", ""]
        head = ["stage", "calls/run"] + [f"{b} ms" for b in backends] + pairs
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        stages = [k for k in STAGE_LABELS if any(k in rep["backends"][b]["tasks"][task]["stages_ms"] for b in backends)]
        for k in stages:
            row = [STAGE_LABELS.get(k, k)]
            first = next(rep["backends"][b]["tasks"][task]["stages_ms"][k] for b in backends
                         if k in rep["backends"][b]["tasks"][task]["stages_ms"])
            row.append(_fmt(first["calls_per_run"]))
            for b in backends:
                s = rep["backends"][b]["tasks"][task]["stages_ms"].get(k)
                row.append(f"{_fmt(s['median'])} ({_fmt(s['p90'])})" if s else "-")
            for p in pairs:
                r = rep["ratios"][p].get(task, {}).get("stages", {}).get(k)
                row.append(_fmt(r) if r is not None else "-")
            L.append("| " + " | ".join(row) + " |")
        e2e = [m for m in METRIC_UNITS if any(m in rep["backends"][b]["tasks"][task]["end_to_end"] for b in backends)]
        for m in e2e:
            row = [f"**{METRIC_LABELS.get(m, m)}** ({METRIC_UNITS[m]})", ""]
            for b in backends:
                s = rep["backends"][b]["tasks"][task]["end_to_end"].get(m)
                row.append(f"**{_fmt(s['median'])}** ({_fmt(s['p90'])})" if s else "-")
            for p in pairs:
                r = rep["ratios"][p].get(task, {}).get("end_to_end", {}).get(m)
                row.append(f"**{_fmt(r)}**" if r is not None else "-")
            L.append("| " + " | ".join(row) + " |")

    L += ["", "## Peak memory", "", "| backend | host peak RSS | GPU |", "|---|---|---|"]
    for b in backends:
        mem = rep["backends"][b]["memory"]
        h, g = mem["host_peak_rss"], mem["gpu"]
        hs = f"unavailable ({h.get('reason')})"
        if "bytes" in h:
            base = f", {_gib(h['baseline_bytes'])} before loading" if h.get("baseline_bytes") else ""
            hs = f"{_gib(h['bytes'])} ({h['source']}{base})"
        gs = f"{_gib(g['bytes'])} ({g['source']})" if "bytes" in g else f"unavailable ({g.get('reason')})"
        L.append(f"| {b} | {hs} | {gs} |")

    pp = rep.get("process_peak_rss") or {}
    if "bytes" in pp:
        L += ["", f"Peak RSS of the whole benchmark process: {_gib(pp['bytes'])} ({pp['source']})."]
    L += ["", "## Energy", "", "| backend | task | J/image | J/token | average power | peak power | source |",
          "|---|---|---|---|---|---|---|"]
    notes: List[str] = []
    for b in backends:
        for task, t in rep["backends"][b]["tasks"].items():
            e = t["energy"]
            if e.get("status") == "ok":
                L.append(f"| {b} | {task} | {_fmt(e.get('joules_per_image'))} | {_fmt(e.get('joules_per_token'))} | "
                         f"{_fmt(e['avg_power_w'])} W | {_fmt(e.get('peak_power_w'))} W | {e['source']} |")
                note = f"{e['source']}: {e['detail']}"
            else:
                L.append(f"| {b} | {task} | unavailable | unavailable | unavailable | unavailable | {e['status']} |")
                note = e.get("reason", "")
            if note and note not in notes:
                notes.append(note)
    L += [""] + [f"- {n}" for n in notes]
    L += ["", "Energy is measured over the timed runs of a task (Python overhead included) and divided by the "
              "images or tokens they produced; average power = joules / wall time. \"unavailable\" means no "
              "counter could be read: no figure is estimated."]
    L += ["", f"![stage breakdown]({FILES['stages_png']})", "", f"![backends side by side]({FILES['backends_png']})", ""]
    return "\n".join(L)


# ================================================================================================ csv

def csv_rows(rep: dict) -> List[List[object]]:
    rows: List[List[object]] = [["backend", "task", "section", "metric", "unit", "median", "p90", "mean", "min", "n",
                                 "date", "cpu_model", "gpu"]]
    m = rep["machine"]
    tail = [rep["date"], m["cpu_model"], "; ".join(g["name"] for g in m.get("gpus") or []) or "none"]
    for b, br in rep["backends"].items():
        for task, t in br["tasks"].items():
            for k, s in t["stages_ms"].items():
                rows.append([b, task, "stage_per_call", k, "ms", s["median"], s["p90"], s["mean"], s["min"], s["n"]] + tail)
            for k, s in t["stage_totals_ms"].items():
                rows.append([b, task, "stage_per_run", k, "ms", s["median"], s["p90"], s["mean"], s["min"], s["n"]] + tail)
            for k, s in t["end_to_end"].items():
                rows.append([b, task, "end_to_end", k, s["unit"], s["median"], s["p90"], s["mean"], s["min"], s["n"]] + tail)
            e = t["energy"]
            for k, unit in (("joules_per_image", "J"), ("joules_per_token", "J"), ("avg_power_w", "W"),
                            ("peak_power_w", "W")):
                if e.get("status") == "ok" and k in e:
                    rows.append([b, task, "energy", k, unit, e[k], "", "", "", 1] + tail)
                elif e.get("status") != "ok":
                    rows.append([b, task, "energy", k, unit, "unavailable", "", "", "", 0] + tail)
        for kind, mem in (("host_peak_rss", br["memory"]["host_peak_rss"]), ("gpu_peak", br["memory"]["gpu"])):
            rows.append([b, "", "memory", kind, "bytes", mem.get("bytes", "unavailable"), "", "", "", 1] + tail)
    for pair, tasks in rep.get("ratios", {}).items():
        for task, r in tasks.items():
            for k, v in r["stages"].items():
                rows.append([pair, task, "ratio_stage", k, "x", v, "", "", "", 1] + tail)
            for k, v in r["end_to_end"].items():
                rows.append([pair, task, "ratio_end_to_end", k, "x", v, "", "", "", 1] + tail)
    return rows


# ================================================================================================ plots

def plots(rep: dict, out: Path) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(rep["backends"])
    tasks = [t for t in rep["settings"]["tasks"] if all(t in rep["backends"][b]["tasks"] for b in backends)]
    title = f"cheers-deploy bench {rep['date'][:10]}: {rep['machine']['cpu_model']}"
    gpus = ", ".join(g["name"] for g in rep["machine"].get("gpus") or [])
    if gpus:
        title += f" + {gpus}"
    written = {}
    colors = plt.get_cmap("tab10").colors

    # 1. stage breakdown of one run per backend (stacked, medians of per-run stage totals)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 1.6 + 1.1 * len(backends) * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        stages = [k for k in STAGE_LABELS if any(k in rep["backends"][b]["tasks"][task]["stage_totals_ms"]
                                                 for b in backends)]
        for yi, b in enumerate(backends):
            left = 0.0
            tot = rep["backends"][b]["tasks"][task]["stage_totals_ms"]
            for si, k in enumerate(stages):
                w = tot.get(k, {}).get("median", 0.0)
                ax.barh(yi, w, left=left, color=colors[si % len(colors)],
                        label=STAGE_LABELS.get(k, k) if yi == 0 else None)
                left += w
        ax.set_yticks(range(len(backends)), backends)
        ax.set_xlabel("ms per run (median of per-run stage totals)")
        ax.set_title(TASK_TITLES.get(task, task), fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / FILES["stages_png"]
    _save_figure(fig, p)
    written["stages_png"] = str(p)

    # 2. per-call stage latency and end-to-end, backends side by side (log scale, p90 as error bar)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, task in zip(axes[:, 0], tasks):
        keys = [("s", k) for k in STAGE_LABELS
                if any(k in rep["backends"][b]["tasks"][task]["stages_ms"] for b in backends)]
        keys += [("e", m) for m in METRIC_UNITS if METRIC_UNITS[m] == "ms"
                 and any(m in rep["backends"][b]["tasks"][task]["end_to_end"] for b in backends)]
        for bi, b in enumerate(backends):
            t = rep["backends"][b]["tasks"][task]
            med, err = [], []
            for kind, k in keys:
                s = (t["stages_ms"] if kind == "s" else t["end_to_end"]).get(k)
                med.append(s["median"] if s else 0.0)
                err.append(max(0.0, s["p90"] - s["median"]) if s else 0.0)
            xs = [i + (bi - (len(backends) - 1) / 2) * width for i in range(len(keys))]
            ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=2, label=b, color=colors[bi % len(colors)])
        ax.set_xticks(range(len(keys)), [(STAGE_LABELS.get(k, k) if kind == "s" else METRIC_LABELS.get(k, k))
                                         .replace(" (backbone over M image tokens)", "") for kind, k in keys],
                      rotation=25, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median, bar to p90)")
        ax.set_title(TASK_TITLES.get(task, task), fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = out / FILES["backends_png"]
    _save_figure(fig, p)
    written["backends_png"] = str(p)
    return written


def _save_figure(fig, path: Path) -> None:
    """PNG through fileio.atomic_path (never a half-written plot); the figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


# ================================================================================================ all

def write_report(rep: dict, out_dir) -> Dict[str, str]:
    """Write every file into out_dir (created); returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    p = out / FILES["json"]
    atomic_write_text(p, json.dumps(json_safe(rep), indent=2) + "\n")
    paths["json"] = str(p)
    p = out / FILES["csv"]
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(csv_rows(rep))
    atomic_write_text(p, buf.getvalue())
    paths["csv"] = str(p)
    p = out / FILES["md"]
    atomic_write_text(p, markdown(rep))
    paths["md"] = str(p)
    try:
        paths.update(plots(rep, out))
    except ImportError as exc:             # matplotlib is optional: the tables are the report
        paths["plots"] = f"skipped ({exc})"
    return paths
