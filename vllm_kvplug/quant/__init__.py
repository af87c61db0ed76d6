"""Quantized KV format: the recipe (from a profile) and its PyTorch reference.

The reference is the specification the Triton/CUDA kernels are tested against; it is not
yet wired into vLLM (no attention backend in this release).
"""

from vllm_kvplug.quant.recipe import QuantRecipe
from vllm_kvplug.quant.reference import (
    block_hadamard,
    dequantize,
    quantize,
    quantize_dequantize,
)

__all__ = ["QuantRecipe", "block_hadamard", "dequantize", "quantize", "quantize_dequantize"]
