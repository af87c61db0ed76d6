"""The plugin's Prometheus metrics, exported on vLLM's own `/metrics` endpoint.

vLLM serves `/metrics` from the default prometheus_client registry of the API-server
process, so collectors created here (in that process) appear next to vLLM's. Every name
starts with `kvplug_`: vLLM drops collectors whose names start with `vllm:` when its own
stat logger starts. With `--api-server-count > 1` vLLM sets PROMETHEUS_MULTIPROC_DIR before
it builds the engine config, so these gauges (multiprocess mode "mostrecent", as vLLM's
own) are written there and served by every API-server process. The profile is an
info-style gauge (value 1, labels) because prometheus_client's Info type has no
multiprocess support.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "kvplug"
PROFILE_LABELS = ["profile", "source", "quantization", "eviction", "chunk_reuse",
                  "kv_cache_dtype"]
KEPT_FRACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


class KVPlugMetrics:
    """Collectors for one process; create once (see `get_metrics`)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.profile = Gauge(
            f"{PREFIX}_profile_info",
            "Active KV-cache compression profile of vllm-kvplug (1 for the active one).",
            labelnames=PROFILE_LABELS,
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.kv_bytes_per_token = Gauge(
            f"{PREFIX}_kv_cache_bytes_per_token",
            "KV-cache bytes one token occupies under the active profile (all layers, "
            "all KV heads).",
            labelnames=["profile"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )
        self.compression_ratio = Gauge(
            f"{PREFIX}_kv_cache_compression_ratio",
            "KV bytes per token of the model dtype without compression divided by the "
            "active profile's bytes per token.",
            labelnames=["profile"],
            multiprocess_mode="mostrecent",
            registry=registry,
        )

        # eviction (counted in the engine core, brought here by vllm_glue/eviction_metrics)
        self.eviction_requests = Counter(
            f"{PREFIX}_eviction_requests",
            "Requests whose prompt was evicted (once per prefill; a recompute after "
            "preemption counts again).",
            registry=registry,
        )
        self.eviction_blocks_returned = Counter(
            f"{PREFIX}_eviction_blocks_returned",
            "KV-cache blocks returned to vLLM's block pool by eviction.",
            registry=registry,
        )
        self.eviction_tokens_evicted = Counter(
            f"{PREFIX}_eviction_tokens_evicted",
            "Prompt tokens evicted, per (layer, KV head) on average, summed over requests.",
            registry=registry,
        )
        self.eviction_kept_fraction = Histogram(
            f"{PREFIX}_eviction_kept_fraction",
            "Per request: share of the prompt's (layer, KV head, token) entries the "
            "policy's budgets keep.",
            buckets=KEPT_FRACTION_BUCKETS,
            registry=registry,
        )

    def record_eviction(self, requests: int, blocks_returned: int, tokens_evicted: float,
                        kept_fractions: list[float]) -> None:
        self.eviction_requests.inc(requests)
        self.eviction_blocks_returned.inc(blocks_returned)
        self.eviction_tokens_evicted.inc(tokens_evicted)
        for fraction in kept_fractions:
            self.eviction_kept_fraction.observe(fraction)

    def publish_profile(
        self, name: str, source: str, bytes_per_token: float, baseline_bytes_per_token: float,
        settings: dict[str, str],
    ) -> None:
        labels = {"profile": name, "source": source, **settings}
        self.profile.clear()
        self.profile.labels(**{k: labels.get(k, "") for k in PROFILE_LABELS}).set(1)
        self.kv_bytes_per_token.clear()
        self.compression_ratio.clear()
        self.kv_bytes_per_token.labels(profile=name).set(bytes_per_token)
        self.compression_ratio.labels(profile=name).set(
            baseline_bytes_per_token / bytes_per_token
        )


_METRICS: KVPlugMetrics | None = None


def get_metrics() -> KVPlugMetrics:
    """The process-wide collectors (prometheus_client refuses duplicate names)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = KVPlugMetrics()
    return _METRICS
