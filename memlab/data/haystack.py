"""Offline haystack text for needle tasks: a synthetic filler and real text found on disk.

- ``synthetic``: short sentences repeated (the filler of the passkey test: nothing in it is worth
  remembering, and a model that reads it learns nothing that could answer a question).
- ``real``: English prose that every Linux machine with Python has: the GNU GPL v3 text
  (``/usr/share/common-licenses/GPL-3`` on Debian and Ubuntu), else CPython's own LICENSE.txt.
  Nothing is downloaded. ``real_text()`` names the file it used so that runs record it.

Text is turned into token ids once per (tokenizer, kind) and cut at sentence ends, so a needle
can be placed between two sentences at any depth and a prompt can be built to an exact length.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYNTHETIC_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def real_text_candidates() -> list[Path]:
    """Files of real prose, in order of preference."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    out = [Path("/usr/share/common-licenses/GPL-3")]
    for root in {sys.base_prefix, sys.prefix, "/usr"}:
        out.append(Path(root) / "lib" / version / "LICENSE.txt")
    extra = os.environ.get("MEMLAB_HAYSTACK_FILE")
    if extra:
        out.insert(0, Path(extra))
    return out


@dataclass(frozen=True)
class Text:
    """A haystack text with where it came from."""

    kind: str
    text: str
    source: str
    sha256: str


def synthetic_text(repeats: int = 400) -> Text:
    text = " ".join(SYNTHETIC_SENTENCES * repeats)
    return Text("synthetic", text, "memlab.data.haystack.SYNTHETIC_SENTENCES", _sha(text))


def real_text() -> Text:
    """The first readable file of ``real_text_candidates()``, whitespace collapsed."""
    for path in real_text_candidates():
        if path.is_file():
            raw = path.read_text(encoding="utf-8", errors="replace")
            text = re.sub(r"\s+", " ", raw).strip()
            if len(text.split()) >= 1000:
                return Text("real", text, str(path), _sha(text))
    raise ValueError(
        "no real-text haystack file found; looked for "
        + ", ".join(str(p) for p in real_text_candidates())
        + " (set MEMLAB_HAYSTACK_FILE to a long English text file)"
    )


def load(kind: str) -> Text:
    if kind == "synthetic":
        return synthetic_text()
    if kind == "real":
        return real_text()
    raise ValueError(f"haystack kind must be 'synthetic' or 'real', got {kind!r}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_sentences(text: str) -> list[str]:
    """Sentences ending with '.', '!' or '?' (the rest is glued to the next end)."""
    parts = re.split(r"(?<=[.!?])\s+", text)
    return [p for p in parts if p]


@dataclass
class TokenStream:
    """A haystack as token ids with the offsets where sentences start (needle slots)."""

    ids: list[int]
    starts: list[int]  # token offsets of sentence starts, ascending, starting with 0
    text: Text

    def window(self, start_sentence: int, n_tokens: int) -> tuple[list[int], list[int]]:
        """``n_tokens`` ids from sentence ``start_sentence`` on (wrapping around the text).

        Returns the ids and the offsets (within them) where sentences start.
        """
        if not self.ids:
            raise ValueError("empty haystack")
        out: list[int] = []
        slots: list[int] = []
        i = start_sentence % len(self.starts)
        while len(out) < n_tokens:
            a = self.starts[i]
            b = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.ids)
            slots.append(len(out))
            out.extend(self.ids[a:b])
            i = (i + 1) % len(self.starts)
        return out[:n_tokens], [s for s in slots if s <= n_tokens]


_STREAMS: dict[tuple[int, str], TokenStream] = {}


def token_stream(tokenizer: Any, kind: str) -> TokenStream:
    """Tokenize a haystack once per (tokenizer, kind), sentence by sentence."""
    key = (id(tokenizer), kind)
    if key not in _STREAMS:
        text = load(kind)
        ids: list[int] = []
        starts: list[int] = []
        for sentence in split_sentences(text.text):
            starts.append(len(ids))
            # A leading space gives every sentence the tokens it has inside running text.
            ids.extend(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        _STREAMS[key] = TokenStream(ids, starts, text)
    return _STREAMS[key]
