"""Triton kernels of the quantized KV cache (installed as `vllm_kvplug.triton_kernels`).

* `write_kv`: fused rotate + quantize + planar pack + scatter of K and V into the paged
  cache (`kv_write.py`);
* `paged_attention`: varlen causal GQA attention that dequantizes the cache in the kernel,
  with a split-K (flash-decoding) path for small decode batches (`paged_attention.py`);
* `AttentionWorkspace`: preallocated split-K scratch;
* `blockdiag_hadamard`: the cached fp32 block-diagonal Hadamard matrix.

The format is defined by `vllm_kvplug.quant.paged` (`write_reference`,
`attention_reference`), which the tests compare these kernels against.
"""

from .kv_write import blockdiag_hadamard, write_kv
from .paged_attention import AttentionWorkspace, choose_num_splits, paged_attention

__all__ = ["AttentionWorkspace", "blockdiag_hadamard", "choose_num_splits",
           "paged_attention", "write_kv"]
