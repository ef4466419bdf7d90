"""Corpora: ``.jsonl`` (field ``text`` or ``input_ids``), ``.txt`` (blank-line separated) or a folder of ``.txt``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CusprunError


@dataclass(frozen=True)
class Document:
    """One document: text to tokenize, or token ids used exactly as given. ``where`` names it in messages."""

    where: str
    text: str | None = None
    input_ids: tuple[int, ...] | None = None


def read_text_file(path: Path) -> str:
    """A corpus file's text, or a one-line error (not UTF-8, unreadable)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CusprunError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CusprunError(f"cannot read corpus {path}: {exc.strerror}") from None


def _jsonl_document(path: Path, lineno: int, line: str) -> Document:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CusprunError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise CusprunError(f"{where}: expected a JSON object with 'text' or 'input_ids'")
    if "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CusprunError(f"{where}: 'input_ids' must be a list of non-negative integers")
        return Document(where, input_ids=tuple(ids))
    if isinstance(record.get("text"), str):
        try:  # JSON escapes can spell a lone surrogate ("\\ud800"), which no tokenizer takes
            record["text"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CusprunError(f"{where}: 'text' is not valid Unicode ({exc.reason} at {exc.start})") from None
        return Document(where, text=record["text"])
    raise CusprunError(f"{where}: expected a string field 'text' or a list field 'input_ids'")


def read_corpus(path: str | Path) -> list[Document]:
    """All documents of a corpus, in order."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".txt" and f.is_file())
        if not files:
            raise CusprunError(f"corpus folder {p} holds no .txt files")
        return [Document(str(f), text=read_text_file(f)) for f in files]
    if not p.exists():
        raise CusprunError(f"corpus not found: {p}")
    if p.suffix == ".jsonl":
        return [_jsonl_document(p, n, line) for n, line in enumerate(read_text_file(p).splitlines(), 1) if line.strip()]
    if p.suffix == ".txt":
        blocks = [b.strip() for b in read_text_file(p).replace("\r\n", "\n").split("\n\n")]
        return [Document(f"{p}#{i}", text=b) for i, b in enumerate(blocks) if b]
    raise CusprunError(f"corpus {p}: expected a .jsonl file, a .txt file or a folder of .txt files")


def corpus_sha256(path: str | Path) -> str:
    """Content hash of a corpus file, or of a folder's .txt files (names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(p.glob("*.txt")) if p.is_dir() else [p]:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def tokenize(documents: list[Document], tokenizer, max_tokens: int, vocab_size: int) -> list[list[int]]:
    """Token ids per document, truncated to ``max_tokens``; text is tokenized with the model's
    tokenizer adding its special tokens as it does by default."""
    out = []
    for doc in documents:
        if doc.input_ids is not None:
            ids = list(doc.input_ids)
            bad = next((i for i in ids if i >= vocab_size), None)
            if bad is not None:
                raise CusprunError(f"{doc.where}: token id {bad} is outside the model's vocabulary ({vocab_size})")
        else:
            if tokenizer is None:
                raise CusprunError(f"{doc.where}: text documents need a tokenizer, and the model has none "
                                   "(give pre-tokenized 'input_ids' instead)")
            ids = tokenizer(doc.text)["input_ids"]
        out.append(ids[:max_tokens])
    return out
