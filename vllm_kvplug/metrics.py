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

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

PREFIX = "kvplug"
PROFILE_LABELS = ["profile", "source", "quantization", "eviction", "chunk_reuse",
                  "kv_cache_dtype"]


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
