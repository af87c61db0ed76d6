"""The paged layout of the quantized KV cache, and its PyTorch reference (write + attention).

One layer's cache is a uint8 tensor `[num_blocks, page_bytes]`. A page holds `block_size`
tokens of every KV head, K first, then V:

    page = [K of head 0 | K of head 1 | ... | V of head 0 | V of head 1 | ...]

and one (head, K or V) region of `block_size * bytes_per_vector` bytes is

    codes   [block_size, head_size * bits / 8]  uint8, planar packing (reference.py)
    steps   [block_size, head_size / group]     fp16
    minima  [block_size, head_size / group]     fp16

so the codes of consecutive tokens are contiguous (coalesced loads) and the metadata sits
beside them. All vectors are stored in the rotated space (x · blockdiag(H_b)).

`write_reference` and `attention_reference` are the specification of the Triton kernels in
`vllm_kvplug.triton_kernels` and the CPU path of the attention backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvplug.quant.recipe import QuantRecipe, KVRecipe
from vllm_kvplug.quant.reference import block_hadamard, dequantize, quantize


@dataclass(frozen=True)
class RegionLayout:
    """Where one (head, K or V) region keeps codes, steps and minima (byte offsets)."""

    recipe: QuantRecipe
    head_size: int
    block_size: int

    @property
    def code_bytes(self) -> int:  # per token
        return self.head_size * self.recipe.bits // 8

    @property
    def groups(self) -> int:
        return self.head_size // self.recipe.group_size

    @property
    def steps_offset(self) -> int:
        return self.block_size * self.code_bytes

    @property
    def minima_offset(self) -> int:
        return self.steps_offset + self.block_size * self.groups * 2

    @property
    def region_bytes(self) -> int:
        return self.block_size * self.recipe.bytes_per_vector(self.head_size)


@dataclass(frozen=True)
class PagedLayout:
    """Byte layout of one page (one block of one layer)."""

    recipe: KVRecipe
    num_kv_heads: int
    head_size: int
    block_size: int

    def __post_init__(self) -> None:
        self.recipe.check_head_size(self.head_size)

    @property
    def key(self) -> RegionLayout:
        return RegionLayout(self.recipe.key, self.head_size, self.block_size)

    @property
    def value(self) -> RegionLayout:
        return RegionLayout(self.recipe.value, self.head_size, self.block_size)

    @property
    def value_offset(self) -> int:
        """Byte offset of V of head 0 in the page."""
        return self.num_kv_heads * self.key.region_bytes

    @property
    def page_bytes(self) -> int:
        return self.value_offset + self.num_kv_heads * self.value.region_bytes

    def check_cache(self, cache: torch.Tensor) -> None:
        """Raise a ValueError unless `cache` is this layout's uint8 [num_blocks, page_bytes]."""
        if cache.dtype != torch.uint8 or cache.dim() != 2 or cache.shape[1] != self.page_bytes:
            raise ValueError(f"expected a uint8 cache [num_blocks, {self.page_bytes}], "
                             f"got {cache.dtype} {tuple(cache.shape)}")

    def views(self, cache: torch.Tensor, which: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [B, H, bs, C] u8, steps [B, H, bs, G] f16, minima [B, H, bs, G] f16) views
        of K ("key") or V ("value") inside `cache` ([num_blocks, page_bytes] uint8)."""
        self.check_cache(cache)
        region = self.key if which == "key" else self.value
        base = 0 if which == "key" else self.value_offset
        nb, page, rb, bs = cache.shape[0], self.page_bytes, region.region_bytes, self.block_size
        off = cache.storage_offset()
        codes = cache.as_strided((nb, self.num_kv_heads, bs, region.code_bytes),
                                 (page, rb, region.code_bytes, 1), off + base)
        half = cache.view(torch.float16)  # page_bytes is even
        hoff = half.storage_offset()
        meta_shape = (nb, self.num_kv_heads, bs, region.groups)
        meta_stride = (page // 2, rb // 2, region.groups, 1)
        steps = half.as_strided(meta_shape, meta_stride,
                                hoff + (base + region.steps_offset) // 2)
        minima = half.as_strided(meta_shape, meta_stride,
                                 hoff + (base + region.minima_offset) // 2)
        return codes, steps, minima


def write_reference(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slot_mapping: torch.Tensor, layout: PagedLayout,
                    key_offset: torch.Tensor | None = None) -> None:
    """Rotate, quantize and scatter key/value [T, H, D] into `cache` at `slot_mapping` [T].

    Slot s is token s % block_size of block s // block_size; negative slots (padding) are
    skipped. `key_offset` (float32 [H, D], optional) is subtracted from every key first,
    in float32 and rounded back to key's dtype: (key.float() - key_offset).to(key.dtype).
    Attention over the cache is unchanged by it (softmax ignores a constant shift of a
    query's scores), so readers never add it back (see `quant/key_offsets.py`).
    """
    if key_offset is not None:
        if key_offset.shape != key.shape[1:]:
            raise ValueError(f"key_offset must be {tuple(key.shape[1:])}, got "
                             f"{tuple(key_offset.shape)}")
        key = (key.float() - key_offset.float()).to(key.dtype)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // layout.block_size, slots % layout.block_size
    for which, x, recipe in (("key", key, layout.recipe.key), ("value", value,
                                                                layout.recipe.value)):
        codes, steps, minima = layout.views(cache, which)
        packed, step, lo = quantize(x[valid], recipe)
        codes[blocks, :, offsets] = packed
        steps[blocks, :, offsets] = step
        minima[blocks, :, offsets] = lo


def read_reference(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int,
                   layout: PagedLayout, rotated: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V [num_tokens, H, D] (float32) of one sequence's blocks."""
    out = []
    for which, recipe in (("key", layout.recipe.key), ("value", layout.recipe.value)):
        codes, steps, minima = (t[block_ids.long()] for t in layout.views(cache, which))
        x = dequantize(codes, steps, minima, recipe, rotated=rotated)  # [nb, H, bs, D]
        x = x.permute(0, 2, 1, 3).reshape(-1, layout.num_kv_heads, layout.head_size)
        out.append(x[:num_tokens])
    return out[0], out[1]


def attention_reference(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        layout: PagedLayout, scale: float) -> torch.Tensor:
    """Causal attention of query [T, Hq, D] against the quantized cache, per sequence.

    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1], the last rows of its
    seq_lens[i] tokens (cached context first). GQA: query head h reads KV head
    h // (Hq // H). Attention runs in the rotated space and the output is rotated back.
    Returns [T, Hq, D] in query's dtype.
    """
    group = query.shape[1] // layout.num_kv_heads
    block = layout.recipe.hadamard_block
    out = torch.zeros_like(query)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    bs = layout.block_size
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        if end == start:
            continue
        num_blocks = -(-seq_len // bs)
        k, v = read_reference(cache, block_table[i, :num_blocks], seq_len, layout)
        q = block_hadamard(query[start:end].float(), block)  # [Q, Hq, D]
        k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] > q_pos[:, None]
        scores.masked_fill_(mask[None], float("-inf"))
        o = torch.einsum("hqs,shd->qhd", torch.softmax(scores, -1), v)
        out[start:end] = block_hadamard(o, block).to(query.dtype)
    return out
