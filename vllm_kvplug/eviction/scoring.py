"""Token importance from the prompt's observation window (SnapKV scoring).

SnapKV (Li et al., 2024, arXiv:2404.14469) observes that the attention of the last few
prompt queries (the *observation window*, which usually holds the question) predicts
which earlier tokens generation will attend to. The score of a prompt token for one KV
head is the attention those window queries give it:

1. logits q·kᵀ / sqrt(d) of every window query against every prompt key, causal (a window
   query does not see the window tokens after it);
2. softmax over the keys, per query head;
3. summed over the window queries and over the query heads of the KV head's GQA group;
4. 1-D pooled along the sequence (stride 1, same length), so that the neighbours of an
   important token survive with it and the kept set stays locally contiguous.

Scores of one head sum to about W × group (one unit of attention per window query head),
so they are comparable across heads: Ada-KV's cross-head allocation relies on that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def score_snapkv(queries_window: torch.Tensor, keys: torch.Tensor, group: int | None = None,
                 pool_kernel: int = 7, pooling: str = "max",
                 scale: float | None = None) -> torch.Tensor:
    """Importance [H, S] of every prompt token for every KV head.

    queries_window: [Hq, W, D] post-RoPE queries of the prompt's last W tokens.
    keys: [H, S, D] post-RoPE keys of the whole prompt (the window included), H KV heads.
    group: query heads per KV head (Hq / H); inferred when None, checked when given.
    Query head j belongs to KV head j // group (the order of transformers' `repeat_kv`
    and of vLLM's GQA kernels).
    pool_kernel: odd width of the pooling (1: none). pooling: "avg" or "max". The default,
    max over 7, measured best on passkey retrieval (docs/eviction.md: average pooling over
    5 drops the digits of the key next to its most-attended token).
    scale: softmax scale, default 1 / sqrt(D).
    """
    if queries_window.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"queries_window must be [Hq, W, D] and keys [H, S, D], got "
                         f"{tuple(queries_window.shape)} and {tuple(keys.shape)}")
    hq, w, d = queries_window.shape
    h, s, dk = keys.shape
    if d != dk:
        raise ValueError(f"head size differs: queries {d}, keys {dk}")
    if h == 0 or hq % h:
        raise ValueError(f"{hq} query heads cannot be grouped over {h} KV heads")
    if group is None:
        group = hq // h
    if group * h != hq:
        raise ValueError(f"group {group} × {h} KV heads != {hq} query heads")
    if not 0 < w <= s:
        raise ValueError(f"observation window of {w} queries for a prompt of {s} tokens")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd and >= 1, got {pool_kernel}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")

    q = queries_window.float().reshape(h, group, w, d)
    logits = torch.einsum("hgwd,hsd->hgws", q, keys.float()) * (scale or d ** -0.5)
    # Window query i sits at prompt position s - w + i and sees keys 0 .. s - w + i.
    query_pos = torch.arange(s - w, s, device=keys.device)
    visible = torch.arange(s, device=keys.device)[None, :] <= query_pos[:, None]  # [W, S]
    logits = logits.masked_fill(~visible, float("-inf"))
    scores = torch.softmax(logits, dim=-1).sum(dim=(1, 2))  # [H, S]
    if pool_kernel > 1:
        pad = pool_kernel // 2
        if pooling == "avg":
            scores = F.avg_pool1d(scores[:, None], pool_kernel, stride=1, padding=pad,
                                  count_include_pad=False)[:, 0]
        else:
            scores = F.max_pool1d(scores[:, None], pool_kernel, stride=1, padding=pad)[:, 0]
    return scores
