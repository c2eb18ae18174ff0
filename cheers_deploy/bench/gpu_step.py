"""Latency of text to image on one device, driven through the product: `Pipeline.generate` on the torch backend with
one fast-path option more per row, the official naive loop as the baseline (a compact reimplementation), and the
analytic floor (floor.py). Random weights are built on the device; nothing in the package is patched.

    naive ─► eager ─► +static_cache ─► +batched_cfg ─► +device_rope ─► +cuda_graphs ─► +compile ─► +fused_gate
    compile_ro: torch.compile(mode="reduce-overhead") (inductor's own CUDA graphs) instead of ours, budget allowing

    python -m cheers_deploy.bench.gpu_step --preset cheers-official --resolution 512 --steps 80 --out FILE --budget-s S

Per row: the first generate (2 steps; graph capture and compilation happen here, `TorchBackend.warmup_s`), one timed
image (wall time of generate; per Euler step from CUDA events an observer records, no syncs added), a short
decode (tokens/s), peak GPU memory, the final latent against the eager row's (same noise) and, with --energy,
joules per image (bench/energy.py). The JSON is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..config import CheersConfig
from ..fileio import write_json
from ..runtime.observer import PipelineObserver
from . import energy
from . import floor as floor_mod
from .naive import naive_generate
from .reproducibility import reproducibility

LADDER = [  # (name, what it adds, settings; each row keeps the settings of the rows above it)
    ("naive", "official loop: CFG branches as separate passes (vision tower per branch), KV cache appended with "
              "torch.cat and cropped, RoPE tables built on the host, eager", {}),
    ("eager", "Pipeline.generate, torch backend with every option off: past K/V concatenated inside attention, "
              "CFG branches one after the other (split_batch), host RoPE tables",
     dict(static_cache=False, split_batch=True, rope_cache=False, cuda_graphs=False, compile=None, fused_gate=False)),
    ("+static_cache", "the LM writes K/V into the static cache in place and attends over it (no torch.cat)",
     dict(static_cache=True)),
    ("+batched_cfg", "backbone and head at batch 2 (both CFG branches at once)", dict(split_batch=False)),
    ("+device_rope", "RoPE tables cached on the device: no host-to-device copy (a stream sync) per call",
     dict(rope_cache=True)),
    ("+cuda_graphs", "vision tokenizer, image step, CFM head and decode replayed as CUDA graphs",
     dict(cuda_graphs=True)),
    ("+compile", "torch.compile(mode='default') of the same stages, inside the CUDA graphs", dict(compile="default")),
    ("+fused_gate", "hi gate as one Triton kernel (CUDA; the plain ops elsewhere)", dict(fused_gate=True)),
    ("compile_ro", "torch.compile(mode='reduce-overhead'): inductor's own CUDA graphs instead of ours",
     dict(cuda_graphs=False, compile="reduce-overhead", fused_gate=False)),
]
NAMES = [n for n, _, _ in LADDER]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROMPTS = {"official": "A red apple on a table.", "shapes": "a red circle on the left"}


def build_model(cfg: CheersConfig, device, dtype, seed: int = 0):
    """CheersModel built on `meta`, materialised on `device` in `dtype` (no host copy) with random weights that keep
    activations O(1): Linear/Conv weights N(0, 1/fan_in), biases N(0, 0.02), norm weights ~1, BatchNorm stats."""
    import torch
    import torch.nn as nn
    from ..model import CheersModel
    from ..model.layers import RMSNorm

    with torch.device("meta"):
        model = CheersModel(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()                                        # to_empty unties lm_head (§17.23)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
                    p.normal_(1.0 if name == "weight" else 0.0, 0.05 if name == "weight" else 0.02, generator=g)
                elif isinstance(mod, (nn.Linear, nn.Conv2d)) and name == "weight":
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            else:
                b.normal_(0.0, 0.1, generator=g) if name.endswith("running_mean") else b.zero_()
    return model.eval()


def processor_for(cfg: CheersConfig, resolution: int):
    """(processor, prompt): the official tokenizer (tests/data/official-tiny, in every clone) for a full vocabulary,
    else the bundled tiny-shapes one."""
    from ..hub import bundled_checkpoint
    from ..processor import Processor
    from ..testing import OFFICIAL_VOCAB_SIZE, reference_dir

    official = cfg.text_config.vocab_size >= OFFICIAL_VOCAB_SIZE and (reference_dir() / "vocab.json").is_file()
    src = reference_dir() if official else bundled_checkpoint()
    return Processor.from_dir(src, resolution=resolution), PROMPTS["official" if official else "shapes"]


class StepClock(PipelineObserver):
    """A timestamp after every Euler step (a CUDA event on a GPU: recorded, never waited on) and after every sampled
    token (host time: sampling already waited for the logits)."""

    def __init__(self, cuda: bool):
        import torch
        self.torch, self.cuda, self.steps, self.tokens = torch, cuda, [], []

    def on_step(self, step, num_steps, t, latent):
        self.steps.append(self.torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter())
        if self.cuda:
            self.steps[-1].record()

    def on_token(self, index, token_id, logits):
        self.tokens.append(time.perf_counter())

    def step_ms(self) -> List[float]:
        if self.cuda:
            self.torch.cuda.synchronize()
        return [a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in zip(self.steps, self.steps[1:])]


def stats(ms) -> Dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    return {} if not a.size else {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
                                  "min": float(a.min()), "n": int(a.size)}


def run_row(ctx, name: str, state: Dict) -> Dict:
    """One row: build the backend the settings ask for, warm up, time an image and a short decode."""
    torch = ctx["torch"]
    from ..runtime.pipeline import Pipeline
    from ..runtime.torch_backend import TorchBackend

    model, dev, a = ctx["model"], ctx["device"], ctx["args"]
    cuda = dev.type == "cuda"
    r: Dict = {"settings": dict(state)}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    gen = dict(steps=a.steps, cfg_scale=a.cfg_scale, alpha=a.alpha, seed=a.seed, noise=ctx["noise"],
               max_new_tokens=1, temperature=0.0)
    clock = StepClock(cuda)
    if name == "naive":
        naive = lambda steps, c: naive_generate(model, ctx["proc"], ctx["prompt"], ctx["noise"], steps,  # noqa: E731
                                                a.cfg_scale, a.alpha, a.seed, c)
        t0 = time.perf_counter()
        naive(2, StepClock(cuda))                                          # warm-up: lazy CUDA / cuDNN init
        r["first_call_s"] = time.perf_counter() - t0
        ctx["sampler"].start()
        t0 = time.perf_counter()
        latent, _ = naive(a.steps, clock)
        r["image_s"], joules = time.perf_counter() - t0, ctx["sampler"].stop()
        r["energy_per_image"] = energy.energy_figures(ctx["sampler"], joules, ctx["sampler"].elapsed_s)
        be = None
    else:
        model.set_options(attn_impl="sdpa", rope_cache=state["rope_cache"], fused_gate=state["fused_gate"])
        if state["compile"] is not None:
            torch._dynamo.reset()                          # in-memory only: inductor's disk cache stays
        be = TorchBackend(model, device=str(dev), dtype=DTYPES[a.dtype], static_cache=state["static_cache"],
                          cuda_graphs=state["cuda_graphs"], compile=state["compile"], split_batch=state["split_batch"],
                          _compile_backend=a.compile_backend)
        pipe = Pipeline(be, ctx["proc"].tokenizer, ctx["proc"], ctx["cfg"], timings=False)
        t0 = time.perf_counter()
        pipe.generate(ctx["prompt"], **dict(gen, steps=2))
        r["first_call_s"] = time.perf_counter() - t0
        ctx["sampler"].start()
        t0 = time.perf_counter()
        out = pipe.generate(ctx["prompt"], observer=clock, **gen)      # ends with host copies: synchronised
        r["image_s"], joules = time.perf_counter() - t0, ctx["sampler"].stop()
        r["energy_per_image"] = energy.energy_figures(ctx["sampler"], joules, ctx["sampler"].elapsed_s)
        latent = out.latent
        sp, tok = pipe.special, StepClock(False)
        chat = dict(temperature=0.0, suppress_tokens=(sp.chat_end, sp.img_start, sp.img_end))
        pipe.chat(ctx["prompt"], max_new_tokens=3, **chat)                 # warm-up of the batch-1 decode shapes
        res = pipe.chat(ctx["prompt"], max_new_tokens=a.decode_tokens, observer=tok, **chat)
        if len(tok.tokens) > 2:       # on_token comes after each sampling; between two: one decode step
            r.update(decode_tokens=len(res.token_ids),
                     decode_tokens_per_s=(len(tok.tokens) - 1) / (tok.tokens[-1] - tok.tokens[0]))
        if ctx["sampler"].available:      # chat calls (prefill + decode) for at least --energy-min-s, per token out
            tokens = []
            ctx["sampler"].start()
            t_end = time.perf_counter() + a.energy_min_s
            while not tokens or time.perf_counter() < t_end:
                tokens.append(len(pipe.chat(ctx["prompt"], max_new_tokens=a.decode_tokens, **chat).token_ids))
            j = ctx["sampler"].stop()
            r["energy_per_token"] = dict(energy.energy_figures(ctx["sampler"], j, ctx["sampler"].elapsed_s,
                                                               sum(tokens)), chat_calls=len(tokens))
        else:
            r["energy_per_token"] = energy.energy_figures(ctx["sampler"], None, None)
        r.update(warmup_s=be.warmup_s, captures=be.captures, replays=be.replays)
    r.update(per_step_ms=stats(clock.step_ms()), latent_finite=bool(np.isfinite(latent).all()))
    if cuda:
        r["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30     # weights included
    if be is not None:
        be.close()
    return r, latent


def compare(latent, ref) -> Dict[str, float]:
    d = float(np.abs(latent - ref).max())
    return {"max_abs": d, "rel": d / max(float(np.abs(ref).max()), 1e-30)}


def energy_headline(rows: Dict) -> Dict:
    """J/image of the fastest product row against the official loop (naive), and J/token against the eager row
    (the official decode: concatenated K/V, host RoPE); baseline / product > 1 means the product spends less."""
    ok = {n: r for n, r in rows.items() if r.get("status") == "ok" and n != "naive" and r.get("image_s")}
    if not ok:
        return {"status": "unavailable", "reason": "no product row ran"}
    best = min(ok, key=lambda n: ok[n]["image_s"])
    out: Dict = {"product": best}
    for unit, key, base in (("image", "energy_per_image", "naive"), ("token", "energy_per_token", "eager")):
        p, b = ok[best].get(key, {}), rows.get(base, {}).get(key, {})
        if p.get("status") == "ok" and b.get("status") == "ok":
            out[unit] = {"baseline": base, "baseline_j": b["joules_per_unit"], "product_j": p["joules_per_unit"],
                         "baseline_over_product": b["joules_per_unit"] / p["joules_per_unit"],
                         "product_avg_w": p["avg_power_w"], "product_peak_w": p["peak_power_w"],
                         "baseline_avg_w": b["avg_power_w"], "baseline_peak_w": b["peak_power_w"]}
        else:
            out[unit] = {"status": "unavailable", "reason": (p.get("reason") or b.get("reason")
                                                              or f"{base} or {best} has no {key}")}
    return out


def markdown(d: Dict) -> str:
    fl = d.get("floor", {})
    rows = ["| variant | status | step median ms | image s | first call s | warm-up s | decode tok/s | peak GiB | "
            "J/image | step / floor | speed-up vs naive (image) |", "|---" * 11 + "|"]
    naive = d["variants"].get("naive", {}).get("image_s")
    f = lambda v, spec=".2f": "-" if not isinstance(v, (int, float)) else format(v, spec)  # noqa: E731
    for name, r in d["variants"].items():
        med = r.get("per_step_ms", {}).get("median")
        ratio = med / fl["step_floor_ms"] if med and fl.get("step_floor_ms") else None
        sp = naive / r["image_s"] if naive and r.get("image_s") else None
        cells = [f(med), f(r.get("image_s"), ".3f"), f(r.get("first_call_s")), f(r.get("warmup_s")),
                 f(r.get("decode_tokens_per_s"), ".1f"), f(r.get("peak_gpu_mem_gib")),
                 f(r.get("energy_per_image", {}).get("joules"), ".1f"), f(ratio), f(sp)]
        rows.append(f"| {name} | {r['status']} | " + " | ".join(cells) + " |")
    if fl.get("step_floor_ms"):
        rows.append(f"| floor | analytic | {fl['step_floor_ms']:.2f} | {fl['image_floor_s']:.3f} | | | | | | 1.00 | |")
    h = d.get("energy_headline", {})
    for unit in ("image", "token"):
        e = h.get(unit, {})
        rows.append(f"\nJ/{unit}: {h.get('product')} {e['product_j']:.4g} J (avg {e['product_avg_w']:.0f} W, peak "
                    f"{f(e['product_peak_w'], '.0f')} W) vs {e['baseline']} {e['baseline_j']:.4g} J: "
                    f"{e['baseline_over_product']:.2f}x less energy" if "product_j" in e else
                    f"\nJ/{unit}: {e.get('reason', 'not measured')}")
    return "\n".join(rows)


def ladder(ctx, d: Dict, left, save, log) -> None:
    """The rows in order, each adding its settings to the ones above; a row that fails is recorded, not fatal."""
    a, cuda, latents, state, last_s = ctx["args"], ctx["device"].type == "cuda", {}, {}, 0.0
    selected = NAMES if a.variants == "all" else [v.strip() for v in a.variants.split(",")]
    for name, what, settings in LADDER:
        state.update(settings)
        r = {"description": what}
        need = (a.compile_reserve_s if cuda and state.get("compile") and name != "naive" else 0.0) + 2 * last_s
        if name not in selected and name != "eager":          # eager always runs: the reference of the latents
            r.update(status="not measured", reason="not in --variants")
        elif name != "eager" and left() < need:
            r.update(status="skipped", reason=f"budget: {left():.0f} s left, about {need:.0f} s needed")
        elif state.get("cuda_graphs") and not cuda:
            r.update(status="skipped", reason="CUDA graphs need a CUDA device")
        else:
            t0 = time.perf_counter()
            try:
                res, latents[name] = run_row(ctx, name, state)
                r.update(res, status="ok")
                for other, x in latents.items():    # naive ran before the reference existed
                    if "eager" in latents and other != "eager":
                        (r if other == name else d["variants"][other])["latent_vs_eager"] = compare(x, latents["eager"])
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                r.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1000])
                d["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:300])
                if cuda:
                    ctx["torch"].cuda.empty_cache()
            last_s = time.perf_counter() - t0
            log(f"{name:14s} {r['status']:6s} step {r.get('per_step_ms', {}).get('median', float('nan')):8.2f} ms  "
                f"image {r.get('image_s', float('nan')):7.3f} s")
            if name not in selected:
                r["note"] = "not in --variants: run as the reference of latent_vs_eager"
        d["variants"][name] = r
        save()


def run(args) -> Dict:
    import torch
    from .environment import library_versions, machine_info

    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    cfg = CheersConfig.from_name(args.preset)
    out = Path(args.out) if args.out else None
    d: Dict = {"schema": "cheers-gpu-step/2", "date": _dt.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, "-m", "cheers_deploy.bench.gpu_step"] + sys.argv[1:]),
               "complete": False, "machine": machine_info(), "versions": library_versions(),
               "reproducibility": {"at_start": reproducibility()},
               "device": {"type": dev.type, "torch": torch.__version__, "cuda": torch.version.cuda,
                          "python": platform.python_version()}, "variants": {}, "errors": []}
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        d["device"].update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2 ** 30,
                           cudnn=torch.backends.cudnn.version())
    save = lambda: out is not None and (out.parent.mkdir(parents=True, exist_ok=True), write_json(out, d))  # noqa: E731
    log = (lambda *x: None) if args.quiet else (lambda *x: print("[gpu_step]", *x, flush=True))
    dtype = getattr(torch, DTYPES[args.dtype])
    with torch.no_grad():
        t0 = time.perf_counter()
        model = build_model(cfg, dev, dtype, args.seed)
        proc, prompt = processor_for(cfg, args.resolution)
        c, g = cfg.latent_channels, proc.latent_grid
        noise = np.random.default_rng(args.seed).standard_normal((c, g, g), dtype=np.float32)
        prefix = proc.tokens_per_image + len(proc.t2i_ids(prompt))          # dummy image block + prompt ids
        d["config"] = {"preset": args.preset, "resolution": args.resolution, "steps": args.steps, "dtype": args.dtype,
                       "cfg_scale": args.cfg_scale, "alpha": args.alpha, "seed": args.seed, "prompt": prompt,
                       "prefix_len": prefix, "llm_tokens_per_image": proc.tokens_per_image, "latent": [c, g, g],
                       "budget_s": args.budget_s, "build_s": time.perf_counter() - t0,
                       "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
        dm = floor_mod.measure_device(torch, dev, dtype)
        fl = floor_mod.step_floor(cfg, args.resolution, prefix, args.steps, dm["matmul_tflops"], dm["copy_gbps"])
        fl["step_floor_ms"] = fl["step"]["floor_s"] * 1e3
        d["device_measured"], d["floor"] = dm, fl
        sampler = energy.discover(args.device) if args.energy else energy.UnavailableSampler("--energy not given")
        d["energy"] = sampler.describe()
        save()
        log(f"{d['device'].get('name', 'cpu')} {args.preset} {args.resolution}px {args.steps} steps, prefix {prefix}, "
            f"floor {fl['step_floor_ms']:.2f} ms/step")
        ctx = dict(torch=torch, model=model, device=dev, args=args, proc=proc, prompt=prompt, noise=noise, cfg=cfg,
                   sampler=sampler)
        ladder(ctx, d, left, save, log)
    model.set_options(attn_impl="sdpa", rope_cache=True, fused_gate=False)
    sampler.close()
    d["reproducibility"]["at_end"] = reproducibility()          # clocks right after the timed rows
    d["energy_headline"] = energy_headline(d["variants"])
    d["elapsed_s"], d["complete"] = time.perf_counter() - t_start, True
    d["markdown"] = markdown(d)
    save()
    log("\n" + d["markdown"])
    return d


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cheers_deploy.bench.gpu_step", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cheers-official")
    p.add_argument("--resolution", type=int, default=None, help="default: the preset's image_size")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--out", default=None, help="JSON file (default bench/results/gpu_step_<date>.json)")
    p.add_argument("--budget-s", type=float, default=300.0, help="rows that would not fit are skipped")
    p.add_argument("--energy", action="store_true", help="joules per image and per token (NVML on a GPU, RAPL on a "
                   "CPU), average and peak power")
    p.add_argument("--energy-min-s", type=float, default=2.0, help="J/token: repeat chat calls for this long")
    p.add_argument("--compile-reserve-s", type=float, default=150.0, help="a compiling row needs this budget left")
    p.add_argument("--variants", default="all", help="comma list of " + ",".join(NAMES))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--cfg-scale", type=float, default=9.5)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)    # tests: 'eager'
    a = p.parse_args(argv)
    import torch
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    a.resolution = a.resolution or CheersConfig.from_name(a.preset).vision_representation_config.image_size
    if a.out is None:
        a.out = str(Path(__file__).resolve().parents[2] / "bench" / "results" / f"gpu_step_{_dt.date.today()}.json")
    if a.variants != "all" and set(v.strip() for v in a.variants.split(",")) - set(NAMES):
        p.error(f"unknown variants in {a.variants!r}; choose from {', '.join(NAMES)}")
    return a


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
