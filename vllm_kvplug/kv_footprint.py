"""KV-cache bytes per token of a model under a profile, from vLLM's own page math.

The passthrough profile stores exactly what vLLM stores, so its footprint is vLLM's
`FullAttentionSpec` page size for the configured `kv_cache_dtype`, divided by the block
size and summed over attention layers. Compressing profiles add their own formula here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvplug.profiles import Profile


@dataclass(frozen=True)
class ModelKVShape:
    """What determines a model's KV footprint (whole model, all tensor-parallel ranks)."""

    num_attention_layers: int
    num_kv_heads: int
    head_size: int
    model_dtype_bytes: int


def bytes_per_token(profile: Profile, shape: ModelKVShape, kv_cache_dtype: str) -> float:
    """Bytes of KV cache one token occupies under `profile`."""
    if profile.quantization.method != "none":
        from vllm_kvplug.quant.recipe import KVRecipe

        recipe = KVRecipe.from_section(profile.quantization)
        return (recipe.bytes_per_token_head(shape.head_size) * shape.num_kv_heads
                * shape.num_attention_layers)
    if not profile.is_passthrough:
        raise NotImplementedError(
            f"no footprint formula for profile '{profile.name}' in this release"
        )
    return vllm_bytes_per_token(shape, kv_cache_dtype)


def vllm_bytes_per_token(shape: ModelKVShape, kv_cache_dtype: str) -> float:
    """Bytes per token of vLLM's own cache for `kv_cache_dtype` (scales included)."""
    import torch
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    if kv_cache_dtype == "auto":
        dtype = {2: torch.bfloat16, 4: torch.float32, 1: torch.uint8}[shape.model_dtype_bytes]
    else:
        dtype = STR_DTYPE_TO_TORCH_DTYPE[kv_cache_dtype]
    block = 16
    spec = FullAttentionSpec(
        block_size=block,
        num_kv_heads=shape.num_kv_heads,
        head_size=shape.head_size,
        dtype=dtype,
        kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
    )
    return spec.page_size_bytes / block * shape.num_attention_layers


def model_kv_shape(vllm_config) -> ModelKVShape:
    """Read the KV shape of the served model from a `VllmConfig`."""
    model_config = vllm_config.model_config
    layers = model_config.get_num_layers_by_block_type(vllm_config.parallel_config, "attention")
    return ModelKVShape(
        num_attention_layers=layers * vllm_config.parallel_config.pipeline_parallel_size,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_size=model_config.get_head_size(),
        model_dtype_bytes=model_config.dtype.itemsize,
    )
