"""Content-addressed keys of stored chunk KV.

A chunk's key is a SHA-256 digest over a canonical byte encoding of everything that
decides whether stored KV may be reused for it:

* the chunk's token ids (not its text, not its position: the same tokens at another
  offset of another prompt give the same key, which is the point of chunk reuse);
* the model (`model_id`: name plus revision, and the LoRA adapter if any: different
  weights give different KV);
* the request's `cache_salt` (vLLM's per-request cache isolation: chunks are shared only
  between requests with the same salt; no salt is distinct from every salt);
* the KV layout (`layout_tag`: dtype / quantization recipe / head geometry), so that a
  chunk stored in one format is never read as another.

Unlike vLLM's prefix-block hashes, which chain each block to its predecessors, the key
does not depend on what precedes the chunk.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import torch

_DOMAIN = b"vllm-kvplug/chunk-kv/v1\x00"
_MAX_TOKEN_ID = 2**32 - 1


def _field(data: bytes) -> bytes:
    """Length-prefixed field, so that no two field tuples share an encoding."""
    return struct.pack("<Q", len(data)) + data


def _token_bytes(token_ids: Iterable[int] | torch.Tensor) -> tuple[int, bytes]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.is_complex():
            raise ValueError("token_ids tensor must be 1-D with an integer dtype")
        token_ids = token_ids.tolist()
    ids = list(token_ids)
    if not ids:
        raise ValueError("a chunk needs at least one token")
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _MAX_TOKEN_ID:
            raise ValueError(f"token ids must be integers in [0, 2^32), got {t!r}")
    return len(ids), struct.pack(f"<{len(ids)}I", *ids)


def chunk_key(token_ids: Iterable[int] | torch.Tensor, model_id: str,
              cache_salt: str | None, layout_tag: str) -> str:
    """Hex SHA-256 key of a chunk: same tokens, model, salt and layout ⇔ same key."""
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("model_id must be a non-empty string")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt must be a string or None, got {type(cache_salt).__name__}")
    if not isinstance(layout_tag, str) or not layout_tag:
        raise ValueError("layout_tag must be a non-empty string")
    n, tokens = _token_bytes(token_ids)
    h = hashlib.sha256(_DOMAIN)
    h.update(_field(model_id.encode()))
    # A presence byte keeps "no salt" apart from the empty salt.
    h.update(b"\x00" if cache_salt is None else b"\x01" + _field(cache_salt.encode()))
    h.update(_field(layout_tag.encode()))
    h.update(struct.pack("<Q", n))
    h.update(tokens)
    return h.hexdigest()


def make_layout_tag(fields: Mapping[str, object]) -> str:
    """Canonical ``key=value;...`` string (sorted keys) describing a KV layout.

    e.g. ``make_layout_tag({"kv": "int4-hadamard", "group": 64, "had_block": 64,
    "layers": 30, "kv_heads": 3, "head_size": 64})``. Keys and values must not contain
    ``=`` or ``;``.
    """
    parts = []
    for key in sorted(fields):
        value = str(fields[key])
        if any(c in str(key) + value for c in "=;"):
            raise ValueError(f"layout field {key!r}={value!r} contains '=' or ';'")
        parts.append(f"{key}={value}")
    if not parts:
        raise ValueError("a layout tag needs at least one field")
    return ";".join(parts)
