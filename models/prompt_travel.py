"""Prompt travel: keyframed prompts, one conditioning per video frame.

A schedule names a prompt at some frames::

    0: a cat walking, photo
    16: a cat running
    32: a cat jumping, (motion blur:1.2)

A keyframe starts with ``<int>:`` at the start of the text, at the start of a line
or right after a comma (whitespace around it allowed), so ``0: a cat, 16: a dog``
works on one line and commas inside a prompt are fine unless ``<int>:`` follows
them. The FizzNodes form ``"0": "a cat", "16": "a dog"`` (quoted keys and values,
optional surrounding braces, JSON escapes in the values) reads as FizzNodes reads
it, as JSON: there a prompt may hold anything, ``, 12:`` and escaped quotes too. A text
with no keyframe at all is one prompt at frame 0, so a plain prompt still works.

Each keyframe prompt is encoded once; ``frame_contexts`` then gives every frame
its conditioning at sampling time, when the frame count is known:

- before the first keyframe: the first encoding; after the last: the last;
- between keyframes ``a < b``: ``t = (frame - a) / (b - a)`` and
  ``lerp`` (per element), ``slerp`` (per token vector along ``d``, see
  ``interpolate``) or ``none`` (the encoding of ``a`` held until ``b``);
- keyframes at or beyond the frame count are fine: the last frames move
  towards them without reaching them.

Encodings of prompts over 75 tokens (several 77-token chunks) are repeated
along the tokens to a common length (``guidance.match_token_lengths``: the
same attention result), then interpolated token by token.

Pure torch; no ComfyUI. Memory: the result ``[f, n, d]`` and temporaries the
size of one segment between two keyframes; never ``[f, k, n, d]``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

import torch

from .errors import KinemaError
from .guidance import match_token_lengths

INTERPOLATIONS = ("lerp", "slerp", "none")

# "Where a keyframe can start" = the start of the text, or after a newline or a comma. The number is matched
# loosely (signs, decimals, optional quotes) so that wrong frame numbers are reported instead of being read
# as prompt text.
_MARKER = re.compile(r'(?:^|(?<=[\n,]))[ \t\r]*(?P<q>"?)(?P<num>[+-]?\d+(?:\.\d*)?)(?P=q)[ \t]*:')
# A line that starts like a keyframe but is not one ("8; a dog", "8a: a dog", "1e3: a dog", "frame 8: a dog",
# "1,200: a dog", "'8': a dog", "8： a dog" with a full-width colon): reported, not read as more of the previous
# keyframe's prompt (or, after a comma, as another keyframe). (Lines like "style: anime" or "4k photo" stay prompt
# text.)
_BROKEN_MARKER = re.compile(
    r'(?:^|(?<=\n))[ \t\r]*["\']?(?:[+-]?\d[\w.,+-]*|[A-Za-z_]+[ \t]*\d+)["\']?[ \t]*[:;\uff1a\uff1b][^\n]*')
# A quoted key inside a quoted keyframe's prompt: the comma before it is missing ('"0": "a cat" "16": "a dog"')
_INNER_QUOTED_KEY = re.compile(r'"[ \t]*"[+-]?\d+(?:\.\d*)?"[ \t]*:')
# One quoted string: no quote inside but escaped ones ('"a \\"big\\" cat"')
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
#: the largest frame number a keyframe may name
MAX_FRAME = 1_000_000
_SLERP_EPS = 1e-6  # below this the great circle is undefined: parallel, opposite or zero vectors


def _quote(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def _prompt_text(raw: str) -> str:
    """A keyframe's prompt: whitespace and separating commas stripped, the quotes of a prompt that is one quoted
    string removed (its JSON escapes read). A prompt that only starts and ends with a quote ('"STOP" sign, "EXIT"')
    keeps its quotes, as Text Encode reads it."""
    text = raw.strip().rstrip(",").strip()
    if _QUOTED.fullmatch(text):
        try:
            value = json.loads(text)
        except ValueError:
            value = text[1:-1]
        text = value.strip()
    return text


def _frame_number(marker: str, num: str) -> int:
    """The frame a keyframe ``marker`` (as written, quoted in errors) names with ``num`` (matched loosely)."""
    if not re.fullmatch(r"[+-]?\d+", num):
        raise KinemaError(f"keyframe {_quote(marker)}: frame numbers must be whole numbers, got '{num}'")
    frame = int(num)
    if frame < 0:
        raise KinemaError(f"keyframe {_quote(marker)}: frame numbers start at 0, got {frame}")
    if frame > MAX_FRAME:
        raise KinemaError(f"keyframe {_quote(marker)}: frame numbers go up to {MAX_FRAME}, got {frame}")
    return frame


def _add_keyframe(keyframes: dict[int, tuple[str, str]], marker: str, frame: int, prompt: str) -> None:
    """``keyframes[frame] = (marker, prompt)``, or KinemaError for no prompt or a frame named twice (both quoted)."""
    if not prompt:
        raise KinemaError(f"keyframe {_quote(marker)} has no prompt: write one after the colon or remove it")
    if frame in keyframes:
        first = keyframes[frame][0]
        named = f"{_quote(marker)} appears twice" if first == marker else f"{_quote(first)} and {_quote(marker)}"
        raise KinemaError(f"frame {frame} has two keyframes ({named}): keep one")
    keyframes[frame] = (marker, prompt)


def _json_schedule(body: str) -> list[tuple[str, str]] | None:
    """The FizzNodes form read as FizzNodes reads it, a JSON object (braces optional, a trailing comma allowed):
    ``[(key, prompt)]`` in order, or None when ``body`` is not such an object of quoted numbers and quoted
    prompts. A prompt may then hold anything JSON allows, ``", 12: 30"`` and escaped quotes included."""
    if not body.startswith('"'):
        return None
    try:
        pairs = json.loads("{" + re.sub(r",\s*$", "", body) + "}", object_pairs_hook=list)
    except ValueError:
        return None
    if not all(isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+(?:\.\d*)?\s*", k) for k, v in pairs):
        return None
    return pairs


def parse_schedule(text: str) -> list[tuple[int, str]]:
    """A prompt schedule -> [(frame, prompt)] sorted by frame.

    Raises ``KinemaError`` quoting the offending part for: an empty schedule, a
    keyframe without a prompt, negative, duplicate or non-integer frame numbers,
    text before the first keyframe, and a ``{`` before the first keyframe that is not closed. Text with no
    keyframe is ``[(0, text)]``.
    """
    body = (text or "").strip()
    if body.startswith("{") and body.endswith("}"):  # the JSON form; "{red|blue} cat" stays a prompt
        inner = body[1:-1].strip()
        if not inner or _MARKER.search(inner):
            body = inner
    elif body.startswith("{") and _MARKER.match(body[1:].lstrip()):  # not a prompt that starts with '{'
        raise KinemaError(f"the prompt schedule opens a '{{' it does not close: {_quote(body)}; end it with '}}' "
                          "or remove the '{'")
    if not body:
        raise KinemaError("the prompt schedule is empty: write one keyframe a line, e.g. '0: a cat walking'")
    pairs = _json_schedule(body)
    if pairs is not None:
        keyframes: dict[int, tuple[str, str]] = {}
        for key, prompt in pairs:
            marker = json.dumps(key) + ":"
            _add_keyframe(keyframes, marker, _frame_number(marker, key.strip()), prompt.strip())
        return [(frame, prompt) for frame, (_, prompt) in sorted(keyframes.items())]
    markers = list(_MARKER.finditer(body))
    starts = {m.start() for m in markers}
    for broken in _BROKEN_MARKER.finditer(body):  # also with no keyframe at all ("frame 0: a cat\nframe 16: ...")
        if broken.start() not in starts and not _MARKER.match(body, broken.start()):
            hint = " without separators (1200, not 1,200)" if re.match(r"\s*[\"']?\d+,\d", broken.group(0)) else ""
            raise KinemaError(f"the prompt schedule line {_quote(broken.group(0))} starts like a keyframe but is not "
                              f"one: write '<frame>: <prompt>' (a whole number{hint}, then a colon), or join the "
                              "line to the prompt above it")
    if not markers:
        return [(0, body)]
    head = body[:markers[0].start()].strip()
    if head:
        raise KinemaError(f"the prompt schedule has text before its first keyframe: {_quote(head)}; start it with "
                          f"a frame number, e.g. '0: {head[:30]}'")
    keyframes = {}
    for i, m in enumerate(markers):
        marker = m.group(0).strip()
        frame = _frame_number(marker, m.group("num"))
        end = markers[i + 1].start() if i + 1 < len(markers) else len(body)
        raw = body[m.end():end]
        if m.group("q"):  # the FizzNodes form: a quoted prompt, closed, with no other quoted key inside
            inner = _INNER_QUOTED_KEY.search(raw)
            if inner:
                raise KinemaError(f"keyframe {_quote(marker)}: a comma is missing before "
                                  f"{_quote(inner.group(0)[1:].strip())} (write '\"0\": \"...\", \"16\": \"...\"')")
            text = raw.strip().rstrip(",").strip()
            if text.startswith('"') and (len(text) < 2 or not text.endswith('"')):
                raise KinemaError(f"keyframe {_quote(marker)}: its prompt {_quote(text)} opens a quote it does not "
                                  "close")
        _add_keyframe(keyframes, marker, frame, _prompt_text(raw))
    return [(frame, prompt) for frame, (_, prompt) in sorted(keyframes.items())]


def join_prompt(prompt: str, pre_text: str = "", app_text: str = "") -> str:
    """``pre_text, prompt, app_text`` without empty parts or doubled commas."""
    parts = [p.strip().strip(",").strip() for p in (pre_text or "", prompt, app_text or "")]
    return ", ".join(p for p in parts if p)


def stack_encodings(encodings: list[torch.Tensor]) -> torch.Tensor:
    """Keyframe encodings [1, n_i, d] (or [n_i, d]) -> [k, n, d] at one token length.

    Different lengths (prompts of several 77-token chunks) are repeated along the
    tokens to a common multiple; ``KinemaError`` when there is no small one.
    """
    if not encodings:
        raise KinemaError("the prompt schedule has no keyframes")
    flat = [e if e.ndim == 3 else e.unsqueeze(0) for e in encodings]
    matched = match_token_lengths(flat)
    if matched is None:
        lengths = sorted({e.shape[1] for e in flat})
        raise KinemaError(
            f"the keyframe prompts encode to {', '.join(map(str, lengths))} tokens, which cannot be brought to one "
            "length: make the long prompts about equally long (in 75-token chunks) or shorten them")
    return torch.cat(matched)


def encode_schedule(encode: Callable[[str], tuple[torch.Tensor, torch.Tensor]], keyframes: list[tuple[int, str]],
                    pre_text: str = "", app_text: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode each keyframe's prompt once -> (cond [k, n, d], pooled [k, d]).

    ``encode(prompt) -> (cond [1, n_i, d], pooled [1, d])`` is ``TextEncoder.encode``;
    ``pre_text``/``app_text`` go around every prompt (``join_prompt``). A prompt that
    repeats at several keyframes (a hold) is encoded once.
    """
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    prompts = [join_prompt(p, pre_text, app_text) for _, p in keyframes]
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = encode(prompt)
    cond = stack_encodings([cache[p][0] for p in prompts])
    pooled = torch.cat([cache[p][1].reshape(1, -1) for p in prompts])
    return cond, pooled


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a, b [...,  d]; t [m, 1, ..., 1] -> [m, ..., d] (see ``interpolate``)"""
    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ua = a / na.clamp_min(_SLERP_EPS)
    ub = b / nb.clamp_min(_SLERP_EPS)
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    curved = sin_omega > _SLERP_EPS
    safe_sin = torch.where(curved, sin_omega, torch.ones_like(sin_omega))
    wa = torch.where(curved, torch.sin((1 - t) * omega) / safe_sin, 1 - t)
    wb = torch.where(curved, torch.sin(t * omega) / safe_sin, t)
    direction = wa * ua + wb * ub
    # near-parallel: the normalised straight line is the arc to float precision
    length = direction.norm(dim=-1, keepdim=True)
    direction = torch.where(curved, direction, direction / length.clamp_min(_SLERP_EPS))
    out = torch.lerp(na, nb, t) * direction
    # opposite or zero vectors have no great circle: fall back to the straight line
    degenerate = (na <= _SLERP_EPS) | (nb <= _SLERP_EPS) | (~curved & (dot < 0))
    return torch.where(degenerate, torch.lerp(a, b, t), out)


def interpolate(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """Blend two encodings at several ``t`` in [0, 1]: a, b [...]; t [m] -> [m, ...]

    ``lerp``: per element. ``slerp``: per vector along the last axis, the direction
    moves on the great circle from a's to b's and the norm linearly from |a| to |b|
    (so unit vectors stay unit vectors, and tokens of different norms do not sag
    towards zero in between). Nearly parallel vectors take the normalised straight
    line; opposite or zero vectors the plain straight line. ``none``: ``a``.
    t = 0 gives exactly ``a`` and t = 1 exactly ``b``.
    """
    if method not in INTERPOLATIONS:
        raise KinemaError(f"unknown interpolation '{method}': choose one of {', '.join(INTERPOLATIONS)}")
    t = t.to(a.dtype).reshape(-1, *([1] * a.ndim))
    if method == "none":
        return a.expand(t.shape[0], *a.shape).clone()
    if method == "lerp":
        out = torch.lerp(a.expand(t.shape[0], *a.shape), b.expand(t.shape[0], *b.shape), t)
    else:
        out = _slerp(a, b, t)
    out = torch.where(t == 0, a, out)
    return torch.where(t == 1, b, out)


def frame_contexts(keyframes: list[int], encodings: torch.Tensor, num_frames: int, method: str) -> torch.Tensor:
    """Per-frame conditioning from keyframes: encodings [k, ...] -> [num_frames, ...]

    Works for token encodings [k, n, d] and pooled outputs [k, d] alike.
    ``keyframes``: k frame numbers, strictly increasing, >= 0 (any may lie at or past
    ``num_frames``).
    """
    keyframes = [int(k) for k in keyframes]
    if method not in INTERPOLATIONS:
        raise KinemaError(f"unknown interpolation '{method}': choose one of {', '.join(INTERPOLATIONS)}")
    if num_frames < 1:
        raise KinemaError(f"a video needs at least 1 frame, got {num_frames}")
    if not keyframes or len(keyframes) != encodings.shape[0]:
        raise KinemaError(f"the prompt schedule has {len(keyframes)} keyframes but {encodings.shape[0]} encodings")
    if keyframes[0] < 0 or any(b <= a for a, b in zip(keyframes, keyframes[1:])):
        raise KinemaError(f"keyframes must be increasing frame numbers from 0, got {keyframes}")
    out = torch.empty(num_frames, *encodings.shape[1:], dtype=encodings.dtype, device=encodings.device)
    first, last = keyframes[0], keyframes[-1]
    out[:min(first + 1, num_frames)] = encodings[0]
    if last < num_frames:
        out[last:] = encodings[-1]
    for j, (a, b) in enumerate(zip(keyframes, keyframes[1:])):
        start, stop = a, min(b, num_frames)  # frames a .. b-1 (t = 0 at a gives its encoding exactly)
        if start >= stop:
            continue
        t = (torch.arange(start, stop, dtype=torch.float64) - a) / (b - a)
        out[start:stop] = interpolate(encodings[j], encodings[j + 1], t, method)
    return out


def frame_pooled(keyframes: list[int], pooled: torch.Tensor, num_frames: int, method: str) -> torch.Tensor:
    """The pooled counterpart: pooled [k, d] -> [num_frames, d]."""
    return frame_contexts(keyframes, pooled, num_frames, method)


def resolve_conditioning(tensor: torch.Tensor, options: dict, num_frames: int) -> torch.Tensor:
    """A CONDITIONING entry's tensor at sampling time: [1|num_frames, n, d].

    A prompt schedule (``options["kinema_keyframes"]``) becomes one context per frame;
    any other conditioning is returned as it is.
    """
    keyframes = (options or {}).get("kinema_keyframes")
    if keyframes is None:
        return tensor
    return frame_contexts(list(keyframes), tensor, num_frames, (options or {}).get("kinema_interpolation", "lerp"))
