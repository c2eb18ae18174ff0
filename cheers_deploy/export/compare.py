"""Measurements behind docs/export.md: torch vs ONNX Runtime per image and per Euler step, and the KV cache
layout comparison (concatenated cache vs static buffer vs in-graph scatter) on the backbone graph.

    python -m cheers_deploy.export.compare speed  --checkpoint CKPT --workdir WD --steps 8 --runs 3
    python -m cheers_deploy.export.compare layout --checkpoint CKPT --out /tmp/layouts
    python -m cheers_deploy.export.compare official --out /tmp/official --graphs cfm_head,backbone
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

PROMPT = "A green triangle next to a blue square."


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------------ torch vs ORT

def _time_generate(pipes: Dict[str, object], steps: int, runs: int, cfg_scale: float,
                   warmup: int = 1) -> Dict[str, dict]:
    """Alternate the backends run by run (a shared machine's load then slows both alike); median of `runs`
    after `warmup` runs each. Per step = time between the first and last Euler step callbacks / (N-1)."""
    times = {k: {"image": [], "step": [], "stages": None} for k in pipes}
    for r in range(runs + warmup):
        for name, pipe in pipes.items():
            stamps = []
            t0 = time.perf_counter()
            out = pipe.generate(PROMPT, steps=steps, cfg_scale=cfg_scale, alpha=0.6, seed=r, max_new_tokens=1,
                                progress=lambda i, n: stamps.append(time.perf_counter()))
            total = time.perf_counter() - t0
            if r >= warmup:
                times[name]["image"].append(total)
                times[name]["step"].append((stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1))
                times[name]["stages"] = {k: round(v["mean_ms"], 2) for k, v in out.timings.items()}
    return {k: {"per_image_s": statistics.median(v["image"]), "per_step_s": statistics.median(v["step"]),
                "stage_mean_ms": v["stages"]} for k, v in times.items()}


def torch_vs_ort(checkpoint=None, workdir="work/tiny", steps: int = 8, runs: int = 3, cfg_scale: float = 3.0,
                 threads: Optional[int] = None, warmup: int = 1, quiet: bool = False) -> dict:
    """Time `generate` (T2I with CFG, batch 2) on the torch reference backend and on onnxruntime (CPU) in the
    same process, and print both and their ratio. Returns the figures."""
    from ..runtime.pipeline import Pipeline

    if threads:
        import torch

        torch.set_num_threads(threads)                 # same thread budget for both backends
    pipes = {"torch": Pipeline.from_pretrained(checkpoint), "ort": Pipeline.from_workdir(workdir, threads=threads)}
    res = _time_generate(pipes, steps, runs, cfg_scale, warmup)
    res["speedup_per_image"] = res["torch"]["per_image_s"] / res["ort"]["per_image_s"]
    res["speedup_per_step"] = res["torch"]["per_step_s"] / res["ort"]["per_step_s"]
    res.update(steps=steps, runs=runs, threads=threads or "default", machine=_machine(),
               date=time.strftime("%Y-%m-%d"))
    if not quiet:
        print(f"{'backend':8s} {'per image':>12s} {'per step':>12s}   ({steps} steps, CFG, median of {runs}, "
              f"threads {res['threads']}, {res['machine']})")
        for k in ("torch", "ort"):
            print(f"{k:8s} {1e3 * res[k]['per_image_s']:10.1f}ms {1e3 * res[k]['per_step_s']:10.2f}ms   "
                  f"stages(ms): {res[k]['stage_mean_ms']}")
        print(f"torch/ort {res['speedup_per_image']:10.2f}x  {res['speedup_per_step']:10.2f}x")
    return res


# ------------------------------------------------------------------------------------------------ KV layouts

def _layout_wrappers():
    """Backbone variants for the layout comparison (benchmark only; the shipped graph is wrappers.BackboneGraph)."""
    import torch
    import torch.nn as nn

    from ..model.layers import apply_rope, masked_attention, rope_cos_sin, rope_inv_freq
    from .wrappers import BackboneGraph

    class ConcatBackbone(BackboneGraph):
        """(a) Hugging Face style: past = exactly the P cached positions, present = concat(past, new)."""

        def forward(self, inputs_embeds, position_ids, attention_mask, *past):
            out = super().forward(inputs_embeds, position_ids, attention_mask, *past)
            new = out[2:]
            return out[:2] + tuple(torch.cat([p, n], dim=2) for p, n in zip(past, new))

    class ScatterBackbone(nn.Module):
        """(b') static buffer written inside the graph: present = past with the new entries scattered at
        position_ids (ScatterND), attention over the Tmax slots of the updated buffer; mask (B,1,S,Tmax)."""

        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, inputs_embeds, position_ids, attention_mask, *past):
            lm = self.m.model.language_model
            cfg = lm.cfg
            x = inputs_embeds
            b, s, _ = x.shape
            cos, sin = rope_cos_sin(position_ids, rope_inv_freq(cfg.head_dim, cfg.rope_theta, x.dtype), x.dtype)
            idx = position_ids[0]                                                  # (S,) same for the batch
            present = []
            for i, layer in enumerate(lm.layers):
                at = layer.self_attn
                h = layer.input_layernorm(x)
                # (B,S,H*Dh) -> (B,H,S,Dh)
                q = at.q_proj(h).reshape(b, s, at.heads, at.head_dim).transpose(1, 2)
                k = at.k_proj(h).reshape(b, s, at.kv_heads, at.head_dim).transpose(1, 2)
                v = at.v_proj(h).reshape(b, s, at.kv_heads, at.head_dim).transpose(1, 2)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                kc = past[2 * i].index_copy(2, idx, k)                             # (B,Hkv,Tmax,Dh)
                vc = past[2 * i + 1].index_copy(2, idx, v)
                a = masked_attention(q, kc, vc, attention_mask)
                x = x + at.o_proj(a.transpose(1, 2).reshape(b, s, -1))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                present += [kc, vc]
            hidden = lm.norm(x)
            return (hidden, self.m.logits(hidden[:, -1])) + tuple(present)

    return ConcatBackbone, ScatterBackbone


def _export_variant(wrapper, spec, args, path: Path, present_axis: str):
    import torch

    from .wrappers import export_settings

    axes = spec.dynamic_axes()
    if present_axis:
        for n in spec.output_names[2:]:
            axes[n] = {0: "batch", 2: present_axis}
    with torch.no_grad(), export_settings(wrapper.m, 18):
        torch.onnx.export(wrapper, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=axes, opset_version=18, dynamo=False)


def kv_layout_benchmark(checkpoint=None, out_dir="/tmp/cheers-kv-layouts", max_contexts: Sequence[int] = (128, 512, 2048),
                        prompt_len: int = 40, runs: int = 30, threads: int = 1, quiet: bool = False) -> dict:
    """Per-call time (ms, best of `runs`) of prefill / decode / image step (CFG batch 2) with the three cache layouts,
    bookkeeping included (what the runtime must copy or write around each call)."""
    import onnxruntime as ort
    import torch

    from ..checkpoint import load_config
    from ..hub import resolve_checkpoint
    from ..processor import Processor
    from .exporter import load_submodules, meta_model
    from .specs import BackboneSpec

    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config(ckpt)
    res = Processor.from_dir(ckpt, default_resolution=cfg.vision_representation_config.image_size).resolution
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = meta_model(cfg)
    load_submodules(model, ckpt, ("model.language_model",))
    Concat, Scatter = _layout_wrappers()
    from .wrappers import BackboneGraph

    t = cfg.text_config
    spec = BackboneSpec(cfg, res, 2, max(max_contexts))
    m = spec.tokens_per_image
    names = spec.input_names
    paths = {"concat": out / "concat.onnx", "static": out / "static.onnx", "scatter": out / "scatter.onnx"}
    _export_variant(Concat(model).eval(), spec, spec.sample_inputs(), paths["concat"], "total")
    _export_variant(BackboneGraph(model).eval(), spec, spec.sample_inputs(), paths["static"], "")
    sc_args = list(spec.sample_inputs(seq=7, past=11, start=2))
    sc_args[2] = sc_args[2][..., :11]                       # scatter graph: mask over the Tmax slots only
    _export_variant(Scatter(model).eval(), spec, tuple(sc_args), paths["scatter"], "past")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads                   # 1 by default: steadier figures on a shared machine
    sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    rng = np.random.default_rng(0)
    L, hkv, dh, d = t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.hidden_size

    def timed(fns: Dict[str, object]) -> Dict[str, float]:
        """Round-robin over the layouts (a shared, loaded machine slows them alike); best of `runs`."""
        ts: Dict[str, list] = {k: [] for k in fns}
        for _ in range(runs + 1):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
        return {k: 1e3 * min(v[1:]) for k, v in ts.items()}

    def feed(embeds, start, mask, past):
        b, s, _ = embeds.shape
        f = {names[0]: embeds, names[1]: np.ascontiguousarray(np.broadcast_to(np.arange(start, start + s), (b, s))),
             names[2]: mask}
        f.update({names[3 + j]: p for j, p in enumerate(past)})
        return f

    results: Dict[str, Dict[str, float]] = {}
    for n in max_contexts:
        for mode, b, s in (("prefill", 1, prompt_len), ("decode", 1, 1), ("image_step", 2, m)):
            start = 0 if mode == "prefill" else prompt_len
            embeds = rng.standard_normal((b, s, d), dtype=np.float32)
            row = results.setdefault(f"{mode} (B={b}, S={s}, ctx={n})", {})
            # (a) concat: exact prefix in, P+S out, the prefix arrays are the runtime's cache (no static buffer)
            prefix = [rng.standard_normal((b, hkv, start, dh), dtype=np.float32) for _ in range(2 * L)]
            mask_a = np.ones((b, 1, s, start + s), bool)

            def run_concat():
                outs = sess["concat"].run(None, feed(embeds, start, mask_a, prefix))
                return outs[2:]                          # becomes the next past (decode) / dropped (image step)

            # (b) static buffer, new entries only, written by position (the shipped layout)
            buf = [np.zeros((b, hkv, n, dh), np.float32) for _ in range(2 * L)]
            mask_b = np.zeros((b, 1, s, n + s), bool)
            mask_b[..., :start] = True
            mask_b[..., n:] = True

            def run_static():
                outs = sess["static"].run(None, feed(embeds, start, mask_b, buf))
                for j in range(2 * L):
                    buf[j][:, :, start:start + s] = outs[2 + j]

            # (b') scatter in the graph: full buffers out, ping-pong between two preallocated buffer sets
            bufs = [[np.zeros((b, hkv, n, dh), np.float32) for _ in range(2 * L)] for _ in range(2)]
            mask_c = np.zeros((b, 1, s, n), bool)
            mask_c[..., :start + s] = True
            binding = sess["scatter"].io_binding()
            state = {"cur": 0}

            def run_scatter():
                cur, nxt = bufs[state["cur"]], bufs[1 - state["cur"]]
                for k, v in feed(embeds, start, mask_c, cur).items():
                    binding.bind_cpu_input(k, np.ascontiguousarray(v))
                onames = [o.name for o in sess["scatter"].get_outputs()]
                for k in onames[:2]:
                    binding.bind_output(k, "cpu")
                for j, k in enumerate(onames[2:]):
                    binding.bind_ortvalue_output(k, ort.OrtValue.ortvalue_from_numpy(nxt[j]))
                sess["scatter"].run_with_iobinding(binding)
                binding.copy_outputs_to_cpu()
                state["cur"] = 1 - state["cur"]

            row.update(timed({"concat": run_concat, "static": run_static, "scatter": run_scatter}))
    report = {"results_ms": results, "machine": _machine(), "date": time.strftime("%Y-%m-%d"),
              "onnxruntime": ort.__version__, "threads": threads, "runs": runs,
              "model": {"layers": L, "hidden": d, "kv_heads": hkv, "head_dim": dh, "vocab": t.vocab_size,
                        "tokens_per_image": m}}
    if not quiet:
        print(f"per-call ms, best of {runs}, {threads} thread(s), {report['machine']}")
        print(f"{'call':42s} {'concat':>9s} {'static':>9s} {'scatter':>9s}")
        for k, r in results.items():
            print(f"{k:42s} {r['concat']:9.3f} {r['static']:9.3f} {r['scatter']:9.3f}")
    return report


# ------------------------------------------------------------------------------------------------ full size

def official_size_export(out_dir, graphs: Sequence[str] = ("cfm_head", "backbone"), preset: str = "cheers-official",
                         image_size: int = 512, max_context: int = 2048, verify: bool = True, seed: int = 0) -> dict:
    """Export graphs of the full-size model with random weights (meta -> empty -> random, one graph's
    submodules at a time) to measure time, file size and peak RAM of a real export without a checkpoint."""
    import resource

    from ..config import CheersConfig
    from ..testing import fill_random_
    from .exporter import export_graph, meta_model, release_submodules
    from .specs import graph_specs

    cfg = CheersConfig.from_name(preset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = graph_specs(cfg, image_size, 2, max_context, graphs)
    model = meta_model(cfg)
    report = {"preset": preset, "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "graphs": {}}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        for prefix in spec.modules:
            sub = model.get_submodule(prefix)
            sub.to_empty(device="cpu")
            fill_random_(sub, seed, prefix=prefix + ".")
        t_fill = time.perf_counter() - t0
        info = export_graph(spec, model, out, verify=verify,
                            release=lambda: release_submodules(model, spec.modules))
        files = [info["file"]] + ([info["external_data"]] if info.get("external_data") else [])
        report["graphs"][name] = {
            "fill_s": round(t_fill, 1), "export_s": info["export_s"], "trace_s": info["trace_s"],
            "files": {f: (out / f).stat().st_size for f in files}, "slim": info["slim"],
            "verify_max_rel_err": info.get("verify_max_rel_err"),
            "peak_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        print(json.dumps({name: report["graphs"][name]}), flush=True)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["speed", "layout", "official"])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--workdir", default="work/tiny")
    ap.add_argument("--out", default="/tmp/cheers-kv-layouts")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for both backends")
    ap.add_argument("--graphs", default="cfm_head,backbone", help="official: graphs to export")
    ap.add_argument("--no-verify", action="store_true", help="official: skip the ORT-vs-torch check")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    a = ap.parse_args(argv)
    if a.what == "speed":
        r = torch_vs_ort(a.checkpoint, a.workdir, a.steps, a.runs, threads=a.threads)
    elif a.what == "layout":
        r = kv_layout_benchmark(a.checkpoint, a.out)
    else:
        r = official_size_export(a.out, a.graphs.split(","), verify=not a.no_verify)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
