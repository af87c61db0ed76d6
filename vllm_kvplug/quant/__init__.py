"""Quantized KV format: the recipe (from a profile) and its PyTorch reference.

The reference is the specification the Triton kernels (`vllm_kvplug.triton_kernels`) are
tested against, and the CPU path of the attention backend; `paged.py` adds the page layout.
"""

from vllm_kvplug.quant.recipe import QuantRecipe
from vllm_kvplug.quant.reference import (
    block_hadamard,
    dequantize,
    quantize,
    quantize_dequantize,
)

__all__ = ["QuantRecipe", "block_hadamard", "dequantize", "quantize", "quantize_dequantize"]
