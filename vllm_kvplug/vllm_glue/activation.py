"""What happens once a profile is accepted for an engine: checks, log line and metrics."""

from __future__ import annotations

import logging

from vllm_kvplug.kv_footprint import bytes_per_token, model_kv_shape, vllm_bytes_per_token
from vllm_kvplug.metrics import get_metrics
from vllm_kvplug.profiles import ResolvedProfile

logger = logging.getLogger("vllm.kvplug")


def activate(vllm_config, resolved: ResolvedProfile) -> None:
    profile = resolved.profile
    shape = model_kv_shape(vllm_config)
    cache_dtype = vllm_config.cache_config.cache_dtype
    per_token = bytes_per_token(profile, shape, cache_dtype)
    baseline = vllm_bytes_per_token(shape, "auto")
    get_metrics().publish_profile(
        name=profile.name,
        source=resolved.source,
        bytes_per_token=per_token,
        baseline_bytes_per_token=baseline,
        settings={
            "quantization": profile.quantization.method,
            "eviction": profile.eviction.policy,
            "chunk_reuse": str(profile.chunk_reuse.enabled).lower(),
            "kv_cache_dtype": cache_dtype,
        },
    )
    logger.info(
        "vllm-kvplug: profile '%s' (%s) active; KV cache %.0f bytes/token "
        "(model dtype: %.0f)", profile.name, resolved.source, per_token, baseline,
    )
