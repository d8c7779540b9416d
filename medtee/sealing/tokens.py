"""Token counts for the manifest: the data owner's tokenizer over the Gemma 3 chat-formatted training text.

Counting uses `medtee.data.chat.encode_arrays`, the encoder training uses, without any `max_length` cut: a
dialogue counts the tokens of its rendered text, and one the encoder drops (no doctor turn) counts 0. The
tokenizer is named in the manifest by `describe()`, whose fingerprint a TEE recomputes with `fingerprint()` to tell
whether the count applies to its own tokenizer. transformers is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from medtee.data import tokenizer as _tokenizer
from medtee.data.tokenizer import DEMO

_CHUNK = 512  # records per batched tokenizer call


def load_tokenizer(spec: str):
    """The tokenizer `--tokenizer spec` names (`medtee.data.tokenizer.load_tokenizer`, never downloading)."""
    try:
        return _tokenizer.load_tokenizer(spec)
    except ValueError as exc:
        raise ValueError(f"--tokenizer {spec}: {exc}") from None


def fingerprint(tokenizer) -> str:
    """SHA-256 hex of the tokenizer's serialized JSON (runtime padding/truncation settings left out) and BOS token."""
    doc = json.loads(tokenizer.backend_tokenizer.to_str())
    doc.pop("padding", None)
    doc.pop("truncation", None)
    payload = json.dumps({"bos_token": tokenizer.bos_token, "tokenizer": doc}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def describe(spec: str, tokenizer) -> str:
    """The manifest's `tokenizer` field: `<name> sha256:<fingerprint>`; a directory is named by its last part only."""
    name = Path(spec).name if spec != DEMO and Path(spec).is_dir() else spec
    return f"{name} sha256:{fingerprint(tokenizer)}"


class TokenCounter:
    """Running token count of chat records fed one at a time, tokenized `_CHUNK` records per batched call."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[dict] = []
        self._count = 0

    def __repr__(self) -> str:  # never the pending records
        return f"TokenCounter(tokens={self._count}, pending={len(self._pending)})"

    def add(self, record: dict, where: str) -> None:
        """Count `record`; a refusal names it by `where` (its file and line, or position), never by its id."""
        self._pending.append((where, record))
        if len(self._pending) >= _CHUNK:
            self._flush()

    def total(self) -> int:
        """Tokens of every record added so far."""
        self._flush()
        return self._count

    def _flush(self) -> None:
        if not self._pending:
            return
        from medtee.data.chat import encode_arrays

        batch, self._pending = self._pending, []
        encoded = encode_arrays(self._tokenizer, [r["messages"] for _, r in batch], max_length=sys.maxsize,
                                names=[where for where, _ in batch])
        self._count += sum(len(ids) for ids, _ in encoded)
