"""Qwen2 byte-level BPE tokenizer with the five Cheers tokens (docs/architecture.md §15.1, §19.5).

Loads `tokenizer.json` or rebuilds the official tokenizer from `vocab.json` + `merges.txt`; no transformers needed.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import CheckpointError
from .fileio import atomic_path, atomic_write_text

IMAGE_PLACEHOLDER = -200      # `<image>` in input ids: replaced by the image's understanding tokens
IMAGE_GEN_PLACEHOLDER = -300  # `<image_gen>` (training only): generation target
IGNORE_INDEX = -100           # label value ignored by the text loss

CHEERS_TOKENS = ("<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>")  # added in this order
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# tokenizer_config.json written by save() when none was loaded (the official file's fields)
_DEFAULT_CONFIG = {
    "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
    "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _add_cheers_tokens(tok: Tokenizer) -> None:
    """Add the five Cheers tokens as special tokens unless the tokenizer already has them."""
    missing = [t for t in CHEERS_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def build_bpe_from_vocab_merges(vocab_path, merges_path, tokenizer_config_path=None) -> Tokenizer:
    """The official Qwen2 fast tokenizer rebuilt from vocab + merges (§19.5), plus the added and Cheers tokens."""
    try:
        model = BPE.from_file(str(vocab_path), str(merges_path), unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False, dropout=None)
    except Exception as exc:  # tokenizers raises a plain Exception on bad files
        raise CheckpointError(f"cannot build the BPE from {vocab_path} and {merges_path}: {exc}") from exc
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # no post-processor: Qwen2 adds no BOS/EOS
    if tokenizer_config_path is not None:
        decoder = _read_json(tokenizer_config_path).get("added_tokens_decoder", {})
        for id_str, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            # keep the config's flags: <tool_call>, <|fim_*|>... are added but not special, as in transformers
            added = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                               lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                               normalized=spec.get("normalized", False), special=spec.get("special", True))
            tok.add_tokens([added])
            got = tok.token_to_id(spec["content"])
            if got != int(id_str):  # ids are assigned sequentially; a gap in the table would shift all later ids
                raise CheckpointError(f"{tokenizer_config_path}: added token {spec['content']!r} should have "
                                      f"id {id_str} but the vocabulary gives it {got}")
    _add_cheers_tokens(tok)
    return tok


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the runtime needs, looked up from the tokenizer (never hard-coded)."""
    endoftext: int   # <|endoftext|>: pad; does not stop generation
    chat_start: int  # <|im_start|>
    chat_end: int    # <|im_end|>: the only stop token
    newline: int     # "\n"
    image: int       # <image>
    image_gen: int   # <image_gen>
    img_start: int   # <im_start>: as the last token it triggers image generation
    img_end: int     # <im_end>
    no_mean: int     # <no_mean>: null token of the unconditional CFG branch

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "SpecialTokens":
        names = {"endoftext": "<|endoftext|>", "chat_start": "<|im_start|>", "chat_end": "<|im_end|>",
                 "image": "<image>", "image_gen": "<image_gen>", "img_start": "<im_start>",
                 "img_end": "<im_end>", "no_mean": "<no_mean>"}
        ids = {field: tok.token_to_id(text) for field, text in names.items()}
        missing = [names[f] for f, i in ids.items() if i is None]
        newline = tok.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            missing.append("'\\n' as a single token")
        if missing:
            raise CheckpointError(f"tokenizer lacks required token(s): {', '.join(missing)}")
        return cls(newline=newline[0], **ids)


class CheersTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: special tokens in text are recognised, no BOS is added."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None):
        _add_cheers_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.config = dict(config) if config else {}  # tokenizer_config.json content, kept for save()
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    @classmethod
    def from_dir(cls, path) -> "CheersTokenizer":
        path = Path(path)
        cfg_path = path / "tokenizer_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else None
        if (path / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:
                raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: {exc}") from exc
            return cls(tok, config)
        missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"no tokenizer in {path}: need tokenizer.json or vocab.json + merges.txt "
                                  f"(missing: {', '.join(missing)})")
        tok = build_bpe_from_vocab_merges(path / "vocab.json", path / "merges.txt",
                                          cfg_path if config is not None else None)
        return cls(tok, config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # placeholders are not vocabulary ids: show them as their marker tokens
        sub = {IMAGE_PLACEHOLDER: self.special.image, IMAGE_GEN_PLACEHOLDER: self.special.image_gen}
        return self.tokenizer.decode([sub.get(int(i), int(i)) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str:
        return self.config.get("chat_template", CHAT_TEMPLATE)

    def save(self, path) -> None:
        """Write tokenizer.json + tokenizer_config.json (official layout, Cheers tokens and chat template included)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "tokenizer.json") as tmp:
            self.tokenizer.save(str(tmp))
        cfg = copy.deepcopy(self.config) or dict(_DEFAULT_CONFIG)
        cfg["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())}
        cfg["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
