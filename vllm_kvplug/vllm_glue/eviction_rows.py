"""Worker side of eviction: which request each batch row is, and its eviction state.

vLLM's `CommonAttentionMetadata` carries no request ids or prompt lengths. The thinnest
reliable source is the model runner's own input batch, whose row order is the attention
metadata's: `patch_model_runner` wraps `GPUModelRunner._build_attention_metadata` (the V1
runner, which vLLM's CPU runner subclasses) to record `input_batch.req_ids` and
`input_batch.num_prompt_tokens` of the step's rows just before the metadata builders run
(`current_rows`), and which of them opted out of eviction (`eviction_request.evicts` on
the runner's `CachedRequestState.sampling_params`, which the runner keeps from the new
request's data until the request finishes, preemption included); dummy/profiling runs
(no `num_scheduled_tokens`) record nothing. It also wraps `_update_states` to drop the
state of finished and preempted requests.
Keying on request ids (rather than on a request's first block id) survives preemption
(new blocks) and needs no block-id uniqueness argument.

`attend` is the CPU attention forward of one layer when the engine evicts: each row's
request either has a prompt too short to evict or opted out (normal paged attention) or
is served by its `vllm_kvplug.eviction.serving.EvictedRequest` (created when its prefill
starts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_kvplug.eviction.packed import packed_plan
from vllm_kvplug.eviction.serving import EvictedRequest
from vllm_kvplug.quant.paged import PagedLayout, attention_reference
from vllm_kvplug.vllm_glue.eviction_request import evicts


@dataclass(frozen=True)
class BatchRows:
    """Request id and prompt length of every row of one step's batch, and the ids of
    the requests that opted out of eviction."""

    req_ids: tuple[str, ...]
    prompt_lens: tuple[int, ...]
    opted_out: frozenset[str] = frozenset()

    def policy(self, row: int, default):
        """The eviction policy of batch row `row` (None: its prompt is kept whole)."""
        return None if self.req_ids[row] in self.opted_out else default


_current: BatchRows | None = None
_states: dict[str, EvictedRequest] = {}
_finished_evicted = 0  # requests that finished with every layer evicted (this worker)


def current_rows() -> BatchRows | None:
    return _current


def evicted_requests() -> int:
    """Requests whose prompt this worker evicted in every layer: finished ones and live
    ones (the per-rank evidence `rank_report` gives)."""
    return _finished_evicted + sum(s.compacted_all() for s in _states.values())


def states() -> dict[str, EvictedRequest]:
    """Live per-request eviction states of this worker (tests and metrics read it)."""
    return _states


def batch_rows(runner, num_reqs: int) -> BatchRows:
    """The rows of the step a V1 model runner is about to run (its input batch's order)."""
    batch, requests = runner.input_batch, runner.requests
    ids = tuple(batch.req_ids[:num_reqs])
    opted_out = frozenset(rid for rid in ids if rid in requests
                          and not evicts(requests[rid].sampling_params))
    return BatchRows(ids, tuple(int(n) for n in batch.num_prompt_tokens[:num_reqs]),
                     opted_out)


def request_state(rid: str, policy, plan, num_layers: int, position: int
                  ) -> EvictedRequest:
    """The eviction state of request `rid` for a step whose rows start at `position`:
    created when its prefill starts (position 0: a new request, a recompute after
    preemption, or a new plan), else the existing one."""
    state = _states.get(rid)
    if state is None or (position == 0 and state.plan != plan):
        if position != 0:
            raise RuntimeError(f"request {rid}: no eviction state at position "
                               f"{position} (its prefill was not seen from the start)")
        state = _states[rid] = EvictedRequest(policy, plan, num_layers)
    return state


def _prefilling(runner, num_reqs: int) -> bool:
    """Whether any row of the step about to run is still in its prompt."""
    batch = runner.input_batch
    return bool((batch.num_computed_tokens_cpu[:num_reqs]
                 < batch.num_prompt_tokens[:num_reqs]).any())


def patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvplug_rows_patched", False):
        return
    build = GPUModelRunner._build_attention_metadata
    update = GPUModelRunner._update_states
    dispatch = GPUModelRunner._determine_batch_execution_and_padding

    @functools.wraps(build)
    def _build_attention_metadata(self, *args, **kwargs):
        global _current
        _current = None
        if kwargs.get("num_scheduled_tokens") is not None:
            _current = batch_rows(self, kwargs["num_reqs"])
        return build(self, *args, **kwargs)

    @functools.wraps(update)
    def _update_states(self, scheduler_output, *args, **kwargs):
        global _finished_evicted
        for rid in (scheduler_output.finished_req_ids or ()):
            state = _states.pop(rid, None)
            _finished_evicted += state is not None and state.compacted_all()
        for rid in (getattr(scheduler_output, "preempted_req_ids", None) or ()):
            _states.pop(rid, None)
        return update(self, scheduler_output, *args, **kwargs)

    @functools.wraps(dispatch)
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        # A step whose rows all have one token counts as a uniform decode batch and may
        # replay a full CUDA graph, where no host code runs. A prompt's last chunk can be
        # one token; eviction must run then (stash, score, compact), so a step with any
        # prompt row is not a uniform decode batch (it runs piecewise).
        if (kwargs.get("force_uniform_decode") is None and "num_reqs" in kwargs
                and _prefilling(self, kwargs["num_reqs"])):
            kwargs["force_uniform_decode"] = False
        return dispatch(self, *args, **kwargs)

    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._determine_batch_execution_and_padding = \
        _determine_batch_execution_and_padding
    GPUModelRunner._kvplug_rows_patched = True


def step_rows(rows: BatchRows, policy, num_layers: int, block_size: int,
              qsl: list[int], lens: list[int]):
    """(row, start, end, position, state) of every row of a step that has tokens: the
    row's batch tokens [start, end) sit at positions [position, position + end - start);
    `state` is the request's `EvictedRequest`, or None when its prompt is kept whole (too
    short to free a block, or opted out). The CPU forward (`attend`) and the CUDA step
    planner (`eviction_cuda.plan_step`) both walk a step through this."""
    if len(rows.req_ids) != len(lens):
        raise RuntimeError(f"the runner recorded {len(rows.req_ids)} rows for a batch of "
                           f"{len(lens)} requests")
    for i, (rid, prompt_len) in enumerate(zip(rows.req_ids, rows.prompt_lens)):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        position = lens[i] - (end - start)
        row_policy = rows.policy(i, policy)
        plan = None if row_policy is None else packed_plan(row_policy, prompt_len,
                                                           num_layers, block_size)
        state = None if plan is None else request_state(rid, row_policy, plan, num_layers,
                                                         position)
        yield i, start, end, position, state


def attend(policy, num_layers: int, layer: int, rows: BatchRows, query: torch.Tensor,
           cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, layout: PagedLayout, scale: float) -> torch.Tensor:
    """Attention of one layer for a batch whose requests may be evicted ([T, Hq, D])."""
    out = torch.zeros_like(query)
    for i, start, end, position, state in step_rows(
            rows, policy, num_layers, layout.block_size, query_start_loc.tolist(),
            seq_lens.tolist()):
        if state is None:
            out[start:end] = attention_reference(
                query[start:end], cache, block_table[i:i + 1], seq_lens[i:i + 1],
                torch.tensor([0, end - start], device=query.device), layout, scale)
        else:
            out[start:end] = state.attend(layer, query[start:end], position, cache,
                                          layout, block_table[i], scale)
    return out
