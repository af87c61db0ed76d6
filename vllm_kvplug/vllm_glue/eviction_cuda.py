"""CUDA path of eviction: the kernel's per-row tables and the per-layer work of prefill rows.

The Triton attention kernel serves every row of a step in one launch; rows of requests
whose prompt was evicted read their head-packed prompt and the tail through two tables
(`triton_kernels.paged_attention(..., eviction=...)`): packed offsets int32 [rows, L, H + 1]
(a layer's view is strided) and the tail start int32 [rows]; rows first, so a step copies
only the rows in use to the device. `EvictionTables` keeps them in persistent
device buffers (allocated once by the metadata builder, before CUDA-graph capture), so
decode steps replayed from a full CUDA graph read the current step's values; a row that is
not evicted has zeros (the normal layout).

`plan_step` (the builder, every step, on the host) sorts the step's rows: rows after an
evicted prompt go into the tables; rows of an evicting request that still prefill its prompt
become `PrefillRow`s, whose per-layer work `forward` does after the layer's launch: stash the
observation-window queries and, in the chunk that reaches the prompt's end, evict (score,
select, compact: `EvictedRequest.observe`) — all layers at once after the last layer's
launch (`evict_pending`), or layer by layer when the chunk runs past the prompt (a recompute
after preemption), whose post-prompt rows then attend again over the packed layout. Steps with
prefill rows never run inside a full CUDA graph (`eviction_rows.patch_model_runner`), so
this host work always runs. The request states are those of `eviction_rows` (one dict per
worker, keyed by request id, dropped when the request finishes or is preempted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvplug.eviction.serving import EvictedRequest
from vllm_kvplug.quant.paged import PagedLayout


class EvictionTables:
    """Persistent per-row tables of one worker's evicted requests (device + host copy)."""

    def __init__(self, num_layers: int, max_rows: int, num_kv_heads: int, device) -> None:
        shape = (max_rows, num_layers, num_kv_heads + 1)
        self.offsets = torch.zeros(shape, dtype=torch.int32, device=device)
        self.tail = torch.zeros(max_rows, dtype=torch.int32, device=device)
        pin = torch.device(device).type == "cuda"
        self._offsets_host = torch.zeros(shape, dtype=torch.int32, pin_memory=pin)
        self._tail_host = torch.zeros(max_rows, dtype=torch.int32, pin_memory=pin)
        self._filled: tuple = ()  # (row, state) identities of the current content
        self._used = 0  # rows [0, used) may hold non-zero entries

    @property
    def max_rows(self) -> int:
        return self.tail.shape[0]

    def fill(self, rows: list[tuple[int, EvictedRequest]]) -> None:
        """Set the tables to these (row, compacted request state) pairs, zeros elsewhere;
        a no-op when they are the same as last step's (steady decode)."""
        key = tuple((row, id(state)) for row, state in rows)
        if key == self._filled:
            return
        used = max([row + 1 for row, _ in rows], default=0)
        if used > self.max_rows:
            raise RuntimeError(f"batch row {used - 1} past the eviction tables' "
                               f"{self.max_rows} rows")
        span = max(used, self._used)  # clears rows the previous content used
        self._offsets_host[:span].zero_()
        self._tail_host[:span].zero_()
        for row, state in rows:
            self._offsets_host[row] = state.offsets_table()
            self._tail_host[row] = state.plan.tail_start
        self.offsets[:span].copy_(self._offsets_host[:span], non_blocking=True)
        self.tail[:span].copy_(self._tail_host[:span], non_blocking=True)
        self._filled, self._used = key, used

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.offsets[:, layer], self.tail


@dataclass(frozen=True)
class PrefillRow:
    """A row of an evicting request whose tokens [position, position + end - start) are
    batch tokens [start, end) and start inside its prompt."""

    row: int
    start: int
    end: int
    position: int
    state: EvictedRequest


@dataclass(frozen=True)
class StepEviction:
    tables: EvictionTables
    prefill: tuple[PrefillRow, ...]


def plan_step(rows, policy, num_layers: int, block_size: int,
              query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor,
              tables: EvictionTables) -> StepEviction:
    """Sort one step's rows (`eviction_rows.BatchRows`) and fill the tables."""
    from vllm_kvplug.vllm_glue.eviction_rows import step_rows

    if not rows.req_ids:  # dummy runs and CUDA-graph captures
        tables.fill([])
        return StepEviction(tables, ())
    evicted, prefill = [], []
    for i, start, end, position, state in step_rows(
            rows, policy, num_layers, block_size, query_start_loc_cpu.tolist(),
            seq_lens_cpu.tolist()):
        if state is None:
            continue
        if position < state.plan.prompt_len:
            prefill.append(PrefillRow(i, start, end, position, state))
        elif not state.compacted_all():
            raise RuntimeError(f"request {rows.req_ids[i]}: rows after its prompt but only "
                               f"{len(state.offsets)} of {num_layers} layers evicted")
        else:
            evicted.append((i, state))
    tables.fill(evicted)
    return StepEviction(tables, tuple(prefill))


def forward(step: StepEviction, layer: int, query: torch.Tensor, cache: torch.Tensor,
            metadata, layout: PagedLayout, scale: float, output: torch.Tensor) -> None:
    """Attention of one layer for a step of an evicting engine, in place into `output`."""
    from vllm_kvplug.triton_kernels import paged_attention

    m = metadata
    paged_attention(query, cache, m.block_table, m.seq_lens, m.query_start_loc, layout,
                    scale, output, max_query_len=m.max_query_len,
                    max_seq_len=m.max_seq_len, workspace=m.workspace,
                    eviction=step.tables.layer(layer))
    for p in step.prefill:
        block_ids = m.block_table[p.row]
        before = p.state.prompt_rows(p.position, p.end - p.start)
        past_prompt = p.start + before < p.end
        # A chunk that ends at the prompt defers its eviction to the last layer (all layers
        # scored together); one that runs past it (a recompute) needs each layer evicted
        # before its post-prompt rows attend.
        if p.state.observe(layer, query[p.start:p.end], p.position, cache, layout,
                           block_ids, scale, defer=not past_prompt):
            if past_prompt:
                _attend_packed_rows(p, before, layer, query, cache, block_ids, layout,
                                    scale, output)
        elif layer == p.state.num_layers - 1 and p.state.pending:
            p.state.evict_pending(layout)


def _attend_packed_rows(p: PrefillRow, before: int, layer: int, query: torch.Tensor,
                        cache: torch.Tensor, block_ids: torch.Tensor, layout: PagedLayout,
                        scale: float, output: torch.Tensor) -> None:
    from vllm_kvplug.triton_kernels import paged_attention

    device = query.device
    rows = p.end - p.start - before
    seq_len = p.position + p.end - p.start
    offsets = p.state.offsets[layer].to(device=device, dtype=torch.int32)[None]
    tail = torch.tensor([p.state.plan.tail_start], dtype=torch.int32, device=device)
    out = output[p.start + before:p.end]
    paged_attention(query[p.start + before:p.end], cache, block_ids[None],
                    torch.tensor([seq_len], dtype=torch.int32, device=device),
                    torch.tensor([0, rows], dtype=torch.int32, device=device), layout,
                    scale, out, max_query_len=rows, max_seq_len=seq_len,
                    eviction=(offsets.contiguous(), tail))
