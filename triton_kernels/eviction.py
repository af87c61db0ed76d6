"""Triton kernels of eviction on the GPU: prompt keys for scoring, and compaction.

Both replace a chain of small PyTorch operations per layer (gathers of the code, step and
minimum views, unpacking, casts), whose launch overhead dominated the cost of evicting a
prompt on the H100 (docs/eviction.md, "On CUDA"):

* `read_keys`: the dequantized rotated keys [H, S, D] (fp32) of one sequence's first S
  tokens, one program per (block, KV head); `vllm_kvplug.eviction.packed.read_prompt_keys`
  is its specification.
* `compact_entries`: moves the kept (token, KV head) entries of one layer into the
  head-packed slots (`vllm_kvplug.eviction.packed.compact_layer` is the specification): a
  gather of every kept entry's bytes (K codes, steps, minima, then V's) into a scratch
  buffer, then a scatter to the packed slots. Two launches, because a destination slot may
  be another entry's source (all reads finish before the first write).

An entry's bytes are described per column by the page layout (`_entry_columns`): column c
of a (block, region r, slot t) entry sits at byte
page·PAGE + (V_BASE + r·V_REGION if c is V else r·K_REGION) + base[c] + t·stride[c].
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_kvplug.quant.paged import PagedLayout

from .kv_write import _check_cache, _check_supported


@functools.lru_cache(maxsize=16)
def _entry_columns(layout: PagedLayout, device: str) -> tuple[torch.Tensor, ...]:
    """(base, stride, is_value) int32 [E] of every byte of one entry (see the module)."""
    base, stride, is_v = [], [], []
    for value, region in ((0, layout.key), (1, layout.value)):
        parts = ((0, region.code_bytes, region.code_bytes),
                 (region.steps_offset, 2 * region.groups, 2 * region.groups),
                 (region.minima_offset, 2 * region.groups, 2 * region.groups))
        for start, per_slot, length in parts:
            base += [start + i for i in range(length)]
            stride += [per_slot] * length
            is_v += [value] * length
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (base, stride, is_v))


@triton.jit
def _entry_bytes_kernel(cache_ptr, tmp_ptr, block_ids_ptr, flat_ptr, total, width,
                        col_base_ptr, col_stride_ptr, col_v_ptr,
                        E: tl.constexpr, E_P2: tl.constexpr, BLOCK: tl.constexpr,
                        BS: tl.constexpr, H: tl.constexpr, PAGE: tl.constexpr,
                        K_REGION: tl.constexpr, V_BASE: tl.constexpr,
                        V_REGION: tl.constexpr, GATHER: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = e < total
    c = tl.arange(0, E_P2)
    c_ok = c < E
    base = tl.load(col_base_ptr + c, mask=c_ok, other=0).to(tl.int64)
    stride = tl.load(col_stride_ptr + c, mask=c_ok, other=0).to(tl.int64)
    is_v = tl.load(col_v_ptr + c, mask=c_ok, other=0)
    if GATHER:  # source: entry (head, position) = divmod(flat, width), normal layout
        f = tl.load(flat_ptr + e, mask=ok, other=0)
        region = f // width
        pos = f - region * width
        block = tl.load(block_ids_ptr + pos // BS, mask=ok, other=0)
        slot = pos % BS
    else:  # destination: head-packed flat slot e
        block = tl.load(block_ids_ptr + e // (BS * H), mask=ok, other=0)
        region = (e // BS) % H
        slot = e % BS
    row = block.to(tl.int64) * PAGE
    k_off = row + region.to(tl.int64) * K_REGION
    v_off = row + V_BASE + region.to(tl.int64) * V_REGION
    addr = (tl.where(is_v[None, :] != 0, v_off[:, None], k_off[:, None]) + base[None, :]
            + slot.to(tl.int64)[:, None] * stride[None, :])
    both = ok[:, None] & c_ok[None, :]
    tmp = tmp_ptr + e.to(tl.int64)[:, None] * E + c[None, :]
    if GATHER:
        tl.store(tmp, tl.load(cache_ptr + addr, mask=both, other=0), mask=both)
    else:
        tl.store(cache_ptr + addr, tl.load(tmp, mask=both, other=0), mask=both)


def compact_entries(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
                    flat: torch.Tensor, width: int) -> None:
    """Move the entries `flat` (int64 [N], head·width + position, in packed order) of one
    layer's cache [num_blocks, page_bytes] into head-packed slots 0..N-1, in place."""
    _check_cache(cache, layout)
    total = flat.shape[0]
    if total == 0:
        return
    base, stride, is_v = _entry_columns(layout, str(cache.device))
    e = base.shape[0]
    tmp = torch.empty(total * e, dtype=torch.uint8, device=cache.device)
    block = 16
    grid = (triton.cdiv(total, block),)
    for gather in (True, False):
        _entry_bytes_kernel[grid](
            cache, tmp, block_ids, flat, total, width, base, stride, is_v,
            E=e, E_P2=triton.next_power_of_2(e), BLOCK=block, BS=layout.block_size,
            H=layout.num_kv_heads, PAGE=layout.page_bytes,
            K_REGION=layout.key.region_bytes, V_BASE=layout.value_offset,
            V_REGION=layout.value.region_bytes, GATHER=gather)


@triton.jit
def _read_keys_kernel(cache_ptr, cache16_ptr, block_ids_ptr, out_ptr, num_tokens,
                      D: tl.constexpr, BS: tl.constexpr, H: tl.constexpr,
                      PAGE: tl.constexpr, K_REGION: tl.constexpr, BITS: tl.constexpr,
                      GROUP: tl.constexpr, CODE_BYTES: tl.constexpr,
                      STEPS_OFFSET: tl.constexpr, MINIMA_OFFSET: tl.constexpr):
    j = tl.program_id(0)  # block of the sequence
    h = tl.program_id(1)
    t = tl.arange(0, BS)
    d = tl.arange(0, D)
    pos = j * BS + t
    ok = pos < num_tokens
    block = tl.load(block_ids_ptr + j).to(tl.int64)
    region = block * PAGE + h * K_REGION
    # planar codes: element d is in byte d % CODE_BYTES, bit slice d // CODE_BYTES
    byte = tl.load(cache_ptr + region + t[:, None] * CODE_BYTES + (d % CODE_BYTES)[None, :],
                   mask=ok[:, None], other=0).to(tl.int32)
    codes = (byte >> ((d // CODE_BYTES) * BITS)[None, :]) & ((1 << BITS) - 1)
    groups: tl.constexpr = D // GROUP
    meta = t[:, None] * groups + (d // GROUP)[None, :]
    step = tl.load(cache16_ptr + (region + STEPS_OFFSET) // 2 + meta, mask=ok[:, None],
                   other=0.0).to(tl.float32)
    low = tl.load(cache16_ptr + (region + MINIMA_OFFSET) // 2 + meta, mask=ok[:, None],
                  other=0.0).to(tl.float32)
    keys = codes.to(tl.float32) * step + low
    dst = out_ptr + (h * num_tokens + pos.to(tl.int64))[:, None] * D + d[None, :]
    tl.store(dst, keys, mask=ok[:, None])


def read_keys(cache: torch.Tensor, layout: PagedLayout, block_ids: torch.Tensor,
              num_tokens: int) -> torch.Tensor:
    """Rotated float32 keys [H, num_tokens, D] of the sequence whose blocks are
    `block_ids`."""
    _check_cache(cache, layout)
    _check_supported(layout)
    bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
    if bs & (bs - 1):
        raise ValueError(f"block size {bs} is not a power of two")
    out = torch.empty(h, num_tokens, d, dtype=torch.float32, device=cache.device)
    region = layout.key
    _read_keys_kernel[(triton.cdiv(num_tokens, bs), h)](
        cache, cache.view(torch.float16), block_ids, out, num_tokens,
        D=d, BS=bs, H=h, PAGE=layout.page_bytes, K_REGION=region.region_bytes,
        BITS=layout.recipe.key.bits, GROUP=layout.recipe.key.group_size,
        CODE_BYTES=region.code_bytes, STEPS_OFFSET=region.steps_offset,
        MINIMA_OFFSET=region.minima_offset)
    return out
