"""The KV-cache spec of quantized layers, so vLLM's allocator sizes pages from the recipe.

vLLM sizes every page from the layer's `KVCacheSpec`. A layer served by the plugin's
backend reports `QuantizedKVSpec`, a `FullAttentionSpec` whose page holds the packed codes
and fp16 steps/minima of `vllm_kvplug.quant.paged.PagedLayout` (dtype uint8), registered
with vLLM's `KVCacheSpecRegistry` and managed like any full-attention layer. The spec is
emitted by wrapping `Attention.get_kv_cache_spec` (vLLM has no hook for a plugin spec).

With an eviction profile the layers report `EvictingKVSpec` instead: the same page, plus
the eviction section and the model's layer count, so that the scheduler-side manager
(`kv_manager.EvictingKVManager`, registered for it) computes the same block plan as the
workers from the prompt length alone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from typing import Self

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass(frozen=True, kw_only=True)
class QuantizedKVSpec(FullAttentionSpec):
    """Full attention whose page is `block_size * token_bytes` bytes (K and V, all heads)."""

    token_bytes: int = 0

    @property
    def real_page_size_bytes(self) -> int:
        return self.block_size * self.token_bytes

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        if any(s.token_bytes != specs[0].token_bytes for s in specs):
            raise ValueError("all quantized layers of one KV-cache group must use the "
                             "same recipe")
        return replace(merged, token_bytes=specs[0].token_bytes)


@dataclass(frozen=True, kw_only=True)
class EvictingKVSpec(QuantizedKVSpec):
    """A quantized layer whose prompts are evicted (profile `eviction` section as JSON)."""

    eviction: str = ""
    num_layers: int = 0

    def policy(self):
        from vllm_kvplug.eviction import policy_from_section
        from vllm_kvplug.profiles.schema import EvictionSection

        return policy_from_section(EvictionSection(**json.loads(self.eviction)))

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        merged = super().merge(specs)
        if any((s.eviction, s.num_layers) != (specs[0].eviction, specs[0].num_layers)
               for s in specs):
            raise ValueError("all evicting layers of one KV-cache group must use the same "
                             "eviction settings")
        return replace(merged, eviction=specs[0].eviction, num_layers=specs[0].num_layers)


def register_spec() -> None:
    """Register the specs with vLLM's registry (built-ins first: see the registry's trap)."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_kvplug.vllm_glue.kv_manager import EvictingKVManager

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(QuantizedKVSpec, FullAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
    KVCacheSpecRegistry.register(EvictingKVSpec, EvictingKVManager,
                                 uniform_type_base_spec=FullAttentionSpec)


def patch_attention_spec() -> None:
    """Make layers that run on the plugin's backend report `QuantizedKVSpec`."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_kvplug_spec_patched", False):
        return
    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVBackend, layout_for

        if spec is None or not issubclass(self.attn_backend, QuantizedKVBackend):
            return spec
        layout = layout_for(vllm_config, spec.num_kv_heads, spec.head_size, spec.block_size)
        fields = dict(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=torch.uint8,
            token_bytes=layout.page_bytes // spec.block_size,
        )
        eviction = eviction_from_config(vllm_config)
        if eviction is None:
            return QuantizedKVSpec(**fields)
        return EvictingKVSpec(**fields, eviction=json.dumps(eviction.model_dump()),
                              num_layers=num_attention_layers(vllm_config))

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._kvplug_spec_patched = True


def eviction_from_config(vllm_config):
    """The profile's `EvictionSection`, or None when the profile does not evict."""
    from vllm_kvplug.vllm_glue.engine_args import resolve_from_additional_config

    resolved = resolve_from_additional_config(vllm_config.additional_config)
    if resolved is None or resolved.profile.eviction.policy == "none":
        return None
    return resolved.profile.eviction


def num_attention_layers(vllm_config) -> int:
    """Layers of the model on this pipeline stage (PyramidKV's schedule is over them)."""
    model_config = vllm_config.model_config
    return model_config.get_num_layers(vllm_config.parallel_config)
