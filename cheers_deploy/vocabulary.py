"""The words a small model was trained on (`vocabulary.json` next to its weights), to warn when a prompt uses words it
never saw instead of answering with silent noise. The bundled tiny-shapes model ships one; a model without the file
(the official release) is never warned about."""

from __future__ import annotations

import re
from typing import Iterable, List, Optional

from .errors import CheckpointError
from .fileio import contained, read_json

VOCABULARY_FILE = "vocabulary.json"
_WORD = re.compile(r"[a-z]+")
MAX_WORDS = 100_000


class Vocabulary:
    def __init__(self, words: Iterable[str], model: str = "this model", hint: str = ""):
        self.words = {w.lower() for w in words}
        self.model = model
        self.hint = hint

    @classmethod
    def load(cls, folder) -> Optional["Vocabulary"]:
        path = contained(folder, VOCABULARY_FILE, f"{folder}: {VOCABULARY_FILE}")
        if not path.is_file():
            return None
        data = read_json(path, max_bytes=16 * 2 ** 20)
        words = data.get("words")
        if not isinstance(words, list) or len(words) > MAX_WORDS or \
                not all(isinstance(w, str) and len(w) <= 256 for w in words):
            raise CheckpointError(f"{path}: field 'words' must be a list of at most {MAX_WORDS} strings")
        model, hint = data.get("model", "this model"), data.get("hint", "")
        if not isinstance(model, str) or not isinstance(hint, str) or len(model) > 256 or len(hint) > 1024:
            raise CheckpointError(f"{path}: fields 'model' and 'hint' must be short strings")
        return cls(words, model, hint)

    def to_dict(self) -> dict:
        return {"model": self.model, "hint": self.hint, "words": sorted(self.words)}

    def unknown(self, text: str) -> List[str]:
        """Words of `text` (lower-cased letters only; digits and punctuation ignored) outside the vocabulary."""
        seen, out = set(), []
        for w in _WORD.findall(text.lower()):
            if w not in self.words and w not in seen:
                seen.add(w)
                out.append(w)
        return out

    def unknown_words_warning(self, text: str) -> List[str]:
        bad = self.unknown(text)
        if not bad:
            return []
        listed = ", ".join(repr(w) for w in bad[:8]) + (" ..." if len(bad) > 8 else "")
        return [f"{self.model} never saw the word(s) {listed} in training: expect an unrelated result"
                + (f" ({self.hint})" if self.hint else "")]
