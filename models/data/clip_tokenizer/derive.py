"""Derive ``vocab.json`` and ``merges.txt`` (transformers' CLIPTokenizer format) from CLIP's BPE file.

The source is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (shipped by open_clip and
by OpenAI's ``clip`` package). The construction is CLIP's own:

1. the 256 byte characters (printable bytes as themselves, in byte order, then the other
   bytes mapped to U+0100 onwards, in byte order),
2. the same 256 characters with ``</w>`` (end of word) appended,
3. the first 48894 merges of the file (lines 2 to 48895), each merged pair as one token,
4. ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 tokens in all.

``merges.txt`` is the ``#version: 0.2`` header and the same 48894 merges, one ``a b`` a line.

Usage::

    python derive.py [BPE_GZ] [--check]

Without ``BPE_GZ`` the file is looked up in the installed open_clip package. ``--check``
compares with the files next to this script instead of writing them (exit status 1 on a
difference). ``tests/test_encoders.py`` runs the same comparison.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49152 minus the 256 byte tokens and 2 specials: 48894
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"


def byte_characters() -> list[str]:
    """The 256 characters standing for the bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def open_clip_bpe_path() -> str | None:
    """Where the installed open_clip keeps ``bpe_simple_vocab_16e6.txt.gz`` (open_clip is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def derive(bpe_gz: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab: token -> id, merges in rank order) from CLIP's gzipped BPE file."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(tokens) != 49408:
        raise ValueError(f"'{bpe_gz}' does not give CLIP's 49408 distinct tokens")
    return vocab, merges


def vocab_text(vocab: dict[str, int]) -> str:
    return json.dumps(vocab, ensure_ascii=False, indent=0) + "\n"


def merges_text(merges: list[tuple[str, str]]) -> str:
    return MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    bpe_gz = paths[0] if paths else open_clip_bpe_path()
    if bpe_gz is None:
        print("bpe_simple_vocab_16e6.txt.gz not found: pass its path", file=sys.stderr)
        return 2
    vocab, merges = derive(bpe_gz)
    files = {"vocab.json": vocab_text(vocab), "merges.txt": merges_text(merges)}
    status = 0
    for name, text in files.items():
        path = os.path.join(HERE, name)
        if check:
            with open(path, encoding="utf-8") as f:
                same = f.read() == text
            print(f"{name}: {'same' if same else 'DIFFERENT'}")
            status |= not same
        else:
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
