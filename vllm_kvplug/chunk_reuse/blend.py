"""CacheBlend: which reused tokens to recompute, and a reference of one blended layer.

Reused chunk KV was computed without the text that now precedes the chunk, so it misses
that cross-attention. CacheBlend recomputes a small fraction of the tokens, those whose
KV deviates most from a full prefill. It measures this at the first layer(s): there the
fresh K/V of *all* tokens is cheap to get (one layer of the prompt), and tokens that
deviate a lot early tend to stay the ones that matter. Those tokens are recomputed in
every later layer. Their queries attend to the merged cache: reused KV for the other
tokens, fresh KV for the recomputed ones.

* `token_deviation`: per-token L2 distance between reused and fresh K (or V), over heads
  and head dims, summed in quadrature over the layers given.
* `select_recompute_tokens`: the ``ceil(ratio * T)`` most deviating tokens, always
  including the protected ones (e.g. each chunk's first tokens).
* `merge_kv` and `blend_attention_reference`: the pure-PyTorch specification of one
  blended attention layer, which a fused kernel or a nested forward must reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

TensorOrLayers = torch.Tensor | Sequence[torch.Tensor]


def _layers(x: TensorOrLayers) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def token_deviation(reused: TensorOrLayers, fresh: TensorOrLayers) -> torch.Tensor:
    """Per-token deviation ``[T]`` (float32) between reused and fresh K or V.

    Each argument is one tensor ``[T, heads, head_size]`` (any trailing dims) or a list of
    them (one per layer, same token count); the squared differences of all elements of a
    token are summed over every layer given, then square-rooted.
    """
    a, b = _layers(reused), _layers(fresh)
    if not a or len(a) != len(b):
        raise ValueError(f"need the same non-zero number of reused and fresh layers, got "
                         f"{len(a)} and {len(b)}")
    total = None
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dim() < 1:
            raise ValueError(f"layer {i}: reused {tuple(x.shape)} and fresh {tuple(y.shape)} "
                             "must have the same token-major shape")
        if total is not None and x.shape[0] != total.shape[0]:
            raise ValueError(f"layer {i} has {x.shape[0]} tokens, expected {total.shape[0]}")
        sq = (x.float() - y.float()).reshape(x.shape[0], -1).square().sum(dim=1)
        total = sq if total is None else total + sq
    assert total is not None
    return total.sqrt()


def num_recompute_tokens(num_tokens: int, ratio: float) -> int:
    """``ceil(ratio * num_tokens)``, robust to float noise (0.15 * 20 is 3, not 4)."""
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"recompute ratio must be in [0, 1], got {ratio!r}")
    return min(num_tokens, math.ceil(ratio * num_tokens - 1e-9))


def select_recompute_tokens(k_reused: TensorOrLayers, k_fresh: TensorOrLayers, ratio: float,
                            protected_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted int64 indices of the tokens to recompute.

    The budget is ``ceil(ratio * T)`` tokens. Protected tokens (a bool mask ``[T]``) are
    always selected and count against the budget; the rest of the budget goes to the other
    tokens in decreasing deviation (the lower index first on ties). With more protected
    tokens than budget, exactly the protected tokens are returned. Ratio 0 without
    protected tokens selects nothing; ratio 1 selects everything.
    """
    deviation = token_deviation(k_reused, k_fresh)
    n = deviation.shape[0]
    budget = num_recompute_tokens(n, ratio)
    if protected_mask is None:
        protected = torch.zeros(n, dtype=torch.bool, device=deviation.device)
    else:
        if protected_mask.dtype != torch.bool or protected_mask.shape != (n,):
            raise ValueError(f"protected_mask must be a bool tensor of shape ({n},), got "
                             f"{protected_mask.dtype} {tuple(protected_mask.shape)}")
        protected = protected_mask.to(deviation.device)
    remaining = max(budget - int(protected.sum()), 0)
    candidates = (~protected).nonzero().squeeze(1)
    order = torch.sort(deviation[candidates], descending=True, stable=True).indices
    chosen = torch.cat((protected.nonzero().squeeze(1), candidates[order[:remaining]]))
    return torch.sort(chosen).values


def chunk_start_mask(spans: Sequence[tuple[int, int]], num_tokens: int,
                     first_tokens: int = 1) -> torch.Tensor:
    """Bool mask ``[num_tokens]`` marking the first `first_tokens` tokens of each span."""
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    for start, end in spans:
        if not 0 <= start <= end <= num_tokens:
            raise ValueError(f"span [{start}, {end}) is outside [0, {num_tokens})")
        mask[start:min(end, start + first_tokens)] = True
    return mask


def merge_kv(k_reused: torch.Tensor, v_reused: torch.Tensor, k_new: torch.Tensor,
             v_new: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reused K/V ``[T, H, D]`` with rows `indices` replaced by the recomputed ``[S, H, D]``."""
    if k_new.shape[0] != indices.numel() or v_new.shape[0] != indices.numel():
        raise ValueError(f"{indices.numel()} indices but {k_new.shape[0]} new keys and "
                         f"{v_new.shape[0]} new values")
    k = k_reused.clone()
    v = v_reused.clone()
    k[indices] = k_new.to(k.dtype)
    v[indices] = v_new.to(v.dtype)
    return k, v


def blend_attention_reference(q: torch.Tensor, k_reused: torch.Tensor, v_reused: torch.Tensor,
                              k_new: torch.Tensor, v_new: torch.Tensor, indices: torch.Tensor,
                              scale: float | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One blended attention layer, in float32.

    `q` ``[S, Hq, D]`` holds the queries of the recomputed tokens (token `indices[s]`),
    `k_new` / `v_new` ``[S, Hkv, D]`` their fresh K/V; `k_reused` / `v_reused`
    ``[T, Hkv, D]`` the (already re-positioned) reused cache of the whole sequence. Each
    query attends causally (to tokens ``<= indices[s]``) to the merged cache; GQA when
    Hq is a multiple of Hkv. Returns (output ``[S, Hq, Dv]``, merged K, merged V).
    """
    k, v = merge_kv(k_reused, v_reused, k_new, v_new, indices)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(group, dim=1)  # [T, Hq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,thd->hst", q.float(), kf) * scale  # [Hq, S, T]
    visible = torch.arange(k.shape[0], device=k.device)[None, :] <= indices.to(k.device)[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    out = torch.einsum("hst,thd->shd", scores.softmax(dim=-1), vf)
    return out, k, v
