"""KV bytes per token (from vLLM's page math) and the Prometheus metrics."""

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vllm_kvplug.kv_footprint import ModelKVShape, bytes_per_token, vllm_bytes_per_token
from vllm_kvplug.metrics import KVPlugMetrics
from vllm_kvplug.profiles import load_profile

LLAMA_8B = ModelKVShape(num_attention_layers=32, num_kv_heads=8, head_size=128,
                        model_dtype_bytes=2)
SMOLLM2 = ModelKVShape(num_attention_layers=30, num_kv_heads=3, head_size=64,
                       model_dtype_bytes=2)


def test_bf16_bytes_per_token():
    # K and V, 2 bytes each: 2 * layers * kv_heads * head_size * 2
    assert vllm_bytes_per_token(LLAMA_8B, "auto") == 2 * 32 * 8 * 128 * 2 == 131072
    assert vllm_bytes_per_token(SMOLLM2, "auto") == 23040


def test_vllm_quantized_dtypes():
    assert vllm_bytes_per_token(LLAMA_8B, "fp8") == 65536
    # int4_per_token_head: half a byte per element plus a 4-byte scale per token, head, K/V
    assert vllm_bytes_per_token(LLAMA_8B, "int4_per_token_head") == 32 * 8 * (128 + 2 * 4)


def test_passthrough_profile_follows_vllm_dtype():
    none = load_profile("none").profile
    assert bytes_per_token(none, LLAMA_8B, "fp8") == 65536


def test_metrics_exposition():
    registry = CollectorRegistry()
    metrics = KVPlugMetrics(registry)
    metrics.publish_profile("none", "builtin:none", 65536, 131072,
                            {"quantization": "none", "eviction": "none",
                             "chunk_reuse": "false", "kv_cache_dtype": "fp8"})
    text = generate_latest(registry).decode()
    assert ('kvplug_profile_info{chunk_reuse="false",eviction="none",kv_cache_dtype="fp8",'
            'profile="none",quantization="none",source="builtin:none"} 1.0') in text
    assert 'kvplug_kv_cache_bytes_per_token{profile="none"} 65536.0' in text
    assert 'kvplug_kv_cache_compression_ratio{profile="none"} 2.0' in text
    # A new profile replaces the old series rather than adding a second one.
    metrics.publish_profile("other", "x.yaml", 32768, 131072, {})
    text = generate_latest(registry).decode()
    assert 'profile="none"' not in text
    assert 'kvplug_kv_cache_compression_ratio{profile="other"} 4.0' in text


def test_metric_names_avoid_vllm_prefix():
    registry = CollectorRegistry()
    KVPlugMetrics(registry)
    names = [m.name for m in registry.collect()]
    assert names and all(n.startswith("kvplug_") for n in names)


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_profile_reference(bad):
    from vllm_kvplug.profiles import ProfileError

    with pytest.raises(ProfileError, match="empty kv-compression profile"):
        load_profile(bad)
