"""Per-KV-head token eviction (SnapKV / PyramidKV / Ada-KV / StreamingLLM): PyTorch reference.

`score_snapkv` scores the prompt tokens per KV head from the prompt's last queries; a
policy (`policy_from_section(profile.eviction)`) turns the scores into per-(layer, head)
budgets and kept token sets; `kv_pages` counts the KV pages a request needs afterwards
under the two paged layouts of the design. `packed` (head-packed layout: plan, compaction,
attention) and `serving` (per-request worker state) are what vLLM serves on the CPU
through `vllm_kvplug.vllm_glue` (docs/eviction.md).
"""

from vllm_kvplug.eviction.pages import LAYOUTS, full_kv_pages, kv_pages
from vllm_kvplug.eviction.policies import (
    POLICIES,
    AdaKV,
    EvictionPolicy,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    keep_mask,
    policy_from_section,
)
from vllm_kvplug.eviction.scoring import score_snapkv

__all__ = [
    "LAYOUTS", "POLICIES", "AdaKV", "EvictionPolicy", "PyramidKV", "SnapKV", "StreamingLLM",
    "full_kv_pages", "keep_mask", "kv_pages", "policy_from_section", "score_snapkv",
]
