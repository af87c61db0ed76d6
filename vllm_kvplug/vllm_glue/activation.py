"""What happens once a profile is accepted for an engine: backend choice, model checks,
log line and metrics."""

from __future__ import annotations

import logging
import os

from vllm_kvplug.kv_footprint import bytes_per_token, model_kv_shape, vllm_bytes_per_token
from vllm_kvplug.metrics import get_metrics
from vllm_kvplug.profiles import ProfileError, ResolvedProfile

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
    if profile.quantization.key_offsets:
        logger.info("vllm-kvplug: K offsets %s subtracted before quantizing K",
                    profile.quantization.key_offsets)


def select_backend(engine_args, resolved: ResolvedProfile) -> None:
    """A quantizing profile runs on the plugin's backend (vLLM's CUSTOM slot).

    Options that cannot be combined with it are refused with the option's name.
    """
    if resolved.profile.quantization.method == "none":
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVBackend

    where = f"profile {resolved.source} quantizes the KV cache"
    dtype = str(engine_args.kv_cache_dtype)
    if dtype not in QuantizedKVBackend.supported_kv_cache_dtypes:
        raise ProfileError(f"{where}; it cannot be combined with --kv-cache-dtype {dtype}. "
                           "Drop --kv-cache-dtype (or use a profile without quantization).")
    chosen = engine_args.attention_backend or engine_args.attention_config.backend
    if chosen is not None and str(getattr(chosen, "name", chosen)).upper() != "CUSTOM":
        raise ProfileError(f"{where} with its own attention backend; it cannot be combined "
                           f"with --attention-backend {getattr(chosen, 'name', chosen)}. "
                           "Drop --attention-backend.")
    if engine_args.attention_config.backend is None:
        engine_args.attention_backend = AttentionBackendEnum.CUSTOM


def check_eviction(engine_args, resolved: ResolvedProfile) -> None:
    """Eviction is served by the quantized backend (CPU reference path or CUDA kernels),
    one pipeline stage, without speculative decoding; anything else stops startup naming
    the option. On GPUs it needs vLLM's V1 model runner (the worker-side hooks of
    `eviction_rows` wrap it), which this selects."""
    policy = resolved.profile.eviction.policy
    if policy == "none":
        return
    where = f"profile {resolved.source} sets eviction.policy={policy!r}"
    if resolved.profile.quantization.method == "none":
        raise ProfileError(f"{where}, which runs on the plugin's quantized KV backend; set "
                           "quantization.method (int4 or int2) in the profile, or set "
                           "eviction.policy to 'none'.")
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise ProfileError(f"{where}; this release serves eviction.policy on CPUs and "
                           f"NVIDIA GPUs, not on {current_platform.device_name or 'this device'}."
                           " Set eviction.policy to 'none' (or use a quantization-only "
                           "profile such as int4-hadamard).")
    if current_platform.is_cuda():
        use_v2 = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
        if use_v2 in ("1", "true"):
            raise ProfileError(f"{where}, which hooks vLLM's V1 model runner; it cannot be "
                               "combined with VLLM_USE_V2_MODEL_RUNNER=1. Unset it.")
        if use_v2 == "":
            logger.info("vllm-kvplug: eviction selects vLLM's V1 model runner "
                        "(VLLM_USE_V2_MODEL_RUNNER=0)")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the engine core
    if engine_args.speculative_config:
        raise ProfileError(f"{where}; it cannot be combined with --speculative-config. "
                           "Drop one of them.")
    if getattr(engine_args, "kv_transfer_config", None):
        raise ProfileError(f"{where}; it cannot be combined with --kv-transfer-config "
                           "(a KV connector would save or load blocks that eviction "
                           "rewrites). Drop one of them.")
    if int(engine_args.pipeline_parallel_size or 1) > 1:
        raise ProfileError(f"{where}; it cannot be combined with "
                           f"--pipeline-parallel-size {engine_args.pipeline_parallel_size}.")


def check_model(vllm_config, resolved: ResolvedProfile) -> None:
    """Refuse models the quantized-KV kernels do not handle, before any weight loads."""
    if resolved.profile.quantization.method == "none":
        return
    from vllm_kvplug.quant.recipe import KVRecipe
    from vllm_kvplug.vllm_glue.attention_backend import SUPPORTED_HEAD_SIZES

    model_config = vllm_config.model_config
    name = model_config.model
    where = f"profile {resolved.source} quantizes the KV cache, but model {name}"
    alternative = "Use a profile whose quantization.method is 'none' for this model."
    if model_config.use_mla:
        raise ProfileError(f"{where} uses multi-head latent attention (MLA), which the "
                           f"quantized KV format does not cover. {alternative}")
    if model_config.get_sliding_window() is not None:
        raise ProfileError(f"{where} uses sliding-window attention, which the quantized "
                           f"KV backend does not implement. {alternative}")
    head_size = model_config.get_head_size()
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ProfileError(f"{where} has head size {head_size}; the kernels support "
                           f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}. {alternative}")
    try:
        KVRecipe.from_section(resolved.profile.quantization).check_head_size(head_size)
    except ValueError as e:
        raise ProfileError(f"{where}: {e}") from None
    block_size = vllm_config.cache_config.block_size
    if block_size is not None and block_size % 16:
        raise ProfileError(f"{where}: --block-size {block_size} is not a multiple of 16, "
                           "which the quantized KV kernels need. Use 16, 32, 64 or 128.")
    if resolved.profile.quantization.key_offsets:
        from vllm_kvplug.quant.key_offsets import KeyOffsetsError, load_key_offsets

        try:
            load_key_offsets(resolved.profile.quantization.key_offsets).check_model(
                model_config.get_total_num_hidden_layers(),
                model_config.get_total_num_kv_heads(), head_size)
        except KeyOffsetsError as e:
            raise ProfileError(f"profile {resolved.source}, quantization.key_offsets, "
                               f"model {name}: {e}") from None
