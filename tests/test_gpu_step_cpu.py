"""The GPU benchmark (cheers_deploy.bench.gpu_step), checked on the CPU with the tiny preset: it drives the product
(Pipeline.generate on the torch backend), every row that runs on a CPU gives the eager row's float32 latent within
1e-5 (the official naive loop included), the analytic floor counts the FLOPs torch's FlopCounterMode counts and the
parameters the model holds, and the CLI writes its JSON report. The CUDA rows run under `-m gpu`."""
import json
import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.bench import floor  # noqa: E402
from cheers_deploy.bench import gpu_step as gs  # noqa: E402
from cheers_deploy.bench import naive  # noqa: E402
from cheers_deploy.config import CheersConfig  # noqa: E402

PREFIX = 12
STEPS = 2
CPU_ROWS = ("naive", "eager", "+static_cache", "+batched_cfg", "+device_rope", "compile_ro")
CUDA_ROWS = ("+cuda_graphs", "+compile", "+fused_gate")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _run_cli(tmp_path, *extra):
    out = tmp_path / "gpu_step.json"
    # 32 px keeps the tiny decoder projector cheap (2x2 latent, 1 LLM token); compile through dynamo only (the real
    # inductor compile is tests/test_torch_fast_path.py's slow test)
    assert gs.main(["--preset", "tiny", "--resolution", "32", "--device", "cpu", "--steps", str(STEPS),
                    "--decode-tokens", "3", "--budget-s", "600", "--quiet", "--compile-backend", "eager",
                    "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_every_cpu_row_gives_the_eager_latent_and_the_report_is_complete(tmp_path):
    d = _run_cli(tmp_path)
    assert d["complete"] and not d["errors"], d["errors"]
    assert d["schema"] == "cheers-gpu-step/2" and d["date"] and "gpu_step" in d["command"]
    assert d["device"]["type"] == "cpu" and d["device"]["torch"] == torch.__version__ and d["versions"]["torch"]
    v = d["variants"]
    assert list(v) == gs.NAMES
    for name in CPU_ROWS:
        r = v[name]
        assert r["status"] == "ok", (name, r)
        assert r["per_step_ms"]["median"] > 0 and r["image_s"] > 0 and r["latent_finite"]
        if name != "eager":                       # the naive loop too: it equals the pipeline
            assert r["latent_vs_eager"]["rel"] <= 1e-5, (name, r["latent_vs_eager"])
    for name in CPU_ROWS[1:]:
        assert v[name]["decode_tokens_per_s"] > 0 and v[name]["first_call_s"] > 0
    assert v["compile_ro"]["warmup_s"] > 0 and v["compile_ro"]["settings"]["compile"] == "reduce-overhead"
    for name in CUDA_ROWS:
        assert v[name]["status"] == "skipped" and "CUDA" in v[name]["reason"]
    assert v["eager"]["settings"] == {"static_cache": False, "split_batch": True, "rope_cache": False,
                                      "cuda_graphs": False, "compile": None, "fused_gate": False}
    assert v["+device_rope"]["settings"]["static_cache"] and not v["+device_rope"]["settings"]["split_batch"]
    assert d["config"]["params"] == 29_052_519 and d["config"]["prefix_len"] > 0
    assert d["floor"]["step_floor_ms"] > 0 and math.isfinite(d["floor"]["image_floor_s"])
    assert "| naive | ok |" in d["markdown"] and "| floor | analytic |" in d["markdown"]
    assert d["energy"]["source"] is None


def test_energy_per_image_and_token_and_the_headline(tmp_path, monkeypatch):
    """--energy with a fake 100 W counter (this machine has none): J/image per row, J/token over repeated chat
    calls, the fastest product row against the naive loop (image) and the eager row (token); reproducibility."""
    from cheers_deploy.bench import energy

    class Fake100W(energy._CounterSampler):
        source, detail = "fake", "100 W"
        _power = staticmethod(lambda: 100.0)

        def _read_j(self):
            return time.perf_counter() * 100.0

    monkeypatch.setattr(energy, "discover", lambda device, nvml=None: Fake100W())
    d = _run_cli(tmp_path, "--energy", "--energy-min-s", "0.05", "--variants", "naive,+batched_cfg")
    v, h = d["variants"], d["energy_headline"]
    for name in ("naive", "eager", "+batched_cfg"):
        e = v[name]["energy_per_image"]
        assert e["status"] == "ok" and e["joules"] == pytest.approx(100.0 * e["seconds"], rel=0.05)
        assert e["peak_power_w"] == 100.0 and e["seconds"] == pytest.approx(v[name]["image_s"], rel=0.2)
    t = v["+batched_cfg"]["energy_per_token"]
    assert t["status"] == "ok" and t["chat_calls"] >= 1 and t["seconds"] >= 0.05
    assert t["joules_per_unit"] == pytest.approx(t["joules"] / (t["chat_calls"] * 3), rel=0.34)
    assert "energy_per_token" not in v["naive"]                     # the official loop has no decode
    assert h["product"] in ("eager", "+batched_cfg")
    assert h["image"]["baseline"] == "naive" and h["token"]["baseline"] == "eager"
    assert h["image"]["baseline_over_product"] == pytest.approx(
        v["naive"]["energy_per_image"]["joules"] / v[h["product"]]["energy_per_image"]["joules"])
    assert "J/image: " in d["markdown"] and "less energy" in d["markdown"]
    assert set(d["reproducibility"]) == {"at_start", "at_end"} and "cpu_governor" in d["reproducibility"]["at_end"]


def test_without_energy_no_figure_is_reported(tmp_path):
    d = _run_cli(tmp_path, "--variants", "naive")
    none = {"status": "unavailable", "reason": "--energy not given"}
    assert d["variants"]["naive"]["energy_per_image"] == none and d["variants"]["eager"]["energy_per_token"] == none
    assert d["energy_headline"]["image"] == d["energy_headline"]["token"] == none


def test_a_selection_still_runs_the_eager_reference(tmp_path):
    d = _run_cli(tmp_path, "--variants", "naive,+batched_cfg")
    v = d["variants"]
    assert v["naive"]["status"] == v["+batched_cfg"]["status"] == v["eager"]["status"] == "ok"
    assert "reference" in v["eager"]["note"] and v["+static_cache"]["status"] == "not measured"
    assert v["naive"]["latent_vs_eager"]["rel"] <= 1e-5 and v["+batched_cfg"]["latent_vs_eager"]["rel"] <= 1e-5


def test_naive_loop_equals_the_pipeline():
    """The compact official loop and Pipeline.generate (batched CFG, static cache) agree in float32."""
    from cheers_deploy.runtime.pipeline import Pipeline
    from cheers_deploy.runtime.torch_backend import TorchBackend

    cfg = CheersConfig.from_name("tiny")
    model = gs.build_model(cfg, torch.device("cpu"), torch.float32, seed=3)
    proc, prompt = gs.processor_for(cfg, 64)
    noise = np.random.default_rng(0).standard_normal((cfg.latent_channels, 4, 4), dtype=np.float32)
    x_naive, pixels = naive.naive_generate(model, proc, prompt, noise, 3, 9.5, 0.5, 0, gs.StepClock(False))
    assert model.options()["rope_cache"] is False              # the official configuration
    model.set_options(rope_cache=True)
    pipe = Pipeline(TorchBackend(model, static_cache=True), proc.tokenizer, proc, cfg, timings=False)
    out = pipe.generate(prompt, steps=3, cfg_scale=9.5, alpha=0.5, seed=0, noise=noise, max_new_tokens=1)
    assert float(np.abs(out.latent - x_naive).max()) <= 1e-5 * float(np.abs(x_naive).max())
    assert pixels.shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------ floor (unchanged)

def test_vit_flops_hand_formula():
    cfg = CheersConfig.from_name("tiny")
    v = cfg.vision_representation_config            # D 64, MLP 128, 2 layers, 4 heads, 64 px / patch 16
    n = (64 // 16) ** 2                              # 16 tokens
    d, i, layers = 64, 128, 2
    patch = 2 * 3 * 16 * 16 * d * n
    per_layer = 2 * n * (4 * d * d) + 2 * n * (2 * d * i) + 2 * (2 * n * n * d)   # QKV/O, MLP, QK^T + PV
    assert floor.vit_cost(v, n)["flops"] == patch + layers * per_layer
    assert floor.step_flops(cfg, 64, PREFIX, cfg_batch=2)["vit"] == patch + layers * per_layer
    # the official ViT at 512 px: 1024 tokens, 27 layers
    vo = CheersConfig.from_name("cheers-official").vision_representation_config
    n, d, i = 1024, 1152, 4304
    hand = 2 * 3 * 256 * d * n + 27 * (2 * n * (4 * d * d + 2 * d * i) + 4 * n * n * d)
    assert floor.vit_cost(vo, n)["flops"] == hand


def test_step_flops_match_torch_flop_counter():
    """FlopCounterMode over one batched Euler step through the backend (math SDPA, so attention is counted as bmm)
    = floor.step_flops; the final VAE decode = floor.image_flops' part."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cheers_deploy.runtime.masks import prefill_mask
    from cheers_deploy.runtime.torch_backend import TorchBackend

    cfg = CheersConfig.from_name("tiny")
    res = cfg.vision_representation_config.image_size
    model = gs.build_model(cfg, torch.device("cpu"), torch.float32)
    be = TorchBackend(model)
    cache = be.new_cache(2, PREFIX + 8)
    be.backbone(cache, torch.randn(2, PREFIX, cfg.text_config.hidden_size), 0,
                prefill_mask(np.zeros(PREFIX, bool)), "prefill")
    x = torch.randn(1, cfg.latent_channels, 4, 4)
    for static in (False, True):
        be.static_cache = static
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            tok, pe = be.vision_tokenize(x)
            hs, _ = be.backbone(cache, be.repeat_batch(tok, 2), PREFIX, None, "image_step")
            be.cfm_head(hs, be.repeat_batch(pe, 2), np.full((2,), 0.5, np.float32))
        assert fc.get_total_flops() == floor.step_flops(cfg, res, PREFIX, cfg_batch=2)["total"], static
    with FlopCounterMode(display=False) as fc:
        model.vae_decode(x)
    assert fc.get_total_flops() == floor.image_flops(cfg, res, PREFIX, STEPS)["final_vae_decode"]


@pytest.mark.parametrize("preset", ["tiny", "cheers-official"])
def test_param_counts_match_the_model(preset):
    from cheers_deploy.model import CheersModel
    cfg = CheersConfig.from_name(preset)
    with torch.device("meta"):
        m = CheersModel(cfg)
    inner = m.model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    vt = inner.vision_representation
    got = {"vae_encoder": count(inner.vae_model.encoder), "vae_decoder": count(inner.vae_model.decoder),
           "decoder_projector": count(inner.vae_decoder_projector), "vision_tower": count(vt) - count(vt.head),
           "vision_pooling_head": count(vt.head), "und_projector": count(inner.und_projector),
           "language_model": count(inner.language_model), "time_embed": count(inner.time_embed),
           "gen_projector": count(inner.gen_projector), "hi_gate": count(inner.hi_gate),
           "hi_projector": count(inner.hi_projector)}
    assert floor.component_params(cfg) == got
    if preset == "cheers-official":                 # docs/architecture.md §16.6
        assert sum(got.values()) == 2_571_337_735
        assert got["language_model"] == 1_543_714_304 and got["vision_tower"] == 413_534_448


def test_floor_seconds_is_the_roofline():
    assert floor.floor_seconds(2e12, 1e9, matmul_tflops=1000, copy_gbps=2000) == pytest.approx(2e-3)
    assert floor.floor_seconds(1e9, 4e9, matmul_tflops=1000, copy_gbps=2000) == pytest.approx(2e-3)
    cfg = CheersConfig.from_name("cheers-official")
    f = floor.step_floor(cfg, 512, 283, 80, matmul_tflops=700, copy_gbps=3000)
    assert f["step"]["bound"] == "compute"         # ~5.4 TFLOP vs ~4.6 GB per step
    assert f["naive_algorithm_step_flops"]["total"] > f["step_flops"]["total"]
    assert f["image_floor_s"] > 80 * f["step"]["floor_s"]


# ------------------------------------------------------------------------------------------------ CUDA

@pytest.mark.gpu
def test_cli_cuda_tiny(tmp_path):
    """The non-compiling rows on a GPU with the tiny preset in float32 (the compiling ones: the official run of
    bench/run_gpu_checks.sh and tests/test_torch_fast_path.py): the CUDA-graph row gives the eager latent (1e-4:
    other SDPA kernels), the report has memory, warm-up and energy fields."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "gpu_step.json"
    rows = ["naive", "eager", "+static_cache", "+batched_cfg", "+device_rope", "+cuda_graphs"]
    assert gs.main(["--preset", "tiny", "--device", "cuda", "--dtype", "fp32", "--steps", "4", "--decode-tokens", "4",
                    "--budget-s", "300", "--quiet", "--energy", "--variants", ",".join(rows), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert not d["errors"], d["errors"]
    assert "source" in d["energy"]
    for name in rows:
        r = d["variants"][name]
        assert r["status"] == "ok", (name, r)
        assert r["peak_gpu_mem_gib"] > 0 and np.isfinite(r["per_step_ms"]["median"])
        if name != "eager":
            assert r["latent_vs_eager"]["rel"] <= 1e-4, (name, r["latent_vs_eager"])
    assert d["variants"]["+cuda_graphs"]["captures"] > 0 and d["variants"]["+cuda_graphs"]["warmup_s"] > 0
