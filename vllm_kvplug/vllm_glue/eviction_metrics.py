"""Eviction metrics: from the engine core (where blocks are freed) to the API server's /metrics.

vLLM serves `/metrics` from the API-server process only, and the one free-form channel
from the engine core to it is `SchedulerStats.kv_connector_stats` (a dict shipped with
every scheduler step when stats are on). So:

- engine core: `Scheduler.make_stats` is wrapped to add, under the key `kvplug_eviction`,
  what the block manager counted since the last step (`kv_manager.COUNTERS.drain()`);
- API server: `StatLoggerManager.__init__` is wrapped to put `EvictionStatLogger` first
  among the stat loggers when the profile evicts (vLLM calls custom loggers before its own);
  it removes the key again (leaving `None` when nothing else is in the dict, so vLLM's
  connector loggers see what they would without the plugin) and feeds the plugin's
  Prometheus collectors (`vllm_kvplug.metrics`: `kvplug_eviction_*`).
"""

from __future__ import annotations

import functools

KEY = "kvplug_eviction"


def patch_scheduler_stats() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_kvplug_stats_patched", False):
        return
    original = Scheduler.make_stats

    @functools.wraps(original)
    def make_stats(self, *args, **kwargs):
        stats = original(self, *args, **kwargs)
        if stats is None:
            return stats
        from vllm_kvplug.vllm_glue.kv_manager import COUNTERS, active_planner

        if active_planner() is None or not COUNTERS.requests:
            return stats
        drained = COUNTERS.drain()
        payload = dict(stats.kv_connector_stats or {})
        payload[KEY] = {"requests": drained.requests,
                        "blocks_returned": drained.blocks_returned,
                        "tokens_evicted": drained.tokens_evicted,
                        "kept_fractions": drained.kept_fractions}
        stats.kv_connector_stats = payload
        return stats

    Scheduler.make_stats = make_stats
    Scheduler._kvplug_stats_patched = True


def take_payload(scheduler_stats) -> dict | None:
    """Remove and return the plugin's entry from `kv_connector_stats` (None if absent)."""
    data = getattr(scheduler_stats, "kv_connector_stats", None)
    if not data or KEY not in data:
        return None
    payload = data.pop(KEY)
    if not data:
        scheduler_stats.kv_connector_stats = None
    return payload


def make_logger_class():
    from vllm.v1.metrics.loggers import StatLoggerBase

    class EvictionStatLogger(StatLoggerBase):
        """Moves the engine core's eviction counters into the plugin's collectors."""

        def __init__(self, vllm_config, engine_index: int = 0):
            from vllm_kvplug.metrics import get_metrics

            self.metrics = get_metrics()

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0):
            payload = take_payload(scheduler_stats)
            if payload is not None:
                self.metrics.record_eviction(**payload)

        def log_engine_initialized(self):
            pass

    return EvictionStatLogger


def patch_stat_loggers() -> None:
    """Put the eviction logger first when the engine's profile evicts (API server)."""
    from vllm.v1.metrics.loggers import StatLoggerManager

    if getattr(StatLoggerManager, "_kvplug_patched", False):
        return
    original = StatLoggerManager.__init__
    logger_class = make_logger_class()

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, custom_stat_loggers=None, **kwargs):
        from vllm_kvplug.vllm_glue.kv_spec import eviction_from_config

        if eviction_from_config(vllm_config) is not None:
            custom_stat_loggers = [logger_class, *(custom_stat_loggers or [])]
        original(self, vllm_config, *args, custom_stat_loggers=custom_stat_loggers,
                 **kwargs)

    StatLoggerManager.__init__ = __init__
    StatLoggerManager._kvplug_patched = True
