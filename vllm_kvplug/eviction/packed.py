"""The head-packed paged layout of an evicted prompt: plan, compaction and attention.

After eviction, one layer's kept (token, KV head) entries of the prompt are packed into the
request's first `num_keep_blocks` blocks, as a flat array of slots: flat slot e sits in
block e // (block_size × H), head region (e // block_size) % H, token slot e % block_size of
that block (a head region of a page holds block_size vectors, and all heads' vectors have
the same byte size, so any region can hold any head's vector). Head h owns the slots
[offsets[h], offsets[h+1]), its kept prompt positions before `tail_start` in increasing
order. The tail [tail_start, seq_len), tail_start = ⌊prompt / block_size⌋ × block_size,
keeps vLLM's normal layout: the prompt's last partial block (never evicted: it shares its
block with the first decode tokens) and every generated token. Blocks
[num_keep_blocks, tail_start / block_size) are freed.

Every policy keeps a fixed total per layer (H × its per-head budget B_l; Ada-KV only moves
tokens between the heads of a layer), so `packed_plan` computes the block counts from the
prompt length and the profile alone: num_keep_blocks = max_l ceil(B_l / block_size). The
scheduler frees blocks from that number and the worker compacts into at most that many,
with no message between them. A prompt whose plan frees nothing is not evicted at all.

Entries are copied as quantized bytes (codes, steps, minima of K and V: every (token,
head) vector is quantized on its own), so compaction is exact. K is stored after RoPE, so
positions need no change. Pure PyTorch over `vllm_kvplug.quant.paged.PagedLayout` pages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_kvplug.eviction.policies import EvictionPolicy, PyramidKV
from vllm_kvplug.quant.paged import PagedLayout, read_reference
from vllm_kvplug.quant.reference import block_hadamard, dequantize


@dataclass(frozen=True)
class PackedPlan:
    """Block counts of one evicted prompt (the same on the scheduler and the worker)."""

    prompt_len: int
    block_size: int
    num_keep_blocks: int

    @property
    def tail_start(self) -> int:
        """First position of the normal-layout tail: ⌊prompt / block_size⌋ × block_size."""
        return self.prompt_len // self.block_size * self.block_size

    @property
    def tail_block(self) -> int:
        return self.prompt_len // self.block_size

    @property
    def blocks_freed(self) -> int:
        return self.tail_block - self.num_keep_blocks


def layer_budget(policy: EvictionPolicy, prompt_len: int, num_layers: int,
                 layer: int) -> int:
    """B_l: the mean per-head budget of `layer` (its total is H × B_l for every policy)."""
    if isinstance(policy, PyramidKV):
        return int(policy.layer_budgets(prompt_len, num_layers)[layer])
    return policy.head_budget(prompt_len)


@functools.lru_cache(maxsize=4096)
def packed_plan(policy: EvictionPolicy, prompt_len: int, num_layers: int,
                block_size: int) -> PackedPlan | None:
    """The plan of a prompt, or None when eviction would free no block (not evicted).

    Cached (policies and plans are frozen): the scheduler asks for every allocation of an
    evicted request and the workers for every layer of every step."""
    if prompt_len <= 0 or block_size <= 0 or num_layers <= 0:
        raise ValueError(f"bad prompt_len {prompt_len}, num_layers {num_layers} or "
                         f"block_size {block_size}")
    if isinstance(policy, PyramidKV):
        largest = int(policy.layer_budgets(prompt_len, num_layers).max())
    else:
        largest = policy.head_budget(prompt_len)
    plan = PackedPlan(prompt_len, block_size, math.ceil(largest / block_size))
    return plan if plan.blocks_freed > 0 else None


def plan_layer(policy: EvictionPolicy, layer: int, num_layers: int, prompt_len: int,
               scores: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(budgets [H], kept positions per head) of one layer, as `policy.plan` would give
    for it: every policy decides a layer from that layer's scores alone."""
    heads = scores.shape[0]
    if isinstance(policy, PyramidKV):
        budgets = torch.full((heads,), layer_budget(policy, prompt_len, num_layers, layer),
                             dtype=torch.long)
    else:
        budgets = policy.budgets(prompt_len, 1, heads, [scores])[0]
    return budgets, policy.select(layer, scores, budgets)


def packed_offsets(kept: Sequence[torch.Tensor], tail_start: int) -> torch.Tensor:
    """[H + 1] int64 prefix sums (on the host) of the kept positions before `tail_start`
    per head."""
    counts = torch.stack([(positions < tail_start).sum() for positions in kept]).tolist()
    return torch.tensor([0] + counts, dtype=torch.long).cumsum(0)


def _slots(flat: torch.Tensor, block_ids: torch.Tensor, layout: PagedLayout):
    per_block = layout.block_size * layout.num_kv_heads
    return (block_ids[flat // per_block].long(), (flat // layout.block_size)
            % layout.num_kv_heads, flat % layout.block_size)


def compact(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
            kept: Sequence[torch.Tensor], plan: PackedPlan) -> torch.Tensor:
    """Move one layer's kept entries (positions < tail_start) into the head-packed slots
    of the request's first blocks, in place; returns the offsets [H + 1].

    cache: the layer's uint8 [num_blocks, page_bytes]; block_ids: the request's block
    table (at least tail_block entries); kept: sorted positions per head (`select`).
    """
    if len(kept) != layout.num_kv_heads:
        raise ValueError(f"kept sets for {len(kept)} heads, layout has {layout.num_kv_heads}")
    keep = torch.zeros(len(kept), plan.tail_start, dtype=torch.bool)
    for head, positions in enumerate(kept):
        keep[head, positions[positions < plan.tail_start]] = True
    offsets = packed_offsets(kept, plan.tail_start)
    compact_layer(cache, layout, block_ids, keep.to(block_ids.device), int(offsets[-1]),
                  plan)
    return offsets


def compact_layer(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
                  keep: torch.Tensor, total: int, plan: PackedPlan,
                  copy_entries=None) -> None:
    """`compact` from a keep mask [H, >= tail_start] bool on the cache's device (columns
    from tail_start on are ignored) holding `total` kept entries before tail_start: the
    entries in (head, position) order, with no host synchronisation. `copy_entries`
    (e.g. the Triton `compact_entries`) replaces the PyTorch copy `copy_entries_reference`;
    same arguments."""
    capacity = plan.num_keep_blocks * layout.block_size * layout.num_kv_heads
    if total > capacity:
        raise ValueError(f"{total} kept entries do not fit in "
                         f"{plan.num_keep_blocks} blocks ({capacity} slots)")
    keep = keep[:, :plan.tail_start]
    # the kept entries in (head, position) order: a stable sort puts them first
    flat = torch.sort((~keep).flatten().to(torch.uint8), stable=True).indices[:total]
    (copy_entries or copy_entries_reference)(cache, layout, block_ids, flat, keep.shape[1])


def copy_entries_reference(cache: torch.Tensor, layout: PagedLayout,
                           block_ids: torch.Tensor, flat: torch.Tensor, width: int) -> None:
    """Copy the entries `flat` (head·width + position, in packed order) into the packed
    slots 0..N-1 (all entries are read before any is written: overlaps are safe)."""
    bs = layout.block_size
    heads = torch.div(flat, width, rounding_mode="floor")
    positions = flat - heads * width
    src = (block_ids[positions // bs].long(), heads, positions % bs)
    dst = _slots(torch.arange(flat.shape[0], device=block_ids.device), block_ids, layout)
    for which in ("key", "value"):
        for view in layout.views(cache, which):
            view[dst] = view[src]  # the gather copies first: overlapping ranges are safe


def read_packed(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
                offsets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Dequantized (K [L_h, D], V [L_h, D]) float32 of every head's packed entries, in the
    rotated space (as `read_reference(..., rotated=True)`)."""
    out = []
    for h in range(layout.num_kv_heads):
        flat = torch.arange(int(offsets[h]), int(offsets[h + 1]))
        where = _slots(flat, block_ids, layout)
        kv = []
        for which, recipe in (("key", layout.recipe.key), ("value", layout.recipe.value)):
            codes, steps, minima = (t[where] for t in layout.views(cache, which))
            kv.append(dequantize(codes, steps, minima, recipe, rotated=True))
        out.append((kv[0], kv[1]))
    return out


def read_prompt_keys(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
                     prompt_len: int) -> torch.Tensor:
    """[H, S, D] rotated float32 keys of the (not yet evicted) prompt, for scoring (the
    values are not read)."""
    num_blocks = math.ceil(prompt_len / layout.block_size)
    codes, steps, minima = (t[block_ids[:num_blocks].long()]
                            for t in layout.views(cache, "key"))
    keys = dequantize(codes, steps, minima, layout.recipe.key, rotated=True)  # [nb,H,bs,D]
    return keys.transpose(0, 1).reshape(layout.num_kv_heads, -1, layout.head_size
                                        )[:, :prompt_len]


def attention_packed(query: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                     layout: PagedLayout, block_ids: torch.Tensor, offsets: torch.Tensor,
                     plan: PackedPlan, seq_len: int, scale: float) -> torch.Tensor:
    """Attention of query rows [Q, Hq, D] at absolute `positions` [Q] (all >= tail_start
    is not required, only >= prompt_len - 1 makes sense) over an evicted request: each KV
    head's packed entries (all visible) and the tail [tail_start, seq_len) (causal).
    Works in the rotated space like `attention_reference`; returns [Q, Hq, D] in query's
    dtype."""
    heads, bs = layout.num_kv_heads, layout.block_size
    group = query.shape[1] // heads
    block = layout.recipe.hadamard_block
    q = block_hadamard(query.float(), block)
    tail_len = seq_len - plan.tail_start
    if tail_len > 0:
        first = plan.tail_block
        last = math.ceil(seq_len / bs)
        tk, tv = read_reference(cache, block_ids[first:last], tail_len, layout)  # [T,H,D]
    else:
        tk = tv = query.new_zeros((0, heads, query.shape[-1]), dtype=torch.float32)
    tail_pos = torch.arange(plan.tail_start, seq_len, device=query.device)
    packed = read_packed(cache, layout, block_ids, offsets)
    out = torch.empty_like(q)
    for h in range(heads):
        pk, pv = packed[h]
        k = torch.cat([pk, tk[:, h]])
        v = torch.cat([pv, tv[:, h]])
        hidden = torch.cat([torch.zeros(len(pk), dtype=torch.bool, device=query.device)[None]
                            .expand(len(positions), -1),
                            tail_pos[None, :] > positions[:, None]], dim=1)  # [Q, K]
        qh = q[:, h * group:(h + 1) * group]  # [Q, g, D]
        s = torch.einsum("qgd,kd->gqk", qh, k) * scale
        s.masked_fill_(hidden[None], float("-inf"))
        out[:, h * group:(h + 1) * group] = torch.einsum(
            "gqk,kd->qgd", torch.softmax(s, -1), v)
    return block_hadamard(out, block).to(query.dtype)
