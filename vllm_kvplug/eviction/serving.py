"""Worker-side eviction of one request, layer by layer, inside the attention forward.

`EvictedRequest` holds what one request needs between forward steps: its `PackedPlan`,
the observation-window queries of chunks that ended before the prompt did (per layer),
and each layer's packed offsets once compacted. `attend` runs one layer's attention for
the request's rows of a step (a prefill chunk or a decode token) at positions
[start, start + Q):

- rows before the prompt's end see the full cache (normal paged attention);
- the step whose rows reach the prompt's end scores the layer (SnapKV window: the last
  `window_tokens` prompt queries, from this chunk and the stash), selects the kept
  tokens per KV head (the policy's `keep_masks`, equal to `plan_layer`) and compacts
  them (`compact_layer`), after those rows — or, deferred, all layers at once after the
  last one (`evict_pending`);
- rows at or after the prompt's end see the packed prompt plus the tail
  (`attention_packed`).

So a chunk that runs past the prompt (a recompute after preemption prefills prompt and
generated tokens together) computes its post-prompt rows exactly as the decode steps did
the first time: they see the evicted cache. Pure PyTorch; the vLLM glue maps batch rows
to requests (`vllm_kvplug.vllm_glue.eviction_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvplug.eviction.packed import (
    PackedPlan,
    attention_packed,
    compact_layer,
    read_prompt_keys,
)
from vllm_kvplug.eviction.policies import EvictionPolicy
from vllm_kvplug.eviction.scoring import score_snapkv
from vllm_kvplug.quant.paged import PagedLayout, attention_reference
from vllm_kvplug.quant.reference import block_hadamard


def _device_ops(device: torch.device):
    """(read prompt keys, copy entries) for the cache's device: the Triton kernels on
    CUDA (one launch each instead of a dozen small operations), the PyTorch reference
    elsewhere."""
    if device.type == "cuda":
        from vllm_kvplug.triton_kernels.eviction import compact_entries, read_keys

        return read_keys, compact_entries
    return read_prompt_keys, None


# Bound on the fp32 SnapKV logits of the layers scored together (`evict_pending`).
SCORE_BYTES = 512 << 20


@dataclass
class EvictedRequest:
    """Eviction state of one request on one worker (all its layers)."""

    policy: EvictionPolicy
    plan: PackedPlan
    num_layers: int
    stash: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # layers whose eviction `observe` deferred: layer -> (cache, block ids, softmax scale)
    pending: dict[int, tuple] = field(default_factory=dict)
    offsets: dict[int, torch.Tensor] = field(default_factory=dict)
    # kept (token, head) entries of the prompt per layer, tail included (for metrics)
    kept_entries: dict[int, int] = field(default_factory=dict)

    @property
    def window_start(self) -> int:
        return self.plan.prompt_len - min(self.policy.window_tokens, self.plan.prompt_len)

    def compacted(self, layer: int) -> bool:
        return layer in self.offsets

    def kept_fraction(self, num_kv_heads: int) -> float | None:
        """Kept share of the prompt's (layer, token, head) entries, once all layers ran."""
        if len(self.kept_entries) < self.num_layers:
            return None
        total = self.num_layers * num_kv_heads * self.plan.prompt_len
        return sum(self.kept_entries.values()) / total

    def compacted_all(self) -> bool:
        return len(self.offsets) == self.num_layers

    def offsets_table(self) -> torch.Tensor:
        """int32 [num_layers, H + 1] packed offsets of every layer (all compacted)."""
        if not self.compacted_all():
            raise RuntimeError(f"{len(self.offsets)} of {self.num_layers} layers compacted")
        return torch.stack([self.offsets[layer] for layer in range(self.num_layers)]).int()

    def prompt_rows(self, start: int, rows: int) -> int:
        """How many of the rows [start, start + rows) are prompt rows (full-cache)."""
        return min(max(self.plan.prompt_len - start, 0), rows)

    def observe(self, layer: int, query: torch.Tensor, start: int, cache: torch.Tensor,
                layout: PagedLayout, block_ids: torch.Tensor, scale: float,
                defer: bool = False) -> bool:
        """Book-keeping of one layer for this request's rows query [Q, Hq, D] at positions
        [start, start + Q), after their K/V are written and the prompt rows attended:
        stash the observation-window queries and, in the chunk that reaches the prompt's
        end, evict the layer. True when it evicted (rows past the prompt then attend the
        packed layout). With `defer` the eviction waits for `evict_pending` (which does
        all deferred layers at once: far fewer, larger GPU operations); only valid when
        no row of this step reads the layer after the prompt."""
        prompt, end = self.plan.prompt_len, start + query.shape[0]
        if start == 0:  # a new prefill (or a recompute after preemption) of this layer
            self.stash.pop(layer, None)
            self.offsets.pop(layer, None)
            self.pending.pop(layer, None)
        elif self.compacted(layer) and start < prompt:
            raise RuntimeError(f"layer {layer}: prompt rows after compaction")
        lo, hi = max(start, self.window_start), min(end, prompt)
        if hi > lo:
            self.stash.setdefault(layer, []).append(query[lo - start:hi - start])
        if start < prompt <= end:
            self.pending[layer] = (cache, block_ids, scale)
            if not defer:
                self.evict_pending(layout)
                return True
        return False

    def attend(self, layer: int, query: torch.Tensor, start: int, cache: torch.Tensor,
               layout: PagedLayout, block_ids: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this request's rows query [Q, Hq, D] at positions
        [start, start + Q) of layer `layer` (the step's K/V are already written)."""
        rows = query.shape[0]
        end = start + rows
        out = torch.empty_like(query)
        before = self.prompt_rows(start, rows)
        if before:  # (`observe` below refuses prompt rows after compaction)
            device = query.device
            out[:before] = attention_reference(
                query[:before], cache, block_ids[None], torch.tensor([start + before],
                                                                     device=device),
                torch.tensor([0, before], device=device), layout, scale)
        self.observe(layer, query, start, cache, layout, block_ids, scale)
        if before < rows:
            if not self.compacted(layer):
                raise RuntimeError(f"layer {layer}: rows after the prompt before eviction "
                                   "(the chunk that ends the prompt was not seen)")
            positions = torch.arange(start + before, end, device=query.device)
            out[before:] = attention_packed(query[before:], positions, cache, layout,
                                            block_ids, self.offsets[layer], self.plan, end,
                                            scale)
        return out

    def evict_pending(self, layout: PagedLayout) -> None:
        """Score, select and compact every layer waiting in `pending`, with few GPU
        operations and one host synchronisation for all of them: SnapKV scores of several
        layers in one call (their heads folded together, in groups that bound the
        [heads, window, prompt] logits to SCORE_BYTES), the policy's keep masks of all
        layers at once (`keep_masks`), the packed offsets copied to the host once, then
        one compaction per layer."""
        layers = sorted(self.pending)
        prompt, heads = self.plan.prompt_len, layout.num_kv_heads
        windows = {}
        for layer in layers:
            windows[layer] = torch.cat(self.stash.pop(layer, []))
            if windows[layer].shape[0] != prompt - self.window_start:
                raise RuntimeError(f"layer {layer}: {windows[layer].shape[0]} observation-"
                                   f"window queries, expected {prompt - self.window_start}")
        device = self.pending[layers[0]][0].device
        read_keys, copy_entries = _device_ops(device)
        masks = []
        w, hq, _ = windows[layers[0]].shape
        size = max(1, SCORE_BYTES // (hq * w * prompt * 4)) if self.policy.uses_scores \
            else len(layers)
        for first in range(0, len(layers), size):
            group = layers[first:first + size]
            scores = None
            if self.policy.uses_scores:
                keys = torch.cat([read_keys(self.pending[lay][0], layout,
                                            self.pending[lay][1], prompt)
                                  for lay in group])  # [G·H, S, D]
                q = block_hadamard(torch.cat([windows[lay].transpose(0, 1) for lay in group])
                                   .float(), layout.recipe.hadamard_block)  # [G·Hq, W, D]
                scores = score_snapkv(q, keys, group=hq // heads,
                                      scale=self.pending[group[0]][2]
                                      ).view(len(group), heads, prompt)
            masks.append(self.policy.keep_masks(prompt, self.num_layers, group, heads,
                                                scores, device))
        keep = torch.cat(masks)[..., :self.plan.tail_start]  # [Lp, H, tail_start]
        offsets = torch.cat([torch.zeros(len(layers), 1, dtype=torch.long, device=device),
                             keep.sum(-1).cumsum(-1)], dim=1).cpu()  # [Lp, H + 1]
        tail = prompt - self.plan.tail_start
        for i, layer in enumerate(layers):
            cache, block_ids, _ = self.pending.pop(layer)
            compact_layer(cache, layout, block_ids, keep[i], int(offsets[i, -1]), self.plan,
                          copy_entries)
            self.offsets[layer] = offsets[i]
            self.kept_entries[layer] = int(offsets[i, -1]) + tail * heads
