"""Tokenizer: reference ids, agreement with the transformers Qwen2 tokenizers, round trips, error paths."""
import json
import os
import random
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from cheers_deploy.errors import CheckpointError
from cheers_deploy.processor import render_chat
from cheers_deploy.tokenizer import (CHAT_TEMPLATE, CHEERS_TOKENS, IMAGE_PLACEHOLDER, CheersTokenizer,
                                     build_bpe_from_vocab_merges)


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    d = Path(__file__).resolve().parent / "data" / "official-tiny"
    if not (d / "vocab.json").is_file():
        pytest.skip(f"official reference set not found at {d}")
    return d


@pytest.fixture(scope="session")
def ref_json(ref_dir):
    return json.loads((ref_dir / "reference.json").read_text())


@pytest.fixture(scope="session")
def ref_npz(ref_dir):
    return np.load(ref_dir / "reference.npz")


@pytest.fixture(scope="session")
def tok(ref_dir) -> CheersTokenizer:
    return CheersTokenizer.from_dir(ref_dir)


def _corpus() -> list[str]:
    """A few hundred varied strings: hand-picked edge cases plus seeded random mixtures of them."""
    base = [
        "", " ", "  ", "\n", "\n\n", "\r\n", " \n ", "\t\t", "a  b", "trailing   ", "   leading", "x \n\n y",
        "Hello world!", "hello World", "HELLO", "I'm", "I'M here", "don't", "DON'T", "we'll", "WE'LL", "they're",
        "you've", "He'd", "it's", "'s", "''s", "rock'n'roll", "12345", "3.14159", "1,000,000", "0x1F", "v2.0.1",
        "2024-06-01T12:00:00Z", "$100.00", "50%", "a1b2c3", "１２３", "½ ¾", "你好，世界", "我爱自然语言处理。",
        "こんにちは世界", "カタカナ", "안녕하세요", "Привет, мир", "Ελληνικά", "مرحبا بالعالم", "שלום", "हिन्दी",
        "ไทย", "Ünïcödé naïve café", "e\u0301", "A\u030a", "ﬁ ligature", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪",
        "I ❤️ 🍕!", "\u200b zero width", "\u00a0nbsp\u00a0", "\u3000ideographic space", "tab\tseparated\tvalues",
        "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }", "if x != y:\n\tpass",
        "<div class=\"a\">text</div>", "SELECT * FROM t WHERE id=1;", "a->b && c || !d", "#include <stdio.h>",
        "    indented\n        more", "{\"key\": [1, 2, 3]}", "path/to/file.txt", "https://example.com/?q=1&r=2",
        "...", "!!!???", "---", "***bold***", "`code`", "~/.bashrc", "C:\\Windows\\System32",
        "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "a<|endoftext|>b", "<image>", "<im_start><image><im_end>\n",
        " <image_gen> ", "<no_mean><no_mean>", "x<im_start>", "<im_end>y", "<im_sta", "<image", "<|im_start|",
        "<tool_call>{}</tool_call>", "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>", "<|vision_start|><|image_pad|>",
        "The quick brown fox jumps over the lazy dog.", "A green triangle next to a blue square.",
        "Describe a blue square in one sentence.", " Which shapes and colours do you see?",
    ]
    pieces = base + [" ", "\n", "  ", "'s", "'LL", "9", "99999", "é", "中", "🙂", ".", ",", "\t", "\r"]
    rng = random.Random(1234)
    mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    return base + mixed


def test_reference_prompts_render_and_encode(tok, ref_json, ref_npz):
    for name in ("i2t", "t2t", "t2i"):
        text = render_chat([{"role": "user", "content": ref_json["prompts"][name]}])
        assert text == ref_json["rendered_chat_texts"][name][0]
        ids = [IMAGE_PLACEHOLDER if i == tok.special.image else i for i in tok.encode(text)]
        expected = ref_npz[f"{name}/input_ids"][0].tolist()
        if name == "t2i":
            expected = expected[:-1]  # the processor appends <im_start> after the template
            assert ref_npz["t2i/input_ids"][0, -1] == tok.special.img_start
        assert ids == expected, name


def test_special_ids_match_official(tok, ref_json):
    info = ref_json["tokenizer"]
    assert len(tok) == info["len_tokenizer"] == 151670
    for text, i in info["added_by_processor"].items():
        assert tok.token_to_id(text) == i
    s = tok.special
    assert (s.endoftext, s.chat_start, s.chat_end, s.newline) == (info["pad_token_id"], 151644,
                                                                   info["eos_token_id"], 198)
    assert (s.image, s.image_gen, s.img_start, s.img_end, s.no_mean) == tuple(range(151665, 151670))


def _hf_tokenizers(ref_dir):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no cross-check")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = {}
    for cls in (transformers.Qwen2Tokenizer, transformers.Qwen2TokenizerFast):
        t = cls.from_pretrained(str(ref_dir))  # vocab + merges + added_tokens_decoder, as the official loads it
        t.add_tokens(list(CHEERS_TOKENS), special_tokens=True)  # what the official processor adds
        out[cls.__name__] = t
    return out


def test_bpe_matches_transformers(tok, ref_dir):
    corpus = _corpus()
    assert len(corpus) > 300
    for name, hf in _hf_tokenizers(ref_dir).items():
        assert len(hf) == len(tok), name
        for s in corpus:
            ids = tok.encode(s)
            assert ids == hf.encode(s, add_special_tokens=False), (name, s)
            assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False), (name, s)
            assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), (name, s)


def test_decode_encode_round_trip(tok):
    for s in _corpus():
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)
    # placeholders decode as their marker tokens
    assert tok.decode([tok.special.img_start, IMAGE_PLACEHOLDER, tok.special.img_end]) == "<im_start><image><im_end>"


def test_save_from_dir_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["added_tokens_decoder"]["151669"]["content"] == "<no_mean>"
    assert cfg["added_tokens_decoder"]["151669"]["special"] is True
    assert cfg["added_tokens_decoder"]["151657"]["special"] is False  # <tool_call> keeps the official flag
    again = CheersTokenizer.from_dir(tmp_path)  # now from tokenizer.json
    assert len(again) == len(tok) and again.special == tok.special
    for s in _corpus()[:150]:
        assert again.encode(s) == tok.encode(s)


def test_build_without_config_and_missing_files(ref_dir, tmp_path):
    bare = build_bpe_from_vocab_merges(ref_dir / "vocab.json", ref_dir / "merges.txt")
    # without the config the Cheers tokens follow the base vocabulary directly
    assert bare.token_to_id("<image>") == 151643 and bare.token_to_id("<|im_start|>") is None
    with pytest.raises(CheckpointError, match=re.escape("<|im_start|>")):
        CheersTokenizer(bare)  # the runtime cannot work without chat tokens
    shutil.copy(ref_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(CheckpointError, match="merges.txt"):
        CheersTokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape("(missing: vocab.json, merges.txt)")):
        CheersTokenizer.from_dir(tmp_path / "nowhere")


def test_bad_added_token_table_is_rejected(ref_dir, tmp_path):
    cfg = json.loads((ref_dir / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["151700"] = cfg["added_tokens_decoder"].pop("151664")  # a gap in the ids
    for n in ("vocab.json", "merges.txt"):
        shutil.copy(ref_dir / n, tmp_path / n)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="should have id 151700"):
        CheersTokenizer.from_dir(tmp_path)
