"""KV pages a request needs after eviction, under the two paged layouts of the design.

In vLLM 0.26 a page (block) holds `block_size` tokens × all H KV heads of one layer, and
all layers of a KV-cache group share the request's block ids, so a request holds as many
pages as its largest layer needs (../shared/notes/vllm-0.26-integration.md, section D):

- `padded` (pad to the largest head): each head keeps its L_h tokens in the standard
  layout, so a layer needs ceil(max_h L_h / block_size) pages, and the request
  ceil(max_{l,h} L_{l,h} / block_size).
- `packed` (head-packed, Ada-KV "flattened"): the compacted pages are a flat array of
  block_size × H (token, head) slots, head h at [off_h, off_h + L_h); a layer needs
  ceil(Σ_h L_h / (block_size × H)) pages and the request the maximum over layers.

`ideal` is what per-layer block tables would allow (not possible with shared block ids):
the mean over layers of the packed pages, a lower bound for both layouts.
Decode tokens are appended after the compacted prompt in every layout, so they add the same
pages to all of them and are left out here.
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("padded", "packed", "ideal")


def kv_pages(kept_tokens: torch.Tensor, block_size: int, layout: str = "packed") -> float:
    """Pages of one request for kept_tokens [L, H] (tokens per layer and KV head).

    `padded` and `packed` return whole pages (as a float); `ideal` a mean over layers.
    """
    kept = torch.as_tensor(kept_tokens)
    if kept.dim() != 2 or kept.numel() == 0:
        raise ValueError(f"kept_tokens must be [layers, heads], got {tuple(kept.shape)}")
    if bool((kept < 0).any()):
        raise ValueError("kept token counts must be >= 0")
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    heads = kept.shape[1]
    if layout == "padded":
        return float(math.ceil(int(kept.max()) / block_size))
    per_layer = [math.ceil(int(row.sum()) / (block_size * heads)) for row in kept]
    if layout == "packed":
        return float(max(per_layer))
    if layout == "ideal":
        return sum(per_layer) / len(per_layer)
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def full_kv_pages(prompt_len: int, block_size: int) -> int:
    """Pages of the uncompressed prompt: ceil(prompt_len / block_size)."""
    if prompt_len < 0 or block_size <= 0:
        raise ValueError(f"bad prompt_len {prompt_len} or block_size {block_size}")
    return math.ceil(prompt_len / block_size)
