"""Scheduler side of eviction: the block manager that returns evicted blocks to vLLM.

`EvictingKVManager` is vLLM's `FullAttentionManager` for layers whose spec is
`EvictingKVSpec` (registered through `KVCacheSpecRegistry`, see `kv_spec.py`), modelled on
vLLM's R-SWA manager, which frees a middle gap of a running request:

- `remove_skipped_blocks` (vLLM calls it before every allocation of a request, with the
  processed token count and the prompt length): once the prompt is processed, the worker
  has compacted every layer into the first `num_keep_blocks` blocks, so blocks
  [num_keep_blocks, ⌊prompt / block_size⌋) go back to the block pool (they become
  vLLM's null block in the request's table). The counts come from
  `vllm_kvplug.eviction.packed.packed_plan(policy, prompt_len, layers, block_size)`, the
  same function the worker uses: no message from the worker is needed.
- Compaction rewrites the request's blocks, so an evicted request's blocks are never
  hashed (`cache_blocks` does nothing for it) and never a prefix-cache hit for another
  request, and the request itself never reads the prefix cache
  (`Request.skip_reading_prefix_cache`, set at creation by `patch_request` for prompts
  that will be evicted): compaction must not overwrite shared blocks.
- Preemption frees all blocks (vLLM's `free`); the recompute allocates them again and the
  gap is freed again once the prompt is processed.
- A request that sent `vllm_xargs.kvplug_eviction = "off"` (`eviction_request.evicts`) is
  served like any request of the plain quantized profile: nothing freed, hashed and
  prefix-cached as usual. `patch_request` records such requests at creation in
  `EvictionPlanner.opted_out` (weak references: the entry goes with the `Request`, which
  the scheduler keeps through preemption until the request finishes), since
  `remove_skipped_blocks` gets only the request id.

Engine-core counters for the metrics are kept in `EvictionCounters` (drained into
vLLM's scheduler stats by `eviction_metrics`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_kvplug.eviction.packed import PackedPlan, layer_budget, packed_plan
from vllm_kvplug.eviction.policies import EvictionPolicy
from vllm_kvplug.vllm_glue.eviction_request import evicts


@dataclass
class EvictionCounters:
    """What the engine core evicted since the last drain (summed over requests)."""

    requests: int = 0
    blocks_returned: int = 0
    tokens_evicted: float = 0.0  # prompt tokens dropped per (layer, KV head), summed
    kept_fractions: list[float] = field(default_factory=list)

    def drain(self) -> EvictionCounters:
        out = EvictionCounters(self.requests, self.blocks_returned, self.tokens_evicted,
                               self.kept_fractions)
        self.requests, self.blocks_returned, self.tokens_evicted = 0, 0, 0.0
        self.kept_fractions = []
        return out


class EvictionPlanner:
    """The policy and model depth an engine evicts with; shared by manager and Request."""

    def __init__(self, policy: EvictionPolicy, num_layers: int, block_size: int):
        self.policy, self.num_layers, self.block_size = policy, num_layers, block_size
        # requests that opted out of eviction, by id (the Request itself is the value)
        self.opted_out: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def plan(self, prompt_len: int) -> PackedPlan | None:
        if prompt_len <= 0:
            return None
        return packed_plan(self.policy, prompt_len, self.num_layers, self.block_size)

    def plan_for(self, request_id: str, prompt_len: int) -> PackedPlan | None:
        """The request's plan, None if it is not evicted (too short or opted out)."""
        if request_id in self.opted_out:
            return None
        return self.plan(prompt_len)

    def evicts(self, request) -> bool:
        return evicts(request.sampling_params) and self.plan(request.num_prompt_tokens) \
            is not None

    def kept_fraction(self, prompt_len: int) -> float:
        """Share of the prompt's (layer, head, token) entries the policy budgets keep."""
        kept = sum(layer_budget(self.policy, prompt_len, self.num_layers, layer)
                   for layer in range(self.num_layers))
        return kept / (self.num_layers * prompt_len)


# Without stats (offline engines by default) nothing drains the counters: bound the list.
MAX_PENDING_FRACTIONS = 10_000
_lock = threading.Lock()
_planner: EvictionPlanner | None = None
COUNTERS = EvictionCounters()


def active_planner() -> EvictionPlanner | None:
    """The planner of the engine core in this process (None elsewhere)."""
    return _planner


class EvictingKVManager(FullAttentionManager):
    """Full attention whose evicted prompts give their middle blocks back to the pool."""

    def __init__(self, kv_cache_spec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        global _planner
        self.planner = EvictionPlanner(kv_cache_spec.policy(), kv_cache_spec.num_layers,
                                       self.block_size)
        with _lock:
            _planner = self.planner
        patch_request()  # engine core, before any request exists
        from vllm_kvplug.vllm_glue.eviction_metrics import patch_scheduler_stats

        patch_scheduler_stats()
        self._freed: set[str] = set()  # requests whose gap was returned (this allocation)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None or request_id in self._freed:
            return
        plan = self.planner.plan_for(request_id, num_prompt_tokens)
        if plan is None or processed_computed_tokens < num_prompt_tokens:
            return
        blocks = self.req_to_blocks.get(request_id)
        if not blocks or len(blocks) < plan.tail_block:
            return
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, plan.num_keep_blocks, plan.tail_block)
        self._freed.add(request_id)
        with _lock:
            COUNTERS.requests += 1
            COUNTERS.blocks_returned += self.block_pool.get_num_free_blocks() - free_before
            fraction = self.planner.kept_fraction(num_prompt_tokens)
            COUNTERS.tokens_evicted += (1.0 - fraction) * num_prompt_tokens
            if len(COUNTERS.kept_fractions) < MAX_PENDING_FRACTIONS:  # stats may be off
                COUNTERS.kept_fractions.append(fraction)

    def cache_blocks(self, request, num_tokens: int, retention_interval=None) -> None:
        if self.planner.evicts(request):
            request.skip_reading_prefix_cache = True
            return  # compaction rewrites these blocks: never hash them
        super().cache_blocks(request, num_tokens, retention_interval=retention_interval)

    def free(self, request_id: str) -> None:
        self._freed.discard(request_id)
        super().free(request_id)

    def pop_blocks_for_free(self, request_id: str):
        self._freed.discard(request_id)
        return super().pop_blocks_for_free(request_id)

    def get_num_common_prefix_blocks(self, running_request_id: str) -> int:
        return 0  # no cascade attention over blocks that compaction rewrites


def patch_request() -> None:
    """Requests whose prompt will be evicted skip the prefix cache from the start; those
    that opted out are recorded for the manager (`EvictionPlanner.opted_out`)."""
    from vllm.v1.request import Request

    if getattr(Request, "_kvplug_patched", False):
        return
    original = Request.get_skip_reading_prefix_cache

    @functools.wraps(original)
    def get_skip_reading_prefix_cache(self) -> bool:
        planner = _planner
        if planner is not None:
            if not evicts(self.sampling_params):
                planner.opted_out[self.request_id] = self
            elif planner.plan(self.num_prompt_tokens) is not None:
                return True
        return original(self)

    Request.get_skip_reading_prefix_cache = get_skip_reading_prefix_cache
    Request._kvplug_patched = True
