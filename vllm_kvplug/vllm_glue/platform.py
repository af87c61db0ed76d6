"""Backend registration: the plugin's attention backend fills vLLM's `CUSTOM` slot.

On CUDA, `attention_config.backend = CUSTOM` (set by the profile hook when a profile
quantizes the KV cache) selects it through vLLM's normal path. vLLM's CPU platform always
returns its own CPU backend, so there the selection is honoured by a small wrapper that
returns the `CUSTOM` backend when, and only when, `CUSTOM` was selected.
"""

from __future__ import annotations

import functools

BACKEND_PATH = "vllm_kvplug.vllm_glue.attention_backend.QuantizedKVBackend"


def register_backend() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    vllm_register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if getattr(CpuPlatform, "_kvplug_patched", False):
        return
    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend == AttentionBackendEnum.CUSTOM:
            return AttentionBackendEnum.CUSTOM.get_path()
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform._kvplug_patched = True
