"""Training module: §14.1 labels on a hand-built example, the §12.1 mask against its formula, the world
tokenizer, a short CPU run whose loss falls, and save/resume against an uninterrupted run."""
import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cheers_deploy.config import CheersConfig  # noqa: E402
from cheers_deploy.data import shapes as W  # noqa: E402
from cheers_deploy.processor import render_chat  # noqa: E402
from cheers_deploy.tokenizer import IGNORE_INDEX, CheersTokenizer  # noqa: E402
from cheers_deploy.train.data import BatchBuilder, DataConfig, ShapesPool, bf16_round  # noqa: E402
from cheers_deploy.train.loop import TrainConfig, Trainer, lr_at  # noqa: E402
from cheers_deploy.world_tokenizer import padded_vocab_size, train_world_tokenizer  # noqa: E402

from helpers import tiny_test_config  # noqa: E402  (tests/ is on sys.path)

M = 4  # LLM tokens per image in the builder tests (64 px)


@pytest.fixture(scope="module")
def tok() -> CheersTokenizer:
    return train_world_tokenizer()


@pytest.fixture()
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- tokenizer

def test_world_tokenizer_layout_and_determinism(tok, tmp_path):
    sp = tok.special
    # official order: BPE vocabulary, then <|endoftext|>, <|im_start|>, <|im_end|>, then the five Cheers tokens
    n = len(tok)
    assert [sp.endoftext, sp.chat_start, sp.chat_end, sp.image, sp.image_gen, sp.img_start, sp.img_end,
            sp.no_mean] == list(range(n - 8, n))
    assert tok.decode([sp.newline]) == "\n"
    for w in W.vocabulary():
        if w.isalpha():
            assert len(tok.encode(w)) == 1 and len(tok.encode(" " + w)) == 1, w
    assert n <= CheersConfig.from_name("tiny-shapes").text_config.vocab_size == padded_vocab_size(tok)
    tok.save(tmp_path / "a")
    train_world_tokenizer().save(tmp_path / "b")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    again = CheersTokenizer.from_dir(tmp_path / "a")
    text = render_chat([{"role": "user", "content": "<im_start><image><im_end>\nwhat color is the star?"}])
    assert again.encode(text) == tok.encode(text)
    assert "chat_template" in json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())


def test_tiny_shapes_preset_couplings():
    cfg = CheersConfig.from_name("tiny-shapes")
    cfg.check()
    assert cfg.vae_decoder_config.ch == cfg.latent_channels == 4 * cfg.vae_encoder_config.z_channels
    assert cfg.vision_representation_config.patch_size == 2 * cfg.vae_downsample == 16
    from cheers_deploy.model import CheersModel
    n = sum(p.numel() for p in CheersModel(cfg).state_dict().values())
    assert 2e6 < n and 4 * n < 25e6          # a few million parameters, float32 file <= 25 MB


# ---------------------------------------------------------------------------------------------- labels

S_, I_, IMG = "sup", "ign", "img"


def _expected(tok, segments):
    """Token ids, unshifted labels and image flags from hand-labelled (text, kind) segments; every segment is
    encoded on its own (special tokens split the text, so this equals encoding the whole string)."""
    ids, labels, flags = [], [], []
    for text, kind in segments:
        if kind == IMG:
            ids += [-1] * M
            labels += [IGNORE_INDEX] * M
            flags += [True] * M
            continue
        t = tok.encode(text)
        ids += t
        labels += t if kind == S_ else [IGNORE_INDEX] * len(t)
        flags += [False] * len(t)
    return np.array(ids), np.array(labels), np.array(flags)


def _system(tok):
    return [("<|im_start|>", S_), ("system", I_), ("\n", S_), ("You are a helpful assistant.", I_),
            ("<|im_end|>", S_), ("\n", S_)]


def _shift_and_drop(labels, flags):
    tgt = np.full(len(labels), IGNORE_INDEX)
    tgt[:-1] = labels[1:]
    last_img = np.flatnonzero(flags)[-1]
    assert labels[last_img + 1] != IGNORE_INDEX          # <im_end> is supervised ...
    tgt[last_img] = IGNORE_INDEX                          # ... but never predicted from the last image token
    return tgt


def _builder(tok, pool_size=40):
    pool = ShapesPool(pool_size, seed=0, resolution=64)
    return BatchBuilder(pool, tok, DataConfig(pool_size=pool_size), batch_size=8, tokens_per_image=M,
                        latent_shape=(32, 4, 4))


def test_labels_understanding_hand_checked(tok):
    segs = _system(tok) + [
        ("<|im_start|>", S_), ("user", I_), ("\n", S_), ("<im_start>", S_), ("", IMG), ("<im_end>", S_), ("\n", S_),
        ("what color is the circle?", I_), ("<|im_end|>", S_), ("\n", S_),
        # the whole assistant turn is supervised
        ("<|im_start|>", S_), ("assistant", S_), ("\n", S_), ("red", S_), ("<|im_end|>", S_), ("\n", S_)]
    ids, labels, flags = _expected(tok, segs)
    b = _builder(tok)
    seq_ids, seq_labels = b.seq.understanding("what color is the circle?", "red")
    kind, local, targets, mask, image_pos, text = b._template(("test-u",), seq_ids, seq_labels, False)
    n = len(ids)
    assert list(np.flatnonzero(kind[:n] == 2)) == list(np.flatnonzero(flags)) == list(image_pos)
    assert (kind[n:] == 0).all()
    # spliced text positions carry the expected ids
    txt = np.flatnonzero(kind == 1)
    assert list(text[local[txt]]) == list(ids[~flags])
    assert list(targets[:n]) == list(_shift_and_drop(labels, flags))
    assert (targets[n:] == IGNORE_INDEX).all()
    # what the template renders is the training chat template (trimmed contents)
    rendered = render_chat([{"role": "user", "content": " <im_start><image><im_end>\nwhat color is the circle? "},
                            {"role": "assistant", "content": "red\n"}], add_generation_prompt=False, trim=True)
    assert tok.decode([i if i >= 0 else tok.special.image for i in seq_ids]) == rendered


def test_labels_generation_cfg_dropout_and_dummy(tok):
    prompt = "a small red circle on the left"
    segs = _system(tok) + [
        ("<|im_start|>", S_), ("user", I_), ("\n", S_), (prompt, I_), ("<|im_end|>", S_), ("\n", S_),
        ("<|im_start|>", S_), ("assistant", S_), ("\n", S_), ("<im_start>", S_), ("", IMG), ("<im_end>", S_),
        ("<|im_end|>", S_), ("\n", S_)]
    ids, labels, flags = _expected(tok, segs)
    b = _builder(tok)
    seq_ids, seq_labels = b.seq.generation(prompt)
    drop = b.seq.uncond(seq_ids)
    sp = tok.special
    kept = {sp.img_start, sp.img_end}
    # every input id except <im_start>, <im_end> and the placeholder becomes <no_mean>; labels unchanged
    assert [int(i) if (i < 0 or i in kept) else "nm" for i in drop] == \
           [int(i) if (i < 0 or i in kept) else "nm" for i in seq_ids]
    assert all(i == sp.no_mean for i in drop if i >= 0 and i not in kept)
    kind, local, targets, mask, image_pos, text = b._template(("test-g",), drop, seq_labels, True)
    # dummy block first (I = 0, plain causal), then the conversation
    assert (kind[:M] == 3).all() and not mask[:M, :M][np.triu_indices(M, 1)].any()
    n = len(ids)
    exp = np.full(M + n, IGNORE_INDEX)
    exp[M - 1] = labels[0]                       # the last dummy position predicts the first text token
    exp[M:] = _shift_and_drop(labels, flags)
    assert list(targets[:M + n]) == list(exp)
    assert list(image_pos) == list(M + np.flatnonzero(flags))


def _mask_formula(flags, valid):
    """§12.1 written out: allowed(q,k) = [(k<=q) or (I_q and I_k and same image run)] and V_q and V_k and same
    valid run, or (not V_q and not V_k and same padding run)."""
    s = len(flags)
    run_i = np.concatenate([[0], np.cumsum(flags[1:] != flags[:-1])])
    run_v = np.concatenate([[0], np.cumsum(valid[1:] != valid[:-1])])
    out = np.zeros((s, s), bool)
    for q in range(s):
        for k in range(s):
            img = flags[q] and flags[k] and run_i[q] == run_i[k]
            same_v = run_v[q] == run_v[k]
            out[q, k] = ((k <= q or img) and valid[q] and valid[k] and same_v) or \
                        (not valid[q] and not valid[k] and same_v)
    return out


def test_batch_mask_gather_and_determinism(tok):
    b = _builder(tok)
    x, y = b(3), b(3)
    for k in vars(x):
        assert np.array_equal(getattr(x, k), getattr(y, k)), k
    assert not np.array_equal(b(4).noise, x.noise)
    B, S = x.gather.shape
    zero_row = B * b.L + B * M + b.n_dummy * M
    for i in range(B):
        valid = x.gather[i] != zero_row
        flags = np.zeros(S, bool)
        flags[x.image_pos[i]] = True
        assert np.array_equal(x.mask[i, 0], _mask_formula(flags, valid))
        # the image block of sample i reads its own understanding tokens
        assert list(x.gather[i, x.image_pos[i]]) == list(B * b.L + i * M + np.arange(M))
    assert (x.t[~x.is_gen] == 1).all() and (x.t[x.is_gen] < 1).all() and (x.t > 0).all()
    assert np.array_equal(bf16_round(x.t), x.t)
    assert x.is_gen.sum() == round(B * 0.5)


def test_bf16_round_matches_torch():
    v = np.random.default_rng(0).random(10000).astype(np.float32)
    v = np.concatenate([v, [1 - 2 ** -10, 1 - 2 ** -9, 0.99805, 1e-6]]).astype(np.float32)
    ref = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
    assert np.array_equal(bf16_round(v), ref)


def test_lr_schedule():
    lrs = [lr_at(1.0, i, 100, 0.1, 0.1) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] >= 0.1


# ---------------------------------------------------------------------------------------------- training

def _tc(steps, **kw) -> TrainConfig:
    tc = TrainConfig(steps=steps, batch_size=8, save_every=0, log_every=1,
                     stage_fractions={"vae": 0.1, "align": 0.05, "joint": 0.85}, **kw)
    tc.data.pool_size = 64
    tc.data.dummy_pool = 4
    return tc


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_training_run_loss_falls(tmp_path, one_thread):
    """80 CPU steps of the whole recipe on the 32 px test model: the VAE reconstruction error and the joint
    loss both fall by at least the stated factors, and the output is a loadable checkpoint."""
    tc = _tc(80)
    tc.lr = {"vae": 3e-3, "align": 2e-3, "joint": 2e-3}
    summary = Trainer(tc, tmp_path, "cpu", progress=False, model_config=tiny_test_config(), log=lambda *a: None).run()
    rows = _csv(tmp_path / "loss.csv")
    vae = [float(r["rec_l2"]) for r in rows if r["stage"] == "vae"]
    joint = [float(r["loss"]) for r in rows if r["stage"] == "joint"]
    assert np.mean(vae[-2:]) < 0.6 * vae[0]
    first, last = np.mean(joint[:3]), np.mean(joint[-10:])
    assert last < 0.5 * first, (first, last)            # stated factor: the joint loss at least halves
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert summary["joint"]["steps"] == 68
    from cheers_deploy.runtime.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(tmp_path)
    img = W.render(W.make_split("heldout", 1)[0].scene, 32)
    assert isinstance(pipe.answer(img, "how many shapes are there?", max_new_tokens=3).text, str)


def _weights(path):
    from safetensors.numpy import load_file
    return load_file(str(path))


@pytest.mark.parametrize("stop", [1, 9])            # inside the vae stage / inside the joint stage
def test_resume_equals_uninterrupted(tmp_path, one_thread, stop):
    cfg = tiny_test_config()
    quiet = dict(progress=False, log=lambda *a: None)
    Trainer(_tc(12, ema=0.9), tmp_path / "a", "cpu", model_config=cfg, **quiet).run()
    Trainer(_tc(12, ema=0.9), tmp_path / "b", "cpu", model_config=cfg, **quiet).run(until=stop)
    state = json.loads((tmp_path / "b" / "trainer_state.json").read_text())
    assert state["step"] == stop
    Trainer(_tc(12, ema=0.9), tmp_path / "b", "cpu", resume=True, **quiet).run()
    for f in ("model.safetensors", "trainer/model.safetensors"):
        wa, wb = _weights(tmp_path / "a" / f), _weights(tmp_path / "b" / f)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_array_equal(wb[k], wa[k], err_msg=f"{f}:{k}")     # bitwise on CPU
    la, lb = _csv(tmp_path / "a" / "loss.csv"), _csv(tmp_path / "b" / "loss.csv")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
