"""Paged attention over the quantized KV cache, dequantizing inside the kernel.

One kernel serves decode, prefill with cached context (chunked prefill) and mixed batches
(varlen, causal, GQA); `attention_reference` in `vllm_kvplug.quant.paged` is its
specification.

Work split. A program owns one KV head and a block of BLOCK_Q query tokens of one
sequence, and all GROUP = Hq/H query heads of that KV head: its BLOCK_M = BLOCK_Q·GROUP
rows (row r = token r // GROUP, head r % GROUP, padded to ≥ 16 for tl.dot) share every KV
tile, so each tile is read and dequantized once per group. The grid is
(T // BLOCK_Q + num_seqs, H, splits), computed from host integers only; each program finds
its sequence by a binary search in query_start_loc and exits when its query block is past
the end of the sequence (so padded batches and CUDA graphs need no host sync).

Inner loop, per tile of TILE_N KV tokens: page of each token through the block table,
planar codes unpacked with one shift and mask per slice. The head dimension is cut into
"chunks" of CH = min(group, D·bits/8) contiguous elements: a chunk lies inside one planar
slice and one quantization group, so its dequantization is code·step + min with one
(step, min) per token, and q·k = Σ_chunks q[:, chunk] · k_chunk ("split dot"): no
interleaving of the unpacked nibbles is ever needed. V chunks feed per-chunk fp32
accumulators (p · v_chunk). Softmax is the fp32 online softmax in base 2.

Decode and prefill differ in where the per-token step and minimum are applied (AFTER_DOT:
on the dot products in decode, whose 16-row tiles hold only GROUP real rows; on the
elements in prefill); see `_kv_tile`. Each token's steps and minima are loaded as 32-bit
words (two halves each), which the pipeliner prefetches with cp.async together with the
codes and the block-table entries (2-byte loads it left synchronous: two dependent global
latencies a tile). On a GPU the codes become fp16 by inline PTX (`_unpack_asm`: one PRMT,
LOP3 and HFMA2 per two codes). Tiles below a query block's diagonal skip the causal mask
(prefill; decode keeps one loop, as a second copy costs registers and occupancy).

Rotation. Decode rotates Q in the prologue (Q · S, S the ±1 block-diagonal Hadamard sign
matrix, a tensor-core dot, scaled by 1/sqrt(b) together with the softmax scale); prefill
launches (BLOCK_M >= 64) get Q rotated by one small GEMM before the launch. The output is
rotated back in the epilogue (o_rot · S / sqrt(b)); the rotated query chunks stay in
registers for the whole KV loop.

Split-K (flash decoding). For pure decode with few (sequence, KV head) programs, the KV
range is cut into S segments (grid axis 2); each writes its normalised, rotated-back partial
output and its (max, sum) to an `AttentionWorkspace`, and a small reduce kernel merges
them. S is chosen from host integers (batch size, heads, max_seq_len, SM count) by a wave
model (`choose_num_splits`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from vllm_kvplug.quant.paged import PagedLayout

from .kv_write import (_check_cache, _check_supported, _interpreted, blockdiag_hadamard,
                       blockdiag_signs)

LOG2E = 1.4426950408889634
_TUNING: dict = {}  # launch-parameter overrides for kernel_bench.py (empty in production)


class AttentionWorkspace:
    """Preallocated split-K scratch, reused across calls (allocate once, CUDA-graph safe).

    Holds, per (token, split) row and query head, the partial output [D] (fp32, normalised
    and rotated back) and the running max and sum of the online softmax. Capacity is in
    rows, so few tokens may use many splits and many tokens few (a decode batch of T tokens
    can split up to max_rows // T ways).
    """

    def __init__(self, max_rows: int, num_heads: int, head_size: int, device) -> None:
        self.max_rows, self.num_heads, self.head_size = max_rows, num_heads, head_size
        self.out = torch.empty(max_rows * num_heads * head_size, dtype=torch.float32,
                               device=device)
        self.max = torch.empty(max_rows * num_heads, dtype=torch.float32, device=device)
        self.sum = torch.empty_like(self.max)

    def max_splits(self, num_tokens: int) -> int:
        return self.max_rows // max(num_tokens, 1)

    def fits(self, num_tokens: int, num_heads: int, head_size: int, splits: int) -> bool:
        return (num_tokens * splits <= self.max_rows and num_heads == self.num_heads
                and head_size == self.head_size)


@functools.lru_cache(maxsize=8)
def _sm_count(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 132  # an H100 SXM: keeps the heuristic's choices the same in the interpreter


# Decode programs resident per SM: decode launches cap registers at DECODE_MAXNREG (the
# inner loop needs ~142 for head size 128; at 128 it spills 8-16 bytes a thread) so 4 x 128
# threads fit the 64K registers. Measured on an H100 (`bench/kernel_bench.py`, variants
# `occ4` vs `default` of kernel_bench-h100-v4): decode 1-10 % faster for INT4 at every
# batch shape timed, INT2 4-11 % (except 64 x 2048: -3 %). Prefill keeps its registers (capped, it spills 336 bytes).
# PROGRAM_OVERHEAD_TOKENS is the fixed cost of a program (Q load and rotation, partial-output
# store) in KV tokens; both feed the wave model below, fitted to `kernel_bench.py --sweep`.
DECODE_PROGRAMS_PER_SM = 4
DECODE_MAXNREG = 128
PROGRAM_OVERHEAD_TOKENS = 64


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int,
                      max_seq_len: int, device, max_splits: int = 64,
                      min_tokens_per_split: int = 128,
                      programs_per_sm: int = DECODE_PROGRAMS_PER_SM) -> int:
    """Number of KV segments for split-K; 1 outside pure decode.

    Depends on host integers only (CUDA-graph safe). Wave model: the num_seqs·H·S programs
    run in ceil(programs / resident) waves, each as long as one segment of
    ceil(max_seq_len / S) tokens plus a fixed overhead; S minimises waves x length (the
    smallest S on ties), and splits only when that saves at least 15 % (a full grid stays
    whole). A part-filled last wave costs a full one, so e.g. 8 x 8192 tokens x 8 heads
    splits 8 ways (512 programs, one wave of 4 programs on each of 132 SMs), not 9 (two).
    """
    if max_query_len != 1 or max_seq_len <= 0:
        return 1
    programs = num_seqs * num_kv_heads
    resident = programs_per_sm * _sm_count(str(device))
    best, best_cost = 1, None
    for splits in range(1, max(1, max_splits) + 1):
        segment = triton.cdiv(max_seq_len, splits)
        if splits > 1 and segment < min_tokens_per_split:
            break
        cost = triton.cdiv(programs * splits, resident) * (segment + PROGRAM_OVERHEAD_TOKENS)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
        if splits == 1:
            unsplit = cost
    return best if best_cost < 0.85 * unsplit else 1


@triton.jit
def _find_sequence(qsl_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Largest sequence s with query_start_loc[s] // BLOCK_Q + s <= pid (binary search)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first_block <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _codes_to_float(codes):
    """Small non-negative int32 codes to fp32 without an int-to-float conversion.

    The bits 0x4B000000 | c are the float 2^23 + c exactly, so one OR and one subtraction
    (full-rate instructions) replace the quarter-rate I2F.
    """
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_to_half(codes):
    """Small non-negative int32 codes (< 1024) to exact fp16 without an int-to-float
    conversion: the bits 0x6400 | c are the half 1024 + c, one OR and one half subtraction."""
    return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0


def _unpack_asm(bits: int, slice_: int) -> str:
    """PTX for `tl.inline_asm_elementwise(..., pack=4)`: the codes of bit slice `slice_`
    of 4 packed bytes ($2) as exact fp16, two per register ($0, $1).

    One PRMT spreads two bytes into the low bytes of two 16-bit lanes; one LOP3 keeps the
    slice's bits and ORs in the exponent of 1024, giving the halves 1024 + c·2^k
    (k = slice_·bits; exact, below 2048); one HFMA2 scales by 2^-k and subtracts 1024·2^-k.
    Three instructions per two codes, against six to seven for the same conversion through
    32-bit lanes.
    """
    import numpy as np
    k = slice_ * bits
    mask = ((1 << bits) - 1) << k
    half = lambda x: int(np.array(x, dtype=np.float16).view(np.uint16))  # noqa: E731
    scale, bias = half(2.0 ** -k), half(-1024.0 * 2.0 ** -k)
    return ("{ .reg .b32 t0, t1, m, o, s, z;\n"
            f"mov.b32 m, {mask | mask << 16:#010x};\n"
            "mov.b32 o, 0x64006400;\n"
            f"mov.b32 s, {scale | scale << 16:#010x};\n"
            f"mov.b32 z, {bias | bias << 16:#010x};\n"
            "prmt.b32 t0, $2, 0, 0x4140;\n"
            "prmt.b32 t1, $2, 0, 0x4342;\n"
            "lop3.b32 t0, t0, m, o, 0xEA;\n"
            "lop3.b32 t1, t1, m, o, 0xEA;\n"
            "fma.rn.f16x2 $0, t0, s, z;\n"
            "fma.rn.f16x2 $1, t1, s, z;\n}")


_UNPACK_2_0 = tl.constexpr(_unpack_asm(2, 0))
_UNPACK_2_1 = tl.constexpr(_unpack_asm(2, 1))
_UNPACK_2_2 = tl.constexpr(_unpack_asm(2, 2))
_UNPACK_2_3 = tl.constexpr(_unpack_asm(2, 3))
_UNPACK_4_0 = tl.constexpr(_unpack_asm(4, 0))
_UNPACK_4_1 = tl.constexpr(_unpack_asm(4, 1))
_UNPACK_8_0 = tl.constexpr(_unpack_asm(8, 0))


@triton.jit
def _unpack_codes(packed, BITS: tl.constexpr, SLICE: tl.constexpr, FAST: tl.constexpr):
    """Codes of bit slice SLICE of uint8 `packed`, as exact fp16 of the same shape
    (`_unpack_asm` on a GPU; shifts and masks in the interpreter, FAST = False)."""
    if FAST:
        if BITS == 4:
            if SLICE == 0:
                asm: tl.constexpr = _UNPACK_4_0
            else:
                asm: tl.constexpr = _UNPACK_4_1
        elif BITS == 2:
            if SLICE == 0:
                asm: tl.constexpr = _UNPACK_2_0
            elif SLICE == 1:
                asm: tl.constexpr = _UNPACK_2_1
            elif SLICE == 2:
                asm: tl.constexpr = _UNPACK_2_2
            else:
                asm: tl.constexpr = _UNPACK_2_3
        else:
            asm: tl.constexpr = _UNPACK_8_0
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [packed], dtype=tl.float16,
                                         is_pure=True, pack=4)
    else:
        codes = (packed.to(tl.int32) >> (SLICE * BITS)) & ((1 << BITS) - 1)
        return _codes_to_half(codes)


@triton.jit
def _meta_words(cache32_ptr, meta, n_ok, NG: tl.constexpr, MINIMA_OFFSET: tl.constexpr):
    """The NG fp16 steps and NG minima of each token of a tile, as [TILE_N, NW] int32
    words (NW = ceil(NG / 2)): two halves a word, so every thread loads >= 4 bytes and the
    pipeliner prefetches them with cp.async together with the codes (2-byte loads it
    leaves synchronous, two dependent global latencies every tile). `meta` is the fp16
    index of the token's first step; with NG = 1 a word also holds a neighbour's step.
    """
    NW: tl.constexpr = (NG + 1) // 2
    cols = tl.arange(0, NW)
    ptr = cache32_ptr + (meta // 2)[:, None] + cols[None, :]
    steps = tl.load(ptr, mask=n_ok[:, None], other=0)
    minima = tl.load(ptr + MINIMA_OFFSET // 2, mask=n_ok[:, None], other=0)
    return steps, minima


@triton.jit
def _half_column(words, meta, j, NG: tl.constexpr):
    """fp16 number j of each token's row of `_meta_words`, as fp32 [TILE_N]."""
    NW: tl.constexpr = (NG + 1) // 2
    if NW == 1:
        w = tl.sum(words, axis=1)
    else:
        cols = tl.arange(0, NW)
        w = tl.sum(tl.where(cols[None, :] == j // 2, words, 0), axis=1)
    if NG == 1:
        shift = (meta % 2) * 16  # the token's half of a word shared with a neighbour
    else:
        shift = (j % 2) * 16     # rows start on a word (4-byte aligned regions)
    half = ((w >> shift) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return half.to(tl.float32)


@triton.jit
def _kv_tile(
    tile, acc, m_i, l_i, q_chunks, q_sums, cache_ptr, cache32_ptr, bt_row, kv_end, kv_head,
    r_ok, r_pos, ev_len, ev_base, ev_tail,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr, G: tl.constexpr,
    K_BITS: tl.constexpr, K_REGION: tl.constexpr, K_CH: tl.constexpr,
    V_BASE: tl.constexpr, V_BITS: tl.constexpr, V_REGION: tl.constexpr, V_CH: tl.constexpr,
    AFTER_DOT: tl.constexpr, FAST_UNPACK: tl.constexpr, MASKED: tl.constexpr,
    EVICTED: tl.constexpr, H: tl.constexpr,
):
    """One TILE_N-token step of the online softmax: returns the new (acc, m_i, l_i).

    EVICTED: the tile indexes the request's virtual KV sequence (`_kv_range`): its first
    ev_len entries are this head's head-packed slots ev_base + n (flat slot e: block
    e // (BLOCK_SIZE·H), head region (e // BLOCK_SIZE) % H, slot e % BLOCK_SIZE; always
    visible), the rest the normal-layout tail from position ev_tail on.

    AFTER_DOT: the tensor cores see the integer codes (exact in fp16) and the per-token
    step and minimum are applied to the dot products instead of to every element:
    q·k = step·(q·c) + min·Σq for K, p·v = (p·step)·c + Σ p·min for V.
    """
    NG: tl.constexpr = D // G
    K_P: tl.constexpr = 8 // K_BITS
    K_DP: tl.constexpr = D * K_BITS // 8
    K_NB: tl.constexpr = K_DP // K_CH
    V_P: tl.constexpr = 8 // V_BITS
    V_DP: tl.constexpr = D * V_BITS // 8
    V_NB: tl.constexpr = V_DP // V_CH
    K_MASK: tl.constexpr = (1 << K_BITS) - 1
    V_MASK: tl.constexpr = (1 << V_BITS) - 1
    n_off = tl.arange(0, TILE_N)
    kc = tl.arange(0, K_CH)
    vc = tl.arange(0, V_CH)
    n = tile * TILE_N + n_off
    n_ok = n < kv_end
    if EVICTED:
        packed = n < ev_len
        e = ev_base + n
        t = ev_tail + n - ev_len
        page = tl.load(bt_row + tl.where(packed, e // (BLOCK_SIZE * H), t // BLOCK_SIZE),
                       mask=n_ok, other=0).to(tl.int64)
        region_head = tl.where(packed, (e // BLOCK_SIZE) % H, kv_head)
        slot = tl.where(packed, e % BLOCK_SIZE, t % BLOCK_SIZE)
        pos = tl.where(packed, -1, t)  # packed entries are visible to every row
    else:
        page = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        region_head = kv_head
        slot = n % BLOCK_SIZE
        pos = n
    k_region = page * PAGE_BYTES + region_head * K_REGION
    v_region = page * PAGE_BYTES + V_BASE + region_head * V_REGION
    k_meta = (k_region + BLOCK_SIZE * K_DP) // 2 + slot * NG   # fp16 index of steps
    v_meta = (v_region + BLOCK_SIZE * V_DP) // 2 + slot * NG

    # scores = Σ_chunks q_chunk · dequant(k_chunk)ᵀ
    scores = tl.zeros([BLOCK_M, TILE_N], dtype=tl.float32)
    k_codes = cache_ptr + k_region[None, :] + slot[None, :] * K_DP + kc[:, None]
    k_steps, k_minima = _meta_words(cache32_ptr, k_meta, n_ok, NG, BLOCK_SIZE * NG)
    for b in tl.static_range(K_NB):
        kbytes = tl.load(k_codes + b * K_CH, mask=n_ok[None, :], other=0)
        for i in tl.static_range(K_P):
            step = _half_column(k_steps, k_meta, (i * K_DP + b * K_CH) // G, NG)
            lo = _half_column(k_minima, k_meta, (i * K_DP + b * K_CH) // G, NG)
            if AFTER_DOT:
                codes = _unpack_codes(kbytes, K_BITS, i, FAST_UNPACK)
                raw = tl.dot(q_chunks[b * K_P + i], codes)
                scores += raw * step[None, :] + q_sums[b * K_P + i][:, None] * lo[None, :]
            else:
                codes = _codes_to_float((kbytes.to(tl.int32) >> (i * K_BITS)) & K_MASK)
                k_t = codes * step[None, :] + lo[None, :]
                scores = tl.dot(q_chunks[b * K_P + i], k_t.to(tl.float16), acc=scores)

    if MASKED:  # the tile reaches the causal diagonal or the end of the sequence
        # n <= r_pos also excludes n >= kv_end for every stored row; a padding row may
        # see finite scores of masked-out (zero) codes, and is never stored
        # (EVICTED: tail entries past the range have positions past every stored row)
        scores = tl.where(pos[None, :] <= r_pos[:, None], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    m_i = m_new
    p16 = p.to(tl.float16)

    # acc_chunk = acc_chunk·alpha + p · dequant(v_chunk)
    v_codes = cache_ptr + v_region[:, None] + slot[:, None] * V_DP + vc[None, :]
    new_acc = ()
    v_steps, v_minima = _meta_words(cache32_ptr, v_meta, n_ok, NG, BLOCK_SIZE * NG)
    for b in tl.static_range(V_NB):
        vbytes = tl.load(v_codes + b * V_CH, mask=n_ok[:, None], other=0)
        for i in tl.static_range(V_P):
            step = _half_column(v_steps, v_meta, (i * V_DP + b * V_CH) // G, NG)
            lo = _half_column(v_minima, v_meta, (i * V_DP + b * V_CH) // G, NG)
            if AFTER_DOT:
                codes = _unpack_codes(vbytes, V_BITS, i, FAST_UNPACK)
                p_step = (p * step[None, :]).to(tl.float16)
                p_min = tl.sum(p * lo[None, :], axis=1)
                a = acc[b * V_P + i] * alpha[:, None] + p_min[:, None]
                new_acc = new_acc + (tl.dot(p_step, codes, acc=a),)
            else:
                codes = _codes_to_float((vbytes.to(tl.int32) >> (i * V_BITS)) & V_MASK)
                v = codes * step[:, None] + lo[:, None]
                new_acc = new_acc + (tl.dot(p16, v.to(tl.float16),
                                            acc=acc[b * V_P + i] * alpha[:, None]),)
    return new_acc, m_i, l_i


# Batch-dependent integers are not specialized on (value 1, divisibility by 16) and the split
# count is a runtime argument: one compiled variant serves every batch of a shape class,
# so serving never JIT-compiles in the middle of a run.
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "ev_stride"])
def _attention_kernel(
    q_ptr, q_stride_t, q_stride_h, o_ptr, o_stride_t, o_stride_h,
    cache_ptr, cache32_ptr, s_ptr,
    bt_ptr, bt_stride, seq_lens_ptr, qsl_ptr, num_seqs,
    ws_out_ptr, ws_max_ptr, ws_sum_ptr, ws_heads, num_splits,
    ev_off_ptr, ev_stride, ev_tail_ptr,
    q_scale, out_scale,
    D: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGE_BYTES: tl.constexpr,
    G: tl.constexpr, K_BITS: tl.constexpr, K_REGION: tl.constexpr, K_CH: tl.constexpr,
    V_BASE: tl.constexpr, V_BITS: tl.constexpr, V_REGION: tl.constexpr, V_CH: tl.constexpr,
    ROTATE: tl.constexpr, ROTATE_Q: tl.constexpr, SPLIT: tl.constexpr,
    WHILE_LOOP: tl.constexpr, QROT_F16: tl.constexpr, AFTER_DOT: tl.constexpr,
    FAST_UNPACK: tl.constexpr, EVICTED: tl.constexpr, H: tl.constexpr,
):
    K_P: tl.constexpr = 8 // K_BITS
    K_DP: tl.constexpr = D * K_BITS // 8      # code bytes per token = elements per slice
    K_NB: tl.constexpr = K_DP // K_CH         # chunks per slice
    V_P: tl.constexpr = 8 // V_BITS
    V_DP: tl.constexpr = D * V_BITS // 8
    V_NB: tl.constexpr = V_DP // V_CH

    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(qsl_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    r_tok = q_block * BLOCK_Q + rows // GROUP
    r_head = kv_head * GROUP + rows % GROUP
    r_ok = (rows < BLOCK_Q * GROUP) & (r_tok < q_len)
    r_pos = context + r_tok                  # absolute position of the row's query token
    r_t = (q_start + r_tok).to(tl.int64)     # row index into query/output
    d = tl.arange(0, D)

    # ---- prologue: rotated, scaled query chunks (fp16, loop invariant) -----------------
    q_row = q_ptr + r_t * q_stride_t + r_head * q_stride_h
    kc = tl.arange(0, K_CH)
    if ROTATE_Q:
        q_full = tl.load(q_row[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)
        q_full = q_full.to(tl.float32)
    q_chunks = ()
    q_sums = ()  # Σ of each rotated query chunk (the minimum's coefficient with AFTER_DOT)
    for b in tl.static_range(K_NB):
        for i in tl.static_range(K_P):
            col = i * K_DP + b * K_CH
            if ROTATE_Q:
                # With BLOCK_M >= 64 (wgmma), feeding a tensor-core dot's result to the
                # loop's dots as a loop-invariant operand miscompiled (Triton 3.6, sm_90):
                # there the rotation is an fp32 FMA dot (more registers, prefill only).
                s_cols = tl.load(s_ptr + d[:, None] * D + col + kc[None, :])
                if QROT_F16:  # tensor cores; used below BLOCK_M = 64 only (see above)
                    qc = tl.dot(q_full.to(tl.float16), s_cols) * q_scale
                else:
                    qc = tl.dot(q_full, s_cols.to(tl.float32), input_precision="ieee")
                    qc = qc * q_scale
            else:
                qc = tl.load(q_row[:, None] + col + kc[None, :], mask=r_ok[:, None],
                             other=0.0).to(tl.float32) * q_scale
            qc16 = qc.to(tl.float16)
            q_chunks = q_chunks + (qc16,)
            q_sums = q_sums + (tl.sum(qc16.to(tl.float32), axis=1),)

    acc = ()
    for b in tl.static_range(V_NB):
        for i in tl.static_range(V_P):
            acc = acc + (tl.zeros([BLOCK_M, V_CH], dtype=tl.float32),)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- KV range of this program (causal bound of its last query, then split) --------
    kv_end = tl.minimum(seq_len, context + (q_block + 1) * BLOCK_Q)
    if EVICTED:  # virtual range: this head's packed entries, then the tail (see _kv_tile)
        ev_row = ev_off_ptr + seq.to(tl.int64) * ev_stride + kv_head
        ev_base = tl.load(ev_row)
        ev_len = tl.load(ev_row + 1) - ev_base
        ev_tail = tl.load(ev_tail_ptr + seq)
        kv_end = ev_len + kv_end - ev_tail
    else:
        ev_base = 0
        ev_len = 0
        ev_tail = 0
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if SPLIT:
        per_split = tl.cdiv(num_tiles, num_splits)
        tile_lo = split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles

    vc = tl.arange(0, V_CH)
    bt_row = bt_ptr + seq.to(tl.int64) * bt_stride
    # Tiles below the first query row's position are whole for every row: no causal mask
    # (padding rows have zero queries, finite scores, and are never stored).
    # Decode keeps one masked loop: a second copy of the loop costs registers (occupancy).
    if AFTER_DOT or EVICTED:
        tile_full = tile_lo
    else:
        tile_full = tl.minimum(tl.maximum((context + q_block * BLOCK_Q + 1) // TILE_N,
                                          tile_lo), tile_hi)
    if WHILE_LOOP:  # the CPU interpreter (numpy >= 2.4 rejects its 1-element range bounds)
        tile = tile_lo
        while tile < tile_hi:
            if tile < tile_full:
                acc, m_i, l_i = _kv_tile(
                    tile, acc, m_i, l_i, q_chunks, q_sums, cache_ptr, cache32_ptr, bt_row,
                    kv_end, kv_head, r_ok, r_pos, ev_len, ev_base, ev_tail, GROUP, BLOCK_M, D,
                    TILE_N, BLOCK_SIZE, PAGE_BYTES, G, K_BITS, K_REGION, K_CH, V_BASE,
                    V_BITS, V_REGION, V_CH, AFTER_DOT, FAST_UNPACK, False, EVICTED, H)
            else:
                acc, m_i, l_i = _kv_tile(
                    tile, acc, m_i, l_i, q_chunks, q_sums, cache_ptr, cache32_ptr, bt_row,
                    kv_end, kv_head, r_ok, r_pos, ev_len, ev_base, ev_tail, GROUP, BLOCK_M, D,
                    TILE_N, BLOCK_SIZE, PAGE_BYTES, G, K_BITS, K_REGION, K_CH, V_BASE,
                    V_BITS, V_REGION, V_CH, AFTER_DOT, FAST_UNPACK, True, EVICTED, H)
            tile += 1
    else:
        for tile in range(tile_lo, tile_full):  # empty in decode
            acc, m_i, l_i = _kv_tile(
                tile, acc, m_i, l_i, q_chunks, q_sums, cache_ptr, cache32_ptr, bt_row,
                kv_end, kv_head, r_ok, r_pos, ev_len, ev_base, ev_tail, GROUP, BLOCK_M, D,
                TILE_N, BLOCK_SIZE, PAGE_BYTES, G, K_BITS, K_REGION, K_CH, V_BASE,
                V_BITS, V_REGION, V_CH, AFTER_DOT, FAST_UNPACK, False, EVICTED, H)
        for tile in range(tile_full, tile_hi):
            acc, m_i, l_i = _kv_tile(
                tile, acc, m_i, l_i, q_chunks, q_sums, cache_ptr, cache32_ptr, bt_row,
                kv_end, kv_head, r_ok, r_pos, ev_len, ev_base, ev_tail, GROUP, BLOCK_M, D,
                TILE_N, BLOCK_SIZE, PAGE_BYTES, G, K_BITS, K_REGION, K_CH, V_BASE,
                V_BITS, V_REGION, V_CH, AFTER_DOT, FAST_UNPACK, True, EVICTED, H)

    # ---- epilogue: normalise, rotate back, store (output or split workspace) -----------
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if SPLIT:
        base = ((r_t * ws_heads + r_head) * num_splits + split)
        dst = ws_out_ptr + base * D
        tl.store(ws_max_ptr + base, m_i, mask=r_ok)
        tl.store(ws_sum_ptr + base, l_i, mask=r_ok)
    else:
        dst = o_ptr + r_t * o_stride_t + r_head * o_stride_h
    if ROTATE:
        out = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for b in tl.static_range(V_NB):
            for i in tl.static_range(V_P):
                col = i * V_DP + b * V_CH
                o_c = (acc[b * V_P + i] / l_safe[:, None]).to(tl.float16)
                s_rows = tl.load(s_ptr + (col + vc[:, None]) * D + d[None, :])
                out = tl.dot(o_c, s_rows, acc=out)
        tl.store(dst[:, None] + d[None, :], (out * out_scale).to(dst.dtype.element_ty),
                 mask=r_ok[:, None])
    else:
        for b in tl.static_range(V_NB):
            for i in tl.static_range(V_P):
                col = i * V_DP + b * V_CH
                o_c = acc[b * V_P + i] / l_safe[:, None]
                tl.store(dst[:, None] + col + vc[None, :], o_c.to(dst.dtype.element_ty),
                         mask=r_ok[:, None])


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _merge_splits_kernel(
    o_ptr, o_stride_t, o_stride_h, ws_out_ptr, ws_max_ptr, ws_sum_ptr, ws_heads,
    qsl_ptr, num_seqs, num_splits,
    D: tl.constexpr, SPLITS_POW2: tl.constexpr,
):
    """out[t, h] = Σ_s w_s·o_s / Σ_s w_s with w_s = sum_s · 2^(max_s - max)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    if t >= tl.load(qsl_ptr + num_seqs):
        return  # padding row
    s = tl.arange(0, SPLITS_POW2)
    s_ok = s < num_splits
    base = (t.to(tl.int64) * ws_heads + h) * num_splits
    m = tl.load(ws_max_ptr + base + s, mask=s_ok, other=float("-inf"))
    l = tl.load(ws_sum_ptr + base + s, mask=s_ok, other=0.0)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(s_ok & (l > 0), l * tl.exp2(m - m_all), 0.0)
    d = tl.arange(0, D)
    parts = tl.load(ws_out_ptr + (base + s)[:, None] * D + d[None, :], mask=s_ok[:, None],
                    other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    dst = o_ptr + t.to(tl.int64) * o_stride_t + h * o_stride_h + d
    tl.store(dst, out.to(o_ptr.dtype.element_ty))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    layout: PagedLayout, scale: float, output: torch.Tensor, *,
                    max_query_len: int, max_seq_len: int,
                    workspace: AttentionWorkspace | None = None,
                    num_splits: int | None = None,
                    eviction: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """Causal varlen GQA attention of query [T, Hq, D] against the quantized paged cache.

    Matches `vllm_kvplug.quant.paged.attention_reference`; writes `output` [T, Hq, D] in
    place (rows past query_start_loc[-1] are left untouched) and returns it.
    `max_query_len`/`max_seq_len` are host-side bounds (only used to pick tile shapes and
    the split count). Split-K runs for pure decode when `choose_num_splits` says so (or
    `num_splits` > 1 forces it); its scratch comes from `workspace` (allocated on the fly
    when None or too small, which is not CUDA-graph safe).

    `eviction` = (offsets, tail_start): int32 [>= num_seqs, H + 1] (unit last stride; rows
    may be strided) and [>= num_seqs] per sequence of the batch: a sequence whose prompt was evicted into the head-packed layout
    (`vllm_kvplug.eviction.packed`) has its packed offsets and tail start there (its rows
    then attend like `attention_packed`); all zeros mean the normal layout.
    """
    _check_cache(cache, layout)
    _check_supported(layout)
    num_tokens, num_heads, d = query.shape
    kv_heads = layout.num_kv_heads
    if d != layout.head_size or num_heads % kv_heads:
        raise ValueError(f"query {tuple(query.shape)} does not fit {kv_heads} KV heads of "
                         f"size {layout.head_size}")
    if query.stride(2) != 1 or output.stride(2) != 1 or output.shape != query.shape:
        raise ValueError("query/output must be [T, Hq, D] with unit last-dimension stride")
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs <= 0:
        return output
    group = num_heads // kv_heads
    recipe = layout.recipe
    g = recipe.key.group_size

    if num_splits is None:
        cap = workspace.max_splits(num_tokens) if workspace is not None else 64
        num_splits = choose_num_splits(
            num_seqs, kv_heads, max_query_len, max_seq_len, query.device, max_splits=cap,
            programs_per_sm=_TUNING.get("programs_per_sm", DECODE_PROGRAMS_PER_SM))
    splits = max(1, int(num_splits))
    decode = max_query_len <= 1
    if decode:  # 64-token tiles with split-K, 32 without (fits 4 programs per SM)
        block_m, warps, stages = max(16, _pow2(group)), 4, 3
        tile_n = 64 if splits > 1 else 32
    else:
        # measured on an H100 (kernel_bench --sweep): 128-row programs with 64-token tiles
        # for 4/8-bit K, 64-row ones for 2-bit
        rows = _pow2(max_query_len * group)
        block_m = 128 if recipe.key.bits >= 4 and rows >= 128 else 64
        block_m = max(min(block_m, max(16, rows)), _pow2(group))
        tile_n, stages = 64, 2
        warps = 8 if block_m >= 128 else 4
    # Decode (few real rows per 16-row tile) pays per element: steps after the dot. Prefill
    # (64-128 real rows) pays per (row, token): steps on the elements.
    variant = {"after_dot": decode, "maxnreg": DECODE_MAXNREG if decode else None,
               "fast_unpack": True}
    if _TUNING:  # benchmarking/debugging overrides: {"tile_n": .., "warps": .., "stages": ..}
        tile_n = _TUNING.get("tile_n", tile_n)
        warps = _TUNING.get("warps", warps)
        stages = _TUNING.get("stages", stages)
        block_m = max(_TUNING.get("block_m", block_m), _pow2(group))
        variant = {k: _TUNING.get(k, v) for k, v in variant.items()}
    block_q = block_m // group

    if splits > 1 and (workspace is None
                       or not workspace.fits(num_tokens, num_heads, d, splits)):
        workspace = AttentionWorkspace(num_tokens * splits, num_heads, d, query.device)

    block = recipe.hadamard_block
    rotate = block is not None and block > 1
    signs = blockdiag_signs(d, block, query.device, torch.float16)
    inv_sqrt_b = 1.0 / math.sqrt(block) if rotate else 1.0
    # Q rotation in the prologue needs the fp16 tensor-core dot, which miscompiles at
    # BLOCK_M >= 64 (see the kernel) and whose fp32 fallback spills; there (prefill) the
    # query is rotated before the launch: one small [b, b] GEMM per b elements.
    rotate_q = rotate and _TUNING.get("rotate_q_in_kernel", block_m < 64)
    q_in, q_scale = query, scale * LOG2E * inv_sqrt_b
    if rotate and not rotate_q:
        # fp16 tensor cores (fp32 accumulation); the fp32 GEMM ran on CUDA cores (FFMA)
        # and cost ~3 % of a prefill-heavy run (profiled on the H100)
        h = blockdiag_hadamard(block, block, query.device, torch.float16)
        q_in = (query.reshape(-1, block).to(torch.float16) @ h)
        q_in = q_in.view(num_tokens, num_heads, d)
        q_scale = scale * LOG2E
    if splits > 1:  # rows (token, head, split) with the split count as the stride
        ws_out, ws_max, ws_sum = workspace.out, workspace.max, workspace.sum
        ws_heads = workspace.num_heads
    else:
        ws_out = ws_max = ws_sum = output  # unused
        ws_heads = 1

    if eviction is not None:
        ev_offsets, ev_tail = eviction
        if (ev_offsets.dtype != torch.int32 or ev_tail.dtype != torch.int32
                or ev_offsets.dim() != 2 or ev_offsets.shape[1] != kv_heads + 1
                or ev_offsets.stride(1) != 1 or ev_offsets.shape[0] < num_seqs
                or ev_tail.shape[0] < num_seqs or not ev_tail.is_contiguous()):
            raise ValueError(f"eviction tables must be int32 [>= {num_seqs}, {kv_heads + 1}] "
                             f"(unit last stride) and [>= {num_seqs}], got "
                             f"{tuple(ev_offsets.shape)} {ev_offsets.dtype} and "
                             f"{tuple(ev_tail.shape)} {ev_tail.dtype}")
    else:
        ev_offsets = ev_tail = seq_lens  # unused

    grid = (num_tokens // block_q + num_seqs, kv_heads, splits)
    _attention_kernel[grid](
        q_in, q_in.stride(0), q_in.stride(1), output, output.stride(0), output.stride(1),
        cache, cache.view(torch.int32), signs,
        block_table, block_table.stride(0), seq_lens, query_start_loc, num_seqs,
        ws_out, ws_max, ws_sum, ws_heads, splits,
        ev_offsets, ev_offsets.stride(0), ev_tail,
        q_scale, inv_sqrt_b,
        D=d, GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        BLOCK_SIZE=layout.block_size, PAGE_BYTES=layout.page_bytes, G=g,
        K_BITS=recipe.key.bits, K_REGION=layout.key.region_bytes,
        K_CH=min(g, d * recipe.key.bits // 8),
        V_BASE=layout.value_offset, V_BITS=recipe.value.bits,
        V_REGION=layout.value.region_bytes, V_CH=min(g, d * recipe.value.bits // 8),
        ROTATE=rotate, ROTATE_Q=rotate_q, SPLIT=splits > 1, WHILE_LOOP=_interpreted(),
        QROT_F16=_TUNING.get("qrot_f16", block_m < 64),
        AFTER_DOT=variant["after_dot"],
        FAST_UNPACK=variant["fast_unpack"] and not _interpreted(),
        EVICTED=eviction is not None, H=kv_heads,
        num_warps=warps, num_stages=stages,
        **({"maxnreg": variant["maxnreg"]} if variant["maxnreg"] and not _interpreted()
           else {}),
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            output, output.stride(0), output.stride(1), ws_out, ws_max, ws_sum,
            ws_heads, query_start_loc, num_seqs, splits,
            # one compiled variant for every split count up to 64 (no JIT as lengths grow)
            D=d, SPLITS_POW2=max(64, _pow2(splits)), num_warps=4,
        )
    return output
