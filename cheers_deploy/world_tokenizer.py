"""A small byte-level BPE for the shapes world, in the official Qwen2 layout (docs/architecture.md §15, §19.5).

Same normaliser, pre-tokeniser regex and byte-level mapping as the official tokenizer, trained on the
world's texts and the chat-template words so that every world word is one token (with and without its
leading space); the official special tokens are appended after the BPE vocabulary in the official order.
Deterministic: the same corpus in the same order gives byte-identical `tokenizer.json` files.
"""

from __future__ import annotations

import itertools
from typing import Iterable, List

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from .processor import DEFAULT_SYSTEM, render_chat
from .tokenizer import CHEERS_TOKENS, QWEN2_PRETOKENIZE_REGEX, CheersTokenizer

# Official added tokens before the five Cheers tokens (§15.1): pad / chat start / chat end.
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Cap of the BPE vocabulary (256 bytes + merges); the trainer runs out of merges at 438, every world word is one token.
DEFAULT_BPE_VOCAB = 448
# Understanding prompt of the captioning task (the answer is the scene caption).
DESCRIBE_QUESTION = "describe the image."


def _world_texts() -> List[str]:
    """Every text the tiny model sees: captions/prompts, questions, answers, chat-template pieces."""
    from .data import shapes as W

    texts: List[str] = []
    combos = [(c, s) for c in W.COLOR_NAMES for s in W.SHAPES]
    scenes = [W.Scene((W.ShapeObject(s, c, p, z),))
              for (c, s), p, z in itertools.product(combos, W.POSITIONS, W.SIZES)]
    for s1, s2 in itertools.product(W.SHAPES, W.SHAPES):
        for p1, p2 in itertools.permutations(W.POSITIONS, 2):
            scenes.append(W.Scene((W.ShapeObject(s1, "red", p1, "small"), W.ShapeObject(s2, "blue", p2, "large"))))
    for sc in scenes:
        texts += W.t2i_prompts(sc)
        for _, q, a in W.qa_pairs(sc):
            texts += [q, a]
    texts += [DESCRIBE_QUESTION]
    # chat template (training variant) around a few contents: role words, system prompt, newlines
    for content in ("a red circle on the left", DESCRIBE_QUESTION):
        texts.append(render_chat([{"role": "user", "content": content},
                                  {"role": "assistant", "content": "yes"}], add_generation_prompt=True, trim=True))
    words = sorted(set(W.vocabulary()) | {"system", "user", "assistant"} | set(DEFAULT_SYSTEM.rstrip(".").split()))
    texts += words + [" " + w for w in words]
    return texts


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_world_tokenizer(vocab_size: int = DEFAULT_BPE_VOCAB, texts: Iterable[str] | None = None) -> CheersTokenizer:
    """Train the world BPE (byte alphabet + merges up to `vocab_size`), then add the 3 chat specials and the
    5 Cheers tokens as special tokens, in the official order. Returns a CheersTokenizer (save with `.save`)."""
    corpus = list(_world_texts() if texts is None else texts)
    # repeat the corpus so every word is frequent enough to be merged; order is fixed -> deterministic
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS + CHEERS_TOKENS])
    return CheersTokenizer(tok)


def padded_vocab_size(tokenizer: CheersTokenizer, multiple: int = 64) -> int:
    """Embedding rows for `tokenizer`, rounded up (the official table is also padded past the tokenizer)."""
    n = len(tokenizer)
    return -(-n // multiple) * multiple
