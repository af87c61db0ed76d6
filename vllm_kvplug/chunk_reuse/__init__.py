"""Chunk KV reuse at any position with selective recompute (CacheBlend / Cache-Craft).

The device-independent core, not yet wired into vLLM (see docs/chunk-reuse.md for the
integration plan):

* `markup`: how a request marks its chunks (``vllm_xargs``) and where they sit in the prompt;
* `hashing`: position-independent, tenant-isolated keys of chunk KV;
* `store`: the two-tier (device / host), byte-bounded chunk KV store and its eviction;
* `rope`: moving stored post-RoPE keys to new positions;
* `blend`: choosing the tokens to recompute and a reference of one blended layer.
"""

from vllm_kvplug.chunk_reuse.blend import (
    blend_attention_reference,
    chunk_start_mask,
    merge_kv,
    num_recompute_tokens,
    select_recompute_tokens,
    token_deviation,
)
from vllm_kvplug.chunk_reuse.hashing import chunk_key, make_layout_tag
from vllm_kvplug.chunk_reuse.markup import (
    ChunkLocation,
    ChunkMarkup,
    ChunkMarkupError,
    ChunkMarkupLimits,
    ChunkSpan,
    locate_chunks,
    parse_chunk_markup,
)
from vllm_kvplug.chunk_reuse.rope import (
    RopeParams,
    apply_rope,
    reposition_keys,
    reposition_rotated_keys,
    rope_params_from_config,
)
from vllm_kvplug.chunk_reuse.store import ChunkKV, ChunkStore, ChunkStoreError, ChunkStoreStats

__all__ = [
    "ChunkKV", "ChunkLocation", "ChunkMarkup", "ChunkMarkupError", "ChunkMarkupLimits",
    "ChunkSpan", "ChunkStore", "ChunkStoreError", "ChunkStoreStats", "RopeParams",
    "apply_rope", "blend_attention_reference", "chunk_key", "chunk_start_mask",
    "locate_chunks", "make_layout_tag", "merge_kv", "num_recompute_tokens",
    "parse_chunk_markup", "reposition_keys", "reposition_rotated_keys",
    "rope_params_from_config", "select_recompute_tokens", "token_deviation",
]
