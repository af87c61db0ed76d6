"""How a request marks its reusable chunks, and where those chunks sit in the prompt.

A request carries its chunk markup in `vllm_xargs` (OpenAI `extra_body={"vllm_xargs":
{...}}`), which vLLM copies to `SamplingParams.extra_args`. vLLM only lets str, int,
float and flat lists of those through, so the markup uses exactly one of two flat forms:

* ``kvplug_chunks``: a list of document strings, in the order they appear in the prompt.
  Each is tokenized alone and located in the prompt's token ids by exact match.
* ``kvplug_chunk_spans``: a flat list of token offsets ``[start0, end0, start1, end1,
  ...]`` (half-open ``[start, end)`` ranges of prompt token indices), for clients that
  tokenize themselves.

Optional: ``kvplug_chunk_recompute_ratio`` (a number in [0, 1]) overrides the profile's
``chunk_reuse.recompute_ratio`` for this request.

`parse_chunk_markup` validates the extra args and returns a `ChunkMarkup` (or None when
the request has no markup); `locate_chunks` maps the markup to token spans of a prompt.
Every problem raises `ChunkMarkupError` (a `ValueError`, which vLLM's OpenAI server
turns into a 400 response) whose message names the field and what is allowed.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

CHUNKS_FIELD = "kvplug_chunks"
SPANS_FIELD = "kvplug_chunk_spans"
RATIO_FIELD = "kvplug_chunk_recompute_ratio"
KNOWN_FIELDS = (CHUNKS_FIELD, SPANS_FIELD, RATIO_FIELD)
# Keys with this prefix belong to the chunk markup: an unknown one is a typo, not ignored.
FIELD_PREFIX = "kvplug_chunk"

# Hint appended when a text chunk is not found in the prompt's tokens.
_TOKENIZATION_HINT = (
    "the chunk's tokens, tokenized alone, do not occur in the prompt; start and end each "
    "chunk at a boundary the tokenizer keeps (e.g. a newline), or send token offsets in "
    f"vllm_xargs.{SPANS_FIELD}"
)


class ChunkMarkupError(ValueError):
    """Bad chunk markup in a request; the message names the field and what is allowed."""


@dataclass(frozen=True)
class ChunkMarkupLimits:
    """Bounds on what one request may mark (defaults suit RAG prompts)."""

    max_chunks: int = 64
    max_chunk_chars: int = 262_144
    max_chunk_tokens: int = 32_768
    min_chunk_tokens: int = 1


DEFAULT_LIMITS = ChunkMarkupLimits()


@dataclass(frozen=True)
class ChunkMarkup:
    """A request's validated chunk markup: either texts or token spans, never both."""

    texts: tuple[str, ...] | None = None
    spans: tuple[tuple[int, int], ...] | None = None
    recompute_ratio: float | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.spans or ())

    def recompute_ratio_or(self, profile_ratio: float) -> float:
        """This request's recompute ratio: its own override, else the profile's."""
        return profile_ratio if self.recompute_ratio is None else self.recompute_ratio


@dataclass(frozen=True)
class ChunkSpan:
    """Chunk `index` of the markup occupies prompt tokens ``[start, end)``."""

    index: int
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ChunkLocation:
    """Result of `locate_chunks`: spans found (in prompt order) and chunks not found."""

    spans: tuple[ChunkSpan, ...]
    missing: tuple[tuple[int, str], ...]  # (chunk index, reason)


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_chunk_markup(extra_args: Mapping[str, object] | None,
                       limits: ChunkMarkupLimits = DEFAULT_LIMITS) -> ChunkMarkup | None:
    """Validate the chunk markup in a request's `vllm_xargs` / `SamplingParams.extra_args`.

    Returns None when the request carries no chunk markup. Other ``kvplug_*`` keys (other
    features') are left alone; an unknown ``kvplug_chunk*`` key is an error.
    """
    if not extra_args:
        return None
    if not isinstance(extra_args, Mapping):
        raise ChunkMarkupError(f"vllm_xargs: must be an object, got {_type_name(extra_args)}")
    unknown = sorted(k for k in extra_args
                     if isinstance(k, str) and k.startswith(FIELD_PREFIX) and k not in KNOWN_FIELDS)
    if unknown:
        raise ChunkMarkupError(
            f"vllm_xargs.{unknown[0]}: unknown field; chunk markup fields are "
            + ", ".join(KNOWN_FIELDS))
    has_texts, has_spans = CHUNKS_FIELD in extra_args, SPANS_FIELD in extra_args
    if has_texts and has_spans:
        raise ChunkMarkupError(
            f"vllm_xargs: give either {CHUNKS_FIELD} (document strings) or {SPANS_FIELD} "
            "(token offsets), not both")
    ratio = _parse_ratio(extra_args[RATIO_FIELD]) if RATIO_FIELD in extra_args else None
    if has_texts:
        return ChunkMarkup(texts=_parse_texts(extra_args[CHUNKS_FIELD], limits),
                           recompute_ratio=ratio)
    if has_spans:
        return ChunkMarkup(spans=_parse_spans(extra_args[SPANS_FIELD], limits),
                           recompute_ratio=ratio)
    if ratio is not None:
        raise ChunkMarkupError(
            f"vllm_xargs.{RATIO_FIELD}: needs chunks; add {CHUNKS_FIELD} or {SPANS_FIELD}")
    return None


def _parse_ratio(value: object) -> float:
    field = f"vllm_xargs.{RATIO_FIELD}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ChunkMarkupError(f"{field}: must be a number between 0 and 1, got "
                               f"{_type_name(value)}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ChunkMarkupError(f"{field}: must be between 0 and 1, got {value!r}")
    return float(value)


def _check_count(field: str, n: int, limits: ChunkMarkupLimits) -> None:
    if n == 0:
        raise ChunkMarkupError(f"{field}: must list at least one chunk")
    if n > limits.max_chunks:
        raise ChunkMarkupError(f"{field}: at most {limits.max_chunks} chunks per request, "
                               f"got {n}")


def _parse_texts(value: object, limits: ChunkMarkupLimits) -> tuple[str, ...]:
    field = f"vllm_xargs.{CHUNKS_FIELD}"
    if isinstance(value, str):
        value = [value]  # vLLM passes a one-element list through unchanged; accept a string too
    if not isinstance(value, list):
        raise ChunkMarkupError(f"{field}: must be a list of document strings, got "
                               f"{_type_name(value)}")
    _check_count(field, len(value), limits)
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ChunkMarkupError(f"{field}[{i}]: must be a string (the chunk's text), got "
                                   f"{_type_name(text)}")
        if not text.strip():
            raise ChunkMarkupError(f"{field}[{i}]: must be a non-empty string")
        if len(text) > limits.max_chunk_chars:
            raise ChunkMarkupError(f"{field}[{i}]: at most {limits.max_chunk_chars} characters "
                                   f"per chunk, got {len(text)}")
    return tuple(value)


def _parse_spans(value: object, limits: ChunkMarkupLimits) -> tuple[tuple[int, int], ...]:
    field = f"vllm_xargs.{SPANS_FIELD}"
    allowed = "a flat list of token offsets [start0, end0, start1, end1, ...]"
    if not isinstance(value, list):
        raise ChunkMarkupError(f"{field}: must be {allowed}, got {_type_name(value)}")
    for i, offset in enumerate(value):
        if not _is_int(offset) or offset < 0:
            raise ChunkMarkupError(f"{field}[{i}]: must be a non-negative integer token offset, "
                                   f"got {offset!r}")
    if len(value) % 2:
        raise ChunkMarkupError(f"{field}: must be {allowed} (an even number of integers), "
                               f"got {len(value)} integers")
    spans = tuple((value[i], value[i + 1]) for i in range(0, len(value), 2))
    _check_count(field, len(spans), limits)
    previous_end = 0
    for i, (start, end) in enumerate(spans):
        where = f"{field}[{2 * i}:{2 * i + 2}]"
        n = end - start
        if n < limits.min_chunk_tokens:
            raise ChunkMarkupError(f"{where}: chunk [{start}, {end}) must hold at least "
                                   f"{limits.min_chunk_tokens} token(s) (end > start)")
        if n > limits.max_chunk_tokens:
            raise ChunkMarkupError(f"{where}: at most {limits.max_chunk_tokens} tokens per "
                                   f"chunk, got {n}")
        if start < previous_end:
            raise ChunkMarkupError(f"{where}: spans must be sorted and must not overlap "
                                   f"(starts at {start}, previous chunk ends at {previous_end})")
        previous_end = end
    return spans


def _find_tokens(haystack: bytes, needle: bytes, start_token: int, item: int) -> int:
    """Token index of the first occurrence of `needle` at or after `start_token`, or -1.

    Both are arrays of fixed-size token ids as bytes; byte matches that are not aligned
    on a token boundary are skipped.
    """
    pos = haystack.find(needle, start_token * item)
    while pos != -1 and pos % item:
        pos = haystack.find(needle, pos + 1)
    return -1 if pos == -1 else pos // item


def _as_token_bytes(token_ids: Sequence[int], what: str) -> bytes:
    try:
        return array("q", token_ids).tobytes()
    except (TypeError, OverflowError) as exc:
        raise ChunkMarkupError(f"{what}: token ids must be integers ({exc})") from None


def locate_chunks(markup: ChunkMarkup, prompt_token_ids: Sequence[int],
                  encode: Callable[[str], Sequence[int]] | None = None, *,
                  limits: ChunkMarkupLimits = DEFAULT_LIMITS,
                  strict: bool = True) -> ChunkLocation:
    """Map each marked chunk to its ``[start, end)`` token span in the prompt.

    Text chunks are tokenized with `encode` (the model's tokenizer, *without* special
    tokens such as BOS) and matched exactly, each at or after the end of the previous
    chunk, so chunks must be listed in prompt order. Token spans are checked against the
    prompt length. With `strict`, any chunk not found raises `ChunkMarkupError` naming
    it; otherwise it is reported in `ChunkLocation.missing` and left out of `spans`.
    """
    n_prompt = len(prompt_token_ids)
    spans: list[ChunkSpan] = []
    missing: list[tuple[int, str]] = []
    if markup.spans is not None:
        for i, (start, end) in enumerate(markup.spans):
            if end > n_prompt:
                missing.append((i, f"span [{start}, {end}) ends past the prompt "
                                   f"({n_prompt} tokens)"))
            else:
                spans.append(ChunkSpan(i, start, end))
        field = SPANS_FIELD
    else:
        if encode is None:
            raise TypeError("locate_chunks needs `encode` to locate text chunks")
        field = CHUNKS_FIELD
        prompt = _as_token_bytes(prompt_token_ids, "prompt")
        item = array("q").itemsize
        cursor = 0
        for i, text in enumerate(markup.texts or ()):
            tokens = list(encode(text))
            if len(tokens) < limits.min_chunk_tokens:
                missing.append((i, f"tokenizes to {len(tokens)} token(s), fewer than "
                                   f"{limits.min_chunk_tokens}"))
                continue
            if len(tokens) > limits.max_chunk_tokens:
                missing.append((i, f"tokenizes to {len(tokens)} tokens, more than "
                                   f"{limits.max_chunk_tokens}"))
                continue
            needle = _as_token_bytes(tokens, f"vllm_xargs.{CHUNKS_FIELD}[{i}]")
            start = _find_tokens(prompt, needle, cursor, item)
            if start == -1:
                anywhere = _find_tokens(prompt, needle, 0, item)
                if anywhere != -1:
                    missing.append((i, f"found at token {anywhere}, which overlaps or precedes "
                                       "the previous chunk; list chunks in prompt order "
                                       "without overlaps"))
                else:
                    missing.append((i, _TOKENIZATION_HINT))
                continue
            spans.append(ChunkSpan(i, start, start + len(tokens)))
            cursor = start + len(tokens)
    if strict and missing:
        def where(i: int) -> str:
            return f"[{2 * i}:{2 * i + 2}]" if markup.spans is not None else f"[{i}]"

        details = "; ".join(f"vllm_xargs.{field}{where(i)}: {reason}" for i, reason in missing)
        raise ChunkMarkupError(f"{len(missing)} of {markup.num_chunks} chunk(s) not located in "
                               f"the prompt: {details}")
    return ChunkLocation(spans=tuple(spans), missing=tuple(missing))
