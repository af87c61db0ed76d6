"""Fused cache write: rotate, quantize, pack and scatter K and V into the paged cache.

One Triton program handles `BLOCK_T` tokens of one KV head, K and then V:

  1. load the [BLOCK_T, D] tile (bf16/fp16/fp32, any token/head strides); for K with a
     static offset (`key_offset`), subtract the head's fp32 offset and round back to the
     input dtype, exactly as the reference does;
  2. rotate it with one `tl.dot` against the block-diagonal Hadamard matrix. For bf16/fp16
     inputs the matrix is the exact ±1 sign matrix in the input dtype (tensor cores, fp32
     accumulation, then one multiply by 1/sqrt(b)); for fp32 inputs it is the orthonormal
     fp32 matrix with `input_precision="ieee"`;
  3. per group of G elements: min and max, rounded to fp16 exactly like the reference
     (`vllm_kvplug.quant.reference.asymmetric_quantize`), codes with correctly rounded
     division (`tl.div_rn`) so they equal torch's up to ties caused by the rotation's
     summation order;
  4. planar packing (byte j holds element j + i·D·bits/8 at bits [i·bits, (i+1)·bits));
  5. scatter codes, steps and minima to the token's slot (`slot < 0`: padding, skipped).

No host synchronisation: the grid depends only on T and the number of KV heads.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_kvplug.quant.paged import PagedLayout
from vllm_kvplug.quant.reference import hadamard_matrix


@functools.lru_cache(maxsize=32)
def _blockdiag(head_size: int, block: int | None, device: str, signs: bool,
               dtype: torch.dtype) -> torch.Tensor:
    if block is None:
        out = torch.eye(head_size, dtype=torch.float64)
    else:
        h = hadamard_matrix(block, torch.float64)
        out = torch.block_diag(*[torch.sign(h) if signs else h] * (head_size // block))
    return out.to(dtype=dtype, device=device).contiguous()


def blockdiag_hadamard(head_size: int, block: int | None, device,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal block-diagonal Hadamard matrix [D, D] (fp32 by default), cached per
    device and dtype.

    `block=None` gives the identity (no rotation). The matrix is symmetric and its own
    inverse, so x · H rotates and (x · H) · H = x.
    """
    return _blockdiag(head_size, block, str(torch.device(device)), False, dtype)


def blockdiag_signs(head_size: int, block: int | None, device,
                    dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The same matrix unnormalised (entries ±1 and 0, exact in fp16/bf16): H = S / sqrt(b)."""
    return _blockdiag(head_size, block, str(torch.device(device)), True, dtype)


@triton.jit
def _quantize_store_tile(
    x_ptr, x_stride_t, x_stride_h, h_ptr, inv_sqrt_b, off_ptr,
    cache_ptr, cache16_ptr,
    tok, tok_ok, head, slot_blk, slot_off,
    REGION_BASE: tl.constexpr, REGION_BYTES: tl.constexpr, PAGE_BYTES: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    ROTATE: tl.constexpr, X_F32: tl.constexpr, BLOCK_T: tl.constexpr,
    OFFSET: tl.constexpr, X_BF16: tl.constexpr,
):
    """Quantize the [BLOCK_T, D] tile of one head of K or V and store it at the slots.

    OFFSET: subtract the fp32 row `off_ptr[head, :]` first (static K offset) and round
    the difference back to the input dtype (X_BF16: the input is bf16)."""
    NG: tl.constexpr = D // G
    P: tl.constexpr = 8 // BITS           # codes per byte
    DP: tl.constexpr = D * BITS // 8      # bytes per token (= elements per planar slice)
    LEVELS: tl.constexpr = (1 << BITS) - 1

    d = tl.arange(0, D)
    x = tl.load(x_ptr + tok[:, None] * x_stride_t + head * x_stride_h + d[None, :],
                mask=tok_ok[:, None], other=0.0)
    if OFFSET:
        off = tl.load(off_ptr + head * D + d)
        xo = x.to(tl.float32) - off[None, :]
        if X_BF16:  # round to nearest even at bf16 precision with integer ops, so that
            # the conversion below is exact everywhere (the interpreter truncates)
            b = xo.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            xo = b.to(tl.float32, bitcast=True)
        x = xo.to(x.dtype)
    if ROTATE:
        hmat = tl.load(h_ptr + d[:, None] * D + d[None, :])
        if X_F32:  # fp32 (or bf16 under the interpreter, whose bf16 dot is broken)
            xr = tl.dot(x.to(tl.float32), hmat, input_precision="ieee") * inv_sqrt_b
        else:  # ±1 matrix in the input dtype: exact products, fp32 sums
            xr = tl.dot(x, hmat) * inv_sqrt_b
    else:
        xr = x.to(tl.float32)

    # per-group statistics, rounded to fp16 before the codes are computed
    x3 = tl.reshape(xr, [BLOCK_T, NG, G])
    lo16 = tl.min(x3, axis=2).to(tl.float16)
    lo = lo16.to(tl.float32)
    step16 = tl.div_rn(tl.max(x3, axis=2) - lo, LEVELS * 1.0).to(tl.float16)
    step = step16.to(tl.float32)
    safe = tl.where(step > 0, step, 1.0)
    q = tl.floor(tl.div_rn(x3 - lo[:, :, None], safe[:, :, None]) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0).to(tl.int32)

    # planar packing: slice i (elements i*DP .. i*DP+DP-1) goes to bits [i*BITS, ...)
    if P == 1:
        packed = tl.reshape(q, [BLOCK_T, DP])
    else:
        q3 = tl.reshape(q, [BLOCK_T, P, DP])
        shifts = tl.arange(0, P) * BITS
        packed = tl.sum(q3 << shifts[None, :, None], axis=1)

    region = slot_blk * PAGE_BYTES + REGION_BASE + head * REGION_BYTES  # int64 [BLOCK_T]
    j = tl.arange(0, DP)
    tl.store(cache_ptr + region[:, None] + slot_off[:, None] * DP + j[None, :],
             packed.to(tl.uint8), mask=tok_ok[:, None])
    g = tl.arange(0, NG)
    meta = (region + BLOCK_SIZE * DP) // 2 + slot_off * NG  # fp16 index of the steps row
    tl.store(cache16_ptr + meta[:, None] + g[None, :], step16, mask=tok_ok[:, None])
    tl.store(cache16_ptr + meta[:, None] + BLOCK_SIZE * NG + g[None, :], lo16,
             mask=tok_ok[:, None])


@triton.jit(do_not_specialize=["num_tokens"])  # one variant for every batch size
def _write_kv_kernel(
    key_ptr, k_stride_t, k_stride_h, value_ptr, v_stride_t, v_stride_h,
    slot_ptr, num_tokens, h_ptr, inv_sqrt_b, koff_ptr, cache_ptr, cache16_ptr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, G: tl.constexpr,
    K_REGION: tl.constexpr, V_BASE: tl.constexpr, V_REGION: tl.constexpr,
    PAGE_BYTES: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
    ROTATE: tl.constexpr, X_F32: tl.constexpr, BLOCK_T: tl.constexpr,
    K_OFFSET: tl.constexpr, X_BF16: tl.constexpr,
):
    head = tl.program_id(1)
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = tok < num_tokens
    slot = tl.load(slot_ptr + tok, mask=in_range, other=-1).to(tl.int64)
    ok = in_range & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    _quantize_store_tile(key_ptr, k_stride_t, k_stride_h, h_ptr, inv_sqrt_b, koff_ptr,
                         cache_ptr, cache16_ptr, tok, ok, head, blk, off,
                         0, K_REGION, PAGE_BYTES, BLOCK_SIZE, D, G, K_BITS,
                         ROTATE, X_F32, BLOCK_T, K_OFFSET, X_BF16)
    _quantize_store_tile(value_ptr, v_stride_t, v_stride_h, h_ptr, inv_sqrt_b, koff_ptr,
                         cache_ptr, cache16_ptr, tok, ok, head, blk, off,
                         V_BASE, V_REGION, PAGE_BYTES, BLOCK_SIZE, D, G, V_BITS,
                         ROTATE, X_F32, BLOCK_T, False, X_BF16)


def _interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return type(_write_kv_kernel).__name__ == "InterpretedFunction"


def _check_cache(cache: torch.Tensor, layout: PagedLayout) -> None:
    layout.check_cache(cache)
    if cache.stride(1) != 1 or cache.stride(0) != layout.page_bytes \
            or cache.storage_offset() % 2:
        raise ValueError("the cache must be a contiguous uint8 tensor at an even offset")


def _check_supported(layout: PagedLayout) -> None:
    d = layout.head_size
    if d & (d - 1) or d < 16:
        raise ValueError(f"Triton kernels need a power-of-two head size, got {d}")
    for r in (layout.recipe.key, layout.recipe.value):
        if d * r.bits // 8 < 16:
            raise ValueError(f"head size {d} with {r.bits}-bit codes is below 16 bytes a token")
    if layout.recipe.key.group_size != layout.recipe.value.group_size:
        raise ValueError("K and V must share the group size")
    if layout.recipe.key.hadamard_block != layout.recipe.value.hadamard_block:
        raise ValueError("K and V must share the Hadamard block")


def write_kv(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, layout: PagedLayout,
             key_offset: torch.Tensor | None = None) -> None:
    """Rotate, quantize and scatter key/value [T, H, D] into `cache` at `slot_mapping`.

    Same result as `vllm_kvplug.quant.paged.write_reference`. `key`/`value` may be strided
    views (last-dimension stride 1); T is min(len(key), len(slot_mapping)); negative slots
    are skipped. `key_offset`: optional contiguous float32 [H, D] on the cache's device,
    subtracted from K before rotation (a compile-time switch: no cost when absent).
    CUDA-graph safe (no host sync, no allocation once the matrices are cached).
    """
    _check_cache(cache, layout)
    _check_supported(layout)
    num_tokens = min(key.shape[0], value.shape[0], slot_mapping.shape[0])
    heads, d = layout.num_kv_heads, layout.head_size
    if key.shape[1:] != (heads, d) or value.shape[1:] != (heads, d):
        raise ValueError(f"key/value must be [T, {heads}, {d}], got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key/value need a unit stride on the last dimension")
    if key_offset is not None and (
            key_offset.shape != (heads, d) or key_offset.dtype != torch.float32
            or not key_offset.is_contiguous() or key_offset.device != cache.device):
        raise ValueError(f"key_offset must be a contiguous float32 [{heads}, {d}] tensor on "
                         f"{cache.device}, got {key_offset.dtype} {tuple(key_offset.shape)} "
                         f"on {key_offset.device}")
    if key.dtype != value.dtype:
        value = value.to(key.dtype)
    if num_tokens == 0:
        return
    block = layout.recipe.hadamard_block
    rotate = block is not None and block > 1
    x_f32 = key.dtype == torch.float32 or (key.dtype == torch.bfloat16 and _interpreted())
    if rotate:
        hmat = blockdiag_signs(d, block, cache.device,
                               torch.float32 if x_f32 else key.dtype)
        inv_sqrt_b = 1.0 / block ** 0.5
    else:
        hmat, inv_sqrt_b = key, 1.0  # unused
    block_t = 32 if num_tokens > 16 else 16
    grid = (triton.cdiv(num_tokens, block_t), heads)
    _write_kv_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1),
        slot_mapping, num_tokens, hmat, inv_sqrt_b,
        key if key_offset is None else key_offset,  # unused without K_OFFSET
        cache, cache.view(torch.float16),
        K_BITS=layout.recipe.key.bits, V_BITS=layout.recipe.value.bits,
        G=layout.recipe.key.group_size,
        K_REGION=layout.key.region_bytes, V_BASE=layout.value_offset,
        V_REGION=layout.value.region_bytes, PAGE_BYTES=layout.page_bytes,
        BLOCK_SIZE=layout.block_size, D=d, ROTATE=rotate, X_F32=x_f32, BLOCK_T=block_t,
        K_OFFSET=key_offset is not None, X_BF16=key.dtype == torch.bfloat16, num_warps=4,
    )
