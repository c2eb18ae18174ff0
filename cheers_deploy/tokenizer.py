"""Qwen2 byte-level BPE tokenizer with the five Cheers tokens (docs/architecture.md §15.1, §19.5).

Loads `tokenizer.json` or rebuilds the official tokenizer from `vocab.json` + `merges.txt`; no transformers needed.

Typed text is text (docs/security.md, "Special-token strings in user text"). Two ways to encode:

* `encode(text)`: text the package writes (the chat template, the image prefix, training data). Special-token strings
  in it (`<|im_start|>`, `<image>`, ...) become their control tokens, as the official tokenizer does.
* `encode_plain(text)` and the untrusted pieces of `encode_chat`: text a user typed. Special-token strings in it stay
  text (`"<image>"` is the characters `<`, `image`, `>`, never the image marker or a placeholder, and `<|im_end|>`
  never ends the turn). Text without such strings gets exactly the official ids. Text that is not valid UTF-8 is
  refused with an InputError (`check_text`).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import CheckpointError, InputError
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
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def check_text(text, what: str = "prompt") -> str:
    """Text a user typed: a str that encodes as UTF-8. Bytes that are not UTF-8 arrive from the command line as lone
    surrogates (`--prompt $'\\xff'`); they are refused (InputError) with the position of the first one."""
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"code point U+{bad:04X}"
        raise InputError(f"the {what} is not valid UTF-8 text ({byte} at character {exc.start})") from None
    return text


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
    """Thin wrapper over `tokenizers.Tokenizer`, no BOS is added. `encode` recognises special-token strings (text the
    package writes); `encode_plain` and `encode_chat`'s untrusted pieces never do (text a user typed): see the
    module docstring."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, source: Optional[Path] = None):
        _add_cheers_tokens(tokenizer)
        self.tokenizer = tokenizer
        self.config = dict(config) if config else {}  # tokenizer_config.json content, kept for save()
        self.source = Path(source) if source is not None else None   # the file it was read from (for messages)
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        self._plain: Optional[Tokenizer] = None
        self._split_re = None

    @classmethod
    def from_dir(cls, path) -> "CheersTokenizer":
        path = Path(path)
        cfg_path = path / "tokenizer_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else None
        if (path / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:
                raise CheckpointError(f"cannot read {path / 'tokenizer.json'}: "
                                      f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
            return cls._checked(tok, config, path / "tokenizer.json")
        missing = [n for n in ("vocab.json", "merges.txt") if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"no tokenizer in {path}: need tokenizer.json or vocab.json + merges.txt "
                                  f"(missing: {', '.join(missing)})")
        tok = build_bpe_from_vocab_merges(path / "vocab.json", path / "merges.txt",
                                          cfg_path if config is not None else None)
        return cls._checked(tok, config, path / "vocab.json")

    @classmethod
    def _checked(cls, tok: Tokenizer, config, source: Path) -> "CheersTokenizer":
        try:
            return cls(tok, config, source)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    # ------------------------------------------------------------------ validation
    def max_id(self) -> int:
        """The largest id this tokenizer can produce (vocabulary and added tokens)."""
        ids = list(self.tokenizer.get_vocab(with_added_tokens=True).values())
        return max(ids) if ids else -1

    def check_vocab_size(self, vocab_size: int) -> None:
        """Refuse (CheckpointError naming the file) a tokenizer with ids the model has no embedding row for."""
        top = self.max_id()
        if top >= int(vocab_size):
            where = self.source if self.source is not None else "the tokenizer"
            raise CheckpointError(f"{where}: token id {top} ({self.id_to_token(top)!r}) is outside the model's "
                                  f"vocabulary of {int(vocab_size)} ids (config.json text_config.vocab_size)")

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Text the package writes (templates, training data): special-token strings become control tokens."""
        check_text(text, "text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Text a user typed: special-token strings in it stay text (never a control token or a placeholder). Ids
        equal `encode`'s for text without special-token strings."""
        check_text(text)
        ids = self._plain_tokenizer().encode(text, add_special_tokens=False).ids
        bad = sorted(set(ids) & self._control_ids())
        if bad:      # only a tokenizer that registers a control token as a plain (non-special) token gets here
            raise InputError(f"the prompt contains {self.id_to_token(bad[0])!r}, which this tokenizer always reads "
                             f"as a control token; remove it from the text")
        return ids

    def encode_chat(self, pieces: Iterable[Tuple[str, bool]]) -> list[int]:
        """Ids of a text made of pieces (text, trusted): trusted pieces (the chat template, written by the package)
        have their special-token strings turned into control tokens; untrusted pieces (what a user typed) never do.
        Text on both sides of a piece boundary is encoded as one run, exactly as the official tokenizer encodes the
        joined string, so a prompt without special-token strings gets the official ids."""
        runs: List[Union[int, Tuple[str, bool]]] = []
        text, user = [], False

        def flush():
            nonlocal text, user
            if text:
                runs.append(("".join(text), user))
            text, user = [], False

        for piece, trusted in pieces:
            if not trusted:
                check_text(piece)
                text.append(piece)
                user = True
                continue
            check_text(piece, "text")
            for part in self._split_special(piece):
                if isinstance(part, int):
                    flush()
                    runs.append(part)
                else:
                    text.append(part)
        flush()
        ids: List[int] = []
        for r in runs:
            if isinstance(r, int):
                ids.append(r)
            elif r[1]:
                ids += self.encode_plain(r[0])
            else:
                ids += self._plain_tokenizer().encode(r[0], add_special_tokens=False).ids
        return ids

    def _plain_tokenizer(self) -> Tokenizer:
        """A twin of the tokenizer that reads special-token strings as text (`encode_special_tokens`)."""
        if self._plain is None:
            twin = Tokenizer.from_str(self.tokenizer.to_str())
            twin.encode_special_tokens = True
            self._plain = twin
        return self._plain

    def _control_ids(self) -> set:
        ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        return ids | {int(v) for v in vars(self.special).values()} - {self.special.newline}

    def _split_special(self, text: str) -> list:
        """`text` cut at special-token strings: a list of str runs and int ids (longest match first)."""
        if self._split_re is None:
            specials = sorted((t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special),
                              key=len, reverse=True)
            self._split_re = re.compile("|".join(map(re.escape, specials))) if specials else False
        if not self._split_re:
            return [text] if text else []
        out, pos = [], 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self.tokenizer.token_to_id(m.group(0)))
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

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
