"""Prompt weighting and CLIP chunking, the way ComfyUI reads an SD1.5 prompt.

Pure functions over strings and token ids; the tokenizer is passed in, so this
module needs neither torch nor transformers.

Syntax (ComfyUI's):

- ``(text)`` multiplies the weight of ``text`` by 1.1; nesting multiplies again:
  ``((text))`` is 1.21.
- ``(text:1.3)`` sets the weight to 1.3 (the last ``:`` in the group; if what
  follows it is not a number, the group is a plain 1.1 group and keeps the colon).
- ``(a, b:0.8)`` weights everything inside, so a span of words takes one weight.
- ``\\(`` and ``\\)`` are literal parentheses. Unbalanced parentheses stay literal.
- ``embedding:name`` refers to a textual-inversion embedding: its vectors take
  token places, with the weight of the text around them (``tokenize_weighted``'s
  ``embedding``). A name that resolves to nothing is dropped with a warning, as
  ComfyUI does when the embedding file is missing.

A weight belongs to every token of its text. The encoder applies it as
``z = (z - z_empty) * w + z_empty`` per token (see ``encoders.TextEncoder``).

Chunking: the tokens of a prompt go into chunks of ``length`` (77 for SD1.5):
start token, up to 75 prompt tokens, end token, padded with ``pad``. A weighted
segment shorter than 8 tokens that does not fit in the current chunk moves whole
to the next one; a longer one is split at the chunk boundary.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from .errors import KinemaError

WEIGHT_STEP = 1.1
MAX_WEIGHT = 100.0  # |weight| above this is a typo (1e40), not an emphasis: refused, as non-finite ones are
EMBEDDING_PREFIX = "embedding:"
KEEP_TOGETHER = 8  # a segment with fewer tokens is never split across chunks

# Escaped parentheses are hidden behind control characters while the groups are parsed.
_HIDDEN_CLOSE = "\0\1"
_HIDDEN_OPEN = "\0\2"

Token = tuple[int, float]  # (token id, weight)

log = logging.getLogger(__name__)


def _hide_escapes(text: str) -> str:
    return text.replace("\\)", _HIDDEN_CLOSE).replace("\\(", _HIDDEN_OPEN)


def _restore_escapes(text: str) -> str:
    return text.replace(_HIDDEN_CLOSE, ")").replace(_HIDDEN_OPEN, "(")


def split_groups(text: str) -> list[str]:
    """Split ``text`` into top-level parenthesised groups and the plain text between them.

    ``"a (b (c)) d"`` -> ``["a ", "(b (c))", " d"]``. A ``)`` without its ``(`` stays in
    the plain text, and so does everything after it up to the point where the count of
    parentheses returns to zero (ComfyUI's reading).
    """
    parts: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                parts.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(current + ch)
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        parts.append(current)
    return parts


class _BadWeight(ValueError):
    """A group's weight is not finite or beyond ``MAX_WEIGHT``: (group text, weight)."""


def _weighted(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in split_groups(text):
        if len(part) < 2 or part[0] != "(" or part[-1] != ")":
            out.append((part, weight))
            continue
        inner = part[1:-1]
        inner_weight = weight * WEIGHT_STEP
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1:])
                inner = inner[:colon]
            except ValueError:
                pass  # "(a:b)" is a 1.1 group whose text keeps the colon
        if not -MAX_WEIGHT <= inner_weight <= MAX_WEIGHT:  # also false for nan
            raise _BadWeight(part, inner_weight)
        out.extend(_weighted(inner, inner_weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    r"""A prompt as (text, weight) segments in reading order; escapes resolved.

    ``a (b:1.5) \(c\)`` -> ``[("a ", 1.0), ("b", 1.5), (" (c)", 1.0)]``.
    """
    try:
        return [(_restore_escapes(t), w) for t, w in _weighted(_hide_escapes(text), 1.0)]
    except _BadWeight as e:
        group, weight = _restore_escapes(e.args[0]), e.args[1]
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise KinemaError(
            f"prompt weight {weight:g} in '{group}' (prompt '{shown}') is not a usable weight: write a number from "
            f"{-MAX_WEIGHT:g} to {MAX_WEIGHT:g}, e.g. '(red fox:1.2)' (1 = as written, above 1 = more, below 1 = less)"
        ) from None


def split_words(segment: str) -> list[str]:
    """Split a segment before each ``embedding:`` that follows a space or a newline.

    Each piece is tokenized on its own (which only matters for where chunks break).
    """
    pieces = re.split(r"[ \n]" + re.escape(EMBEDDING_PREFIX), segment)
    words = [pieces[0]] + [EMBEDDING_PREFIX + p for p in pieces[1:]]
    return [w for w in words if w]


def take_embedding(word: str, embedding: Callable[[str], list[int] | None] | None = None) -> tuple[list[int], str]:
    """``(token ids, rest)`` of an ``embedding:name rest`` word: the ids ``embedding(name)`` gives for the
    embedding's vectors, and the text after the name, tokenized as usual.

    ComfyUI's lookup: the name is the first whitespace-separated word; where no embedding has that name and it
    carries commas, the name without them is tried, and its trailing commas stay in the text. A name that
    resolves to nothing (or no ``embedding`` given) is dropped with a warning.
    """
    words = word[len(EMBEDDING_PREFIX):].strip("\n").split()
    if not words:
        return [], ""
    name, rest = words[0], " ".join(words[1:])
    ids = embedding(name) if embedding is not None else None
    if ids is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            ids = embedding(stripped) if embedding is not None and stripped else None
            rest = f"{name[len(stripped):]} {rest}"
            name = stripped or name
    if ids is None:
        log.warning("the textual-inversion embedding 'embedding:%s' in the prompt was not found (Kinema looks in "
                    "ComfyUI's models/embeddings for <name>, <name>.safetensors, .pt, .bin): it is ignored", name)
    return list(ids or []), rest


def chunk_tokens(groups: list[list[Token]], start: int, end: int, pad: int, length: int = 77) -> list[list[Token]]:
    """Pack groups of weighted tokens into chunks of exactly ``length`` (start, tokens, end, padding).

    A group shorter than ``KEEP_TOGETHER`` tokens that does not fit in the current chunk
    closes it (end token, then ``pad``) and starts the next one; a longer group fills the
    chunk and continues in the next. There is always at least one chunk.
    """
    chunks: list[list[Token]] = []
    chunk: list[Token] = [(start, 1.0)]
    chunks.append(chunk)
    for group in groups:
        splittable = len(group) >= KEEP_TOGETHER
        while group:
            room = length - 1 - len(chunk)  # one slot stays for the end token
            if len(group) <= room:
                chunk.extend(group)
                break
            if splittable:
                chunk.extend(group[:room])
                group = group[room:]
                chunk.append((end, 1.0))
            else:
                chunk.append((end, 1.0))
                chunk.extend([(pad, 1.0)] * room)
            chunk = [(start, 1.0)]
            chunks.append(chunk)
    chunk.append((end, 1.0))
    chunk.extend([(pad, 1.0)] * (length - len(chunk)))
    return chunks


def tokenize_weighted(text: str, tokenize: Callable[[str], list[int]], start: int, end: int, pad: int,
                      length: int = 77, embedding: Callable[[str], list[int] | None] | None = None
                      ) -> list[list[Token]]:
    """A prompt as chunks of ``length`` (token id, weight) pairs, ready for the CLIP text model.

    ``tokenize(text)`` returns the token ids of ``text`` without start/end tokens; ``embedding(name)`` the ids
    standing for a textual-inversion embedding's vectors (one a vector, chunked like a word's), None when there
    is no such embedding.
    """
    groups: list[list[Token]] = []
    for segment, weight in parse_weights(text):
        for word in split_words(segment):
            if word.startswith(EMBEDDING_PREFIX):
                ids, word = take_embedding(word, embedding)
                if ids:
                    groups.append([(t, weight) for t in ids])
                if not word:
                    continue
            groups.append([(t, weight) for t in tokenize(word)])
    return chunk_tokens(groups, start, end, pad, length)


def has_weights(chunks: list[list[Token]]) -> bool:
    """True when any token's weight differs from 1.0 (the encoder then also encodes an empty prompt)."""
    return any(w != 1.0 for chunk in chunks for _, w in chunk)
