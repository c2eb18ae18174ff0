"""The staged training recipe (docs/architecture.md §14.4, scaled down) with resumable safetensors checkpoints.
One file because the recipe and the Trainer's phases share the Trainer's state (model, pool, cached latents,
optimizer, EMA) and read top to bottom; checkpoint files live in checkpointing.py, loss.png in plots.py.

    stage "vae"   : model.vae_model encoder+decoder, pixel reconstruction; then decoder -> decoder projector,
                    latent BatchNorm statistics from the training pool, pool latents cached (vae_model frozen)
    stage "align" : und_projector, gen_projector, hi_gate, hi_projector, time_embed, embed_tokens (= lm_head)
    stage "joint" : everything except vae_model (the official "sft" stage)

Each stage: AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA; optional EMA
in the joint stage. All randomness of a step is a function of (seed, step), so `--resume` reproduces an
uninterrupted run. The output directory is a loadable checkpoint (config.json, model.safetensors,
tokenizer, preprocessor_config.json) plus trainer_state.json, trainer/optimizer.safetensors, loss.csv/.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from ..config import CheersConfig
from ..errors import CheckpointError, InputError
from ..fileio import atomic_write_text, write_json
from ..model.vae import normalize
from ..world_tokenizer import train_world_tokenizer
from .checkpointing import load_checkpoint, load_optimizer, read_state, save_checkpoint
from .data import BatchBuilder, DataConfig, ShapesPool, dummy_pixels, prefetch
from .objective import batch_to_device, cheers_loss, raw_latents, vae_loss
from .plots import plot_losses

STAGES = ("vae", "align", "joint")
ALIGN_MODULES = ("und_projector", "gen_projector", "hi_gate", "hi_projector", "time_embed")  # + embed_tokens
CSV_FIELDS = ("step", "stage", "loss", "text", "image", "image_gen", "rec_l1", "rec_l2", "lr", "grad_norm",
              "elapsed_s")


@dataclass
class TrainConfig:
    preset: str = "tiny-shapes"
    steps: int = 6000                       # all stages together
    time_budget: float = 0.0                # > 0: choose `steps` so the loop takes about this many seconds
    stage_fractions: Dict[str, float] = field(default_factory=lambda: {"vae": 0.2, "align": 0.05, "joint": 0.75})
    batch_size: int = 256
    lr: Dict[str, float] = field(default_factory=lambda: {"vae": 2e-3, "align": 1e-3, "joint": 1e-3})
    warmup: float = 0.05                    # fraction of each stage
    min_lr_ratio: float = 0.05              # cosine floor
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.0               # official value
    grad_clip: float = 1.0
    ema: float = 0.999                      # EMA decay in the joint stage (0 = off)
    image_weight: float = 1.0               # §14.3
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)

    def stage_bounds(self) -> Dict[str, tuple]:
        """{stage: (first_step, end_step)}; rounding remainder goes to the last stage."""
        out, s = {}, 0
        for i, name in enumerate(STAGES):
            n = self.steps - s if i == len(STAGES) - 1 else int(round(self.steps * self.stage_fractions.get(name, 0)))
            out[name] = (s, s + max(0, n))
            s += max(0, n)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        data = DataConfig(**d.pop("data", {}))
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(data=data, **d)


def lr_at(base: float, i: int, n: int, warmup: float, min_ratio: float) -> float:
    """Linear warm-up over ceil(warmup*n) steps, then cosine from base to base*min_ratio at the stage end."""
    w = max(1, int(math.ceil(warmup * n)))
    if i < w:
        return base * (i + 1) / w
    p = (i - w) / max(1, n - w)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


UND_OUT_STD = 0.005        # last und-projector Linear: image tokens start at ~2x the RMS of the text embeddings


def init_weights(model) -> None:
    """Training-time initialisation of §14.4: LLM Linear/Embedding N(0, 0.02) with zero biases; AdaLN modulation
    of every DiT block and the last hi-gate Linear zero (gate starts closed); everything else PyTorch default.

    From scratch (the official run starts from a pretrained SigLIP and LLM) two more choices matter: the ViT
    position table N(0, 0.02) instead of N(0, 1), and a small last und-projector Linear, so that neither the
    position table nor large image tokens drown the content (see docs/training.md, "initialisation")."""
    std = model.config.text_config.initializer_range
    with torch.no_grad():
        model.model.vision_representation.embeddings.position_embedding.weight.normal_(0.0, std)
        last = model.model.und_projector.mlp[-1]
        last.weight.normal_(0.0, UND_OUT_STD)
        last.bias.zero_()
        for m in model.model.language_model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for stack in (model.model.gen_projector, model.model.hi_projector):
            for block in stack.diffusion_head_a:
                lin = block.adaLN_modulation[-1]
                lin.weight.zero_()
                lin.bias.zero_()
        last = model.model.hi_gate.gate[-1]
        last.weight.zero_()
        last.bias.zero_()


def trainable_parameters(model, stage: str) -> Dict[str, nn.Parameter]:
    """Set requires_grad for `stage`; returns the trainable parameters by name (tied lm_head listed once)."""
    inner = model.model
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == "vae":
        mods = [inner.vae_model.encoder, inner.vae_model.decoder]
    elif stage == "align":
        mods = [getattr(inner, n) for n in ALIGN_MODULES] + [inner.language_model.embed_tokens]
    elif stage == "joint":
        mods = [m for n, m in inner.named_children() if n != "vae_model"]
    else:
        raise ValueError(stage)
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(True)
    # the unused ViT pooling head (§5.4) gets no gradient; keep it out of the optimizer
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".head." not in n}


class Trainer:
    """Runs the recipe. The phases, in the order the code below goes through them:

    1. `__init__`: recipe and model config, model (with the weights and counters of a resumed run), data, steps;
    2. `run`: the stages in order, then the final checkpoint, loss.png and train_summary.json;
    3. `_run_stage`: one stage's optimizer and step loop, with log rows and periodic checkpoints;
    then the step helpers, `_finalize_vae` (between the "vae" stage and the next: decoder projector, BN statistics,
    latent cache), the time-budget calibration, checkpoints (files in checkpointing.py) and the loss log."""

    # ------------------------------------------------------------------ set-up
    def __init__(self, tcfg: TrainConfig, out_dir, device: str = "cpu", resume: bool = False,
                 progress: bool = True, model_config: Optional[CheersConfig] = None, log=print,
                 amp: Optional[bool] = None):
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)   # bf16 autocast
        self.progress, self.log = progress, log
        self.start_step, self.vae_finalized, self.ema_steps = 0, False, 0

        # ---- recipe and model config (a resumed run: the saved recipe wins)
        state = read_state(self.out) if resume else None
        if state is not None:
            try:
                tcfg = TrainConfig.from_dict(state["train_config"])
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.out / 'trainer_state.json'}: bad train_config ({exc}); remove it to "
                                      f"train from scratch") from None
            model_config = CheersConfig.from_file(self.out / "config.json")
        self.tcfg = tcfg
        self.cfg = model_config if model_config is not None else CheersConfig.from_name(tcfg.preset)
        self.cfg.check()
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True      # static shapes: autotune the convolutions once
        res = self.cfg.vision_representation_config.image_size
        if tcfg.data.resolution != res:
            tcfg.data = dataclasses.replace(tcfg.data, resolution=res)
        self.tokenizer = train_world_tokenizer()
        if len(self.tokenizer) > self.cfg.text_config.vocab_size:
            raise InputError(f"the world tokenizer has {len(self.tokenizer)} ids but the model vocab is "
                             f"{self.cfg.text_config.vocab_size}")

        # ---- model: seeded initialisation, then the checkpoint's weights and counters when resuming
        torch.manual_seed(tcfg.seed)
        from ..model import CheersModel
        model = CheersModel(self.cfg)
        init_weights(model)
        self.model = model.to(self.device).train()
        self.ema: Optional[Dict[str, torch.Tensor]] = None
        self.opt_state_file: Optional[Path] = None
        if state is not None:
            self._resume(state)

        # ---- data: the rendered shapes pool, dummy images, the batch builder
        t0 = time.perf_counter()
        self.pool = ShapesPool(tcfg.data.pool_size, tcfg.data.seed, res)
        self.dummy_pix = dummy_pixels(tcfg.data.dummy_pool, res)
        patch = self.cfg.vision_representation_config.patch_size
        grid = res // patch
        self.builder = BatchBuilder(self.pool, self.tokenizer, tcfg.data, tcfg.batch_size,
                                    tokens_per_image=(grid // 2) ** 2,
                                    latent_shape=(self.cfg.latent_channels, grid, grid))
        self.log(f"[train] pool of {len(self.pool)} scenes at {res}px rendered in {time.perf_counter() - t0:.1f}s; "
                 f"batch {tcfg.batch_size} (S={self.builder.S}), {sum(p.numel() for p in self.model.parameters())/1e6:.2f}M "
                 f"params, device {self.device}")
        self.latents = self.dummy_latents = None

        # ---- step count: a time budget becomes a number of steps once (a resumed run keeps its count)
        if tcfg.time_budget > 0 and state is None:
            tcfg.steps = self._calibrate_steps(tcfg.time_budget)

    # ------------------------------------------------------------------ run
    def run(self, until: Optional[int] = None) -> dict:
        """Train up to step `until` (default: the end) and checkpoint; a run stopped early can be resumed."""
        tc = self.tcfg
        until = tc.steps if until is None else min(int(until), tc.steps)
        bounds = tc.stage_bounds()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=tc.steps, initial=self.start_step, dynamic_ncols=True, desc="train", unit="step")
        self.t_start = time.perf_counter()
        self._open_csv()
        summary: dict = {"steps": tc.steps, "batch_size": tc.batch_size, "device": str(self.device),
                         "stages": {k: list(v) for k, v in bounds.items()}}
        try:
            # ---- the stages in order; the VAE is finalised before the first stage that needs its latents
            for stage in STAGES:
                lo, hi = bounds[stage]
                if stage != "vae" and not self.vae_finalized and self.start_step >= lo:
                    self._finalize_vae()
                hi_run = min(hi, until)
                if hi_run <= self.start_step or hi <= lo:
                    continue
                begin = max(lo, self.start_step)
                t0 = time.perf_counter()
                with torch.enable_grad():          # the inference pipeline switches grad off process-wide
                    self._run_stage(stage, lo, hi, begin, hi_run, bar)
                dt = time.perf_counter() - t0
                summary[stage] = {"steps": hi_run - begin, "seconds": round(dt, 2),
                                  "ms_per_step": round(1e3 * dt / max(1, hi_run - begin), 2)}
                self.start_step = hi_run
            # ---- the end of the recipe: the final checkpoint (deployable weights, no optimizer)
            if until >= tc.steps:
                if not self.vae_finalized:
                    self._finalize_vae()
                self.save(tc.steps, "joint", None)
        finally:
            if bar is not None:
                bar.close()
            self._csv_file.close()
        # ---- loss.png and train_summary.json
        self.plot()
        summary["total_seconds"] = round(time.perf_counter() - self.t_start, 2)
        write_json(self.out / "train_summary.json", summary)
        return summary

    def _run_stage(self, stage, lo, hi, begin, end, bar):
        """Steps begin..end-1 of the stage spanning lo..hi-1 (schedules are relative to the whole stage)."""
        tc = self.tcfg
        params = trainable_parameters(self.model, stage)
        names = list(params)
        # ---- optimizer (its saved state when this stage resumes), latent cache, EMA
        opt = self._optimizer(list(params.values()), tc.lr[stage])
        if self.opt_state_file is not None:
            load_optimizer(opt, names, self.opt_state_file, stage)
            self.opt_state_file = None
        if stage != "vae" and self.latents is None:
            self._cache_latents()                      # vae_model is frozen from here on
        if tc.ema > 0 and stage == "joint" and self.ema is None:
            self.ema = {n: p.detach().float().clone() for n, p in self.model.named_parameters()}
        n = hi - lo
        acc: Dict[str, torch.Tensor] = {}
        n_acc = 0
        plist = list(params.values())
        if stage == "vae":
            steps = ((s, None) for s in range(begin, end))
        else:
            steps = prefetch(self.builder, begin, end, depth=3 if self.cuda else 0)
        # ---- the steps: schedule, forward/backward, clip, update, EMA; a log row every `log_every` steps,
        # a checkpoint every `save_every` steps and where the run stops before the end of the recipe
        for step, batch in steps:
            lr = lr_at(tc.lr[stage], step - lo, n, tc.warmup, tc.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            with self._autocast():
                if stage == "vae":
                    out = vae_loss(self.model.model.vae_model, self._vae_pixels(step))
                else:
                    out = cheers_loss(self.model, batch_to_device(batch, self.device), self.latents,
                                      self.dummy_latents, tc.image_weight)
            out["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(plist, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.ema is not None and stage == "joint":
                self._ema_update()
            for k, v in out.items():
                acc[k] = acc.get(k, 0) + v.detach().float()
            acc["grad_norm"] = acc.get("grad_norm", 0) + gn.detach().float()
            n_acc += 1
            done = step + 1
            if n_acc == tc.log_every or done == end:
                row = {k: float(v) / n_acc for k, v in acc.items()}
                self._write_row(done, stage, row, lr)
                if bar is not None:
                    post = {"stage": stage, "loss": f"{row['loss']:.4f}"}
                    if stage != "vae":
                        post.update(text=f"{row['text']:.3f}", img=f"{row['image_gen']:.3f}")
                    bar.set_postfix(post, refresh=False)
                acc, n_acc = {}, 0
            if bar is not None:
                bar.update(1)
            if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
                self.save(done, stage, (opt, names))
        if end < tc.steps:
            self.save(end, stage, (opt, names))

    # ------------------------------------------------------------------ step helpers
    def _optimizer(self, params, lr):
        tc = self.tcfg
        kind = {"fused": True} if self.cuda else {"foreach": True}     # fused kernels on CUDA
        return torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, **kind)

    def _vae_pixels(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([int(self.tcfg.data.seed) & 0xFFFFFFFF, 0x0FAE, int(step)])
        idx = rng.integers(len(self.pool), size=self.tcfg.batch_size)
        pix = torch.from_numpy(self.pool.pixels(idx))
        return pix.pin_memory().to(self.device, non_blocking=True) if self.cuda else pix

    @torch.no_grad()
    def _ema_update(self):
        """ema = d*ema + (1-d)*param over the trainable parameters, d warmed up as min(decay, (1+n)/(10+n))."""
        self.ema_steps += 1
        d = min(self.tcfg.ema, (1 + self.ema_steps) / (10 + self.ema_steps))
        if getattr(self, "_ema_pairs", None) is None:
            pairs = [(self.ema[n], p) for n, p in self.model.named_parameters() if p.requires_grad]
            self._ema_pairs = ([e for e, _ in pairs], [p for _, p in pairs])
        ema, params = self._ema_pairs
        torch._foreach_mul_(ema, d)
        torch._foreach_add_(ema, params, alpha=1 - d)

    def _autocast_off(self):
        return torch.autocast(self.device.type, enabled=False)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ vae -> latents (after the vae stage)
    def _finalize_vae(self):
        """Decoder -> decoder projector; BN statistics of the patchified training latents on both BNs."""
        inner = self.model.model
        vae, proj = inner.vae_model, inner.vae_decoder_projector
        with torch.no_grad():
            proj.decoder.load_state_dict(vae.decoder.state_dict())
            raw = self._raw_latents()
            mean, var = raw.mean(dim=(0, 2, 3)), raw.var(dim=(0, 2, 3), unbiased=False)
            for bn in (vae.bn, proj.bn):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            self._cache_latents(raw)
            self._center_patch_embedding()
        self.vae_finalized = True

    def _raw_latents(self):
        return self._encode_pool(lambda x: raw_latents(self.model.model.vae_model, x))

    def _center_patch_embedding(self, n_max: int = 512):
        """Data-dependent init of the ViT patch embedding: fold a per-channel standardisation of the decoder-
        projector images, (P - mean patch) / std, into the conv weight and bias. The shapes world is ~99 %
        light background, so without it every image maps to nearly the same tokens (cosine ~0.997) and the
        LLM learns to ignore them; with it the tokens of different images start with cosine ~0.4."""
        m = self.model
        pe = m.model.vision_representation.embeddings.patch_embedding
        k = pe.kernel_size[0]
        n = min(n_max, len(self.pool))
        with torch.no_grad(), self._autocast_off():
            pix = torch.cat([m.model.vae_decoder_projector(self.latents[i:i + 256]).float()
                             for i in range(0, n, 256)])                       # (n,3,H,W)
        patches = pix.unfold(2, k, k).unfold(3, k, k)                           # (n,3,gh,gw,k,k)
        mu = patches.mean(dim=(0, 2, 3))                                       # (3,k,k) mean patch
        sd = pix.std(dim=(0, 2, 3)).clamp_min(1e-3)                            # (3,) per channel
        w = pe.weight / sd.to(pe.weight.device)[None, :, None, None]
        pe.bias.sub_((w * mu.to(w.device)[None]).sum(dim=(1, 2, 3)))
        pe.weight.copy_(w)

    def _encode_pool(self, fn, pixels=None, chunk: int = 256) -> torch.Tensor:
        out = []
        n = len(self.pool) if pixels is None else len(pixels)
        with torch.no_grad(), self._autocast_off():
            for i in range(0, n, chunk):
                pix = self.pool.pixels(np.arange(i, min(n, i + chunk))) if pixels is None else pixels[i:i + chunk]
                out.append(fn(torch.from_numpy(pix).to(self.device)).float())
        return torch.cat(out)

    def _cache_latents(self, raw=None):
        """Normalised latents (x1) of the pool and of the dummy images, computed once (vae_model is frozen):
        the patchified encoder means through the BatchNorm statistics, i.e. `model.vae_encode`."""
        vae = self.model.model.vae_model
        raw = self._raw_latents() if raw is None else raw
        self.latents = normalize(raw, vae.bn)
        self.dummy_latents = normalize(self._encode_pool(lambda x: raw_latents(vae, x), pixels=self.dummy_pix), vae.bn)

    # ------------------------------------------------------------------ time budget
    def _calibrate_steps(self, budget: float) -> int:
        """Time a few VAE and joint steps on a throw-away copy of the model (random latents), then return the
        step count whose stage mix fits `budget` seconds (host batch building included, so it errs short)."""
        import copy

        tc = self.tcfg
        model = copy.deepcopy(self.model)
        c, g = self.builder.latent_shape[0], self.builder.latent_shape[1]
        gen = torch.Generator().manual_seed(0)
        lat = torch.randn(len(self.pool), c, g, g, generator=gen).to(self.device)
        dlat = torch.randn(tc.data.dummy_pool, c, g, g, generator=gen).to(self.device)

        def timed(stage, fn, warm=3, n=8):
            params = list(trainable_parameters(model, stage).values())
            opt = self._optimizer(params, 1e-5)
            for i in range(warm + n):
                if i == warm:
                    self._sync()
                    t0 = time.perf_counter()
                with self._autocast():
                    loss = fn(i)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            self._sync()
            return (time.perf_counter() - t0) / n

        torch.set_grad_enabled(True)
        t_vae = timed("vae", lambda i: vae_loss(model.model.vae_model, self._vae_pixels(i)))
        t_joint = timed("joint", lambda i: cheers_loss(model, batch_to_device(self.builder(i), self.device),
                                                      lat, dlat, tc.image_weight))
        del model, lat, dlat
        f = tc.stage_fractions.get("vae", 0.0)
        per_step = f * t_vae + (1 - f) * t_joint
        steps = max(100, int(budget / per_step) // 100 * 100)
        self.log(f"[train] calibration: vae {1e3 * t_vae:.1f} ms/step, joint {1e3 * t_joint:.1f} ms/step -> "
                 f"{steps} steps for a {budget:.0f}s budget")
        return steps

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, stage: str, opt_names) -> None:
        """Checkpoint after `step` completed steps (checkpointing.save_checkpoint); `opt_names` = (optimizer,
        parameter names) or None. loss.csv is flushed first: the checkpoint's fsync then covers the log."""
        csv_file = getattr(self, "_csv_file", None)
        if csv_file is not None and not csv_file.closed:
            csv_file.flush()
        save_checkpoint(self.out, self.model, self.cfg, self.tokenizer, step=step, stage=stage,
                        counters={"vae_finalized": self.vae_finalized, "ema_steps": self.ema_steps},
                        train_config=self.tcfg.to_dict(), ema=self.ema, optimizer=opt_names,
                        t_start=getattr(self, "t_start", None))

    def _resume(self, state: dict):
        """Resume: raw weights, EMA, counters; the optimizer is loaded when its stage starts."""
        resumed = load_checkpoint(self.out, state, self.model, self.device)
        self.start_step, self.vae_finalized, self.ema_steps = resumed.step, resumed.vae_finalized, resumed.ema_steps
        self.opt_state_file = resumed.optimizer_file
        if resumed.ema is not None:
            self.ema = resumed.ema
        self.log(f"[train] resumed from {self.out} at step {self.start_step}")

    # ------------------------------------------------------------------ loss log
    def _open_csv(self):
        path = self.out / "loss.csv"
        self.out.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.start_step > 0 and path.is_file():
            # keep the rows up to the resumed step; skip rows a crash left half-written (or NUL-filled)
            text = path.read_text(errors="replace").replace("\x00", "")
            for r in csv.DictReader(text.splitlines()):
                try:
                    if int(r["step"]) <= self.start_step and r["stage"] in STAGES:
                        rows.append(r)
                except (TypeError, ValueError, KeyError):
                    continue
        # the header and the kept rows replace the file atomically (fileio); the log then grows by appended rows
        buf = io.StringIO()
        head = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        head.writeheader()
        for r in rows:
            head.writerow(r)
        atomic_write_text(path, buf.getvalue())
        self._csv_file = open(path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)

    def _write_row(self, step, stage, row, lr):
        r = {"step": step, "stage": stage, "lr": f"{lr:.3e}",
             "elapsed_s": f"{time.perf_counter() - self.t_start:.1f}"}
        for k in ("loss", "text", "image", "image_gen", "grad_norm"):
            if k in row:
                r[k] = f"{row[k]:.5f}"
        if "l1" in row:
            r["rec_l1"], r["rec_l2"] = f"{row['l1']:.5f}", f"{row['l2']:.5f}"
        self._csv.writerow(r)
        self._csv_file.flush()

    def plot(self):
        """loss.png from loss.csv (matplotlib, Agg)."""
        plot_losses(self.out / "loss.csv", self.out / "loss.png")


def train(tcfg: TrainConfig, out_dir, device: str = "cpu", resume: bool = False, progress: bool = True,
          model_config: Optional[CheersConfig] = None, log=print, amp: Optional[bool] = None) -> dict:
    return Trainer(tcfg, out_dir, device, resume, progress, model_config, log, amp).run()
