"""The plugin's Prometheus metrics, exported on vLLM's own `/metrics` endpoint.

vLLM serves `/metrics` from the default prometheus_client registry of the API-server
process, so collectors created here (in that process) appear next to vLLM's. Every name
starts with `kvplug_`: vLLM drops collectors whose names start with `vllm:` when its own
stat logger starts.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Info

PREFIX = "kvplug"


class KVPlugMetrics:
    """Collectors for one process; create once (see `get_metrics`)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.profile = Info(
            f"{PREFIX}_profile",
            "Active KV-cache compression profile of vllm-kvplug.",
            registry=registry,
        )
        self.kv_bytes_per_token = Gauge(
            f"{PREFIX}_kv_cache_bytes_per_token",
            "KV-cache bytes one token occupies under the active profile (all layers, "
            "all KV heads).",
            labelnames=["profile"],
            registry=registry,
        )
        self.compression_ratio = Gauge(
            f"{PREFIX}_kv_cache_compression_ratio",
            "KV bytes per token of the model dtype without compression divided by the "
            "active profile's bytes per token.",
            labelnames=["profile"],
            registry=registry,
        )

    def publish_profile(
        self, name: str, source: str, bytes_per_token: float, baseline_bytes_per_token: float,
        settings: dict[str, str],
    ) -> None:
        self.profile.info({"profile": name, "source": source, **settings})
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
