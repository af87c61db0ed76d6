"""PyTorch reference of the quantized KV format (the specification kernels must match).

Write path, per (token, KV head) vector x of `head_size` elements (post-RoPE K, or V):
  1. rotate: x' = x · blockdiag(H_b) with H_b the orthonormal b×b Sylvester Hadamard
     matrix (symmetric and its own inverse), b = `hadamard_block`;
  2. split x' into groups of `group_size`; per group min m and scale s = (max - m) / L,
     L = 2^bits - 1, both rounded to fp16 first so that the stored values are used;
  3. codes q = clamp(floor((x' - m) / s + 1/2), 0, L), packed planar: with
     P = 8 / bits codes per byte and d' = head_size / P, byte j holds element j + i·d' in
     bits [i·bits, (i+1)·bits) for i = 0..P-1 (INT4: element j in the low nibble, element
     j + d/2 in the high nibble), so a kernel unpacks contiguous halves/quarters of the
     vector with one shift and mask each.
Read path: x' ≈ q·s + m; attention runs in the rotated space (q·H against K', and the
output of softmax·V' rotated back with H), so x itself is never rebuilt in the kernel.
"""

from __future__ import annotations

import functools

import torch

from vllm_kvplug.quant.recipe import QuantRecipe


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(dtype=dtype, device=device)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """Orthonormal n×n Sylvester Hadamard matrix (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    return _hadamard(n, dtype, str(device))


def block_hadamard(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x · blockdiag(H_block) over the last dimension (its own inverse); None: identity."""
    if block is None:
        return x
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"last dimension {d} is not a multiple of the Hadamard block {block}")
    h = hadamard_matrix(block, torch.float32, x.device)
    y = x.float().reshape(*x.shape[:-1], d // block, block) @ h
    return y.reshape(x.shape).to(x.dtype)


def quantize(x: torch.Tensor, recipe: QuantRecipe
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate and quantize the last dimension of `x`.

    Returns (packed uint8 [..., d*bits/8], scale fp16 [..., d/G], minimum fp16 [..., d/G]).
    """
    d = x.shape[-1]
    recipe.check_head_size(d)
    xr = block_hadamard(x.float(), recipe.hadamard_block)
    groups = xr.reshape(*x.shape[:-1], d // recipe.group_size, recipe.group_size)
    codes, scale, lo = asymmetric_quantize(groups, recipe.levels, dim=-1)
    codes = codes.to(torch.uint8).reshape(*x.shape[:-1], d)
    return pack(codes, recipe.bits), scale.squeeze(-1), lo.squeeze(-1)


def asymmetric_quantize(values: torch.Tensor, levels: int, dim: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of float `values` along `dim` (kept as size 1).

    Returns (codes as float in [0, levels], fp16 step, fp16 minimum). The minimum and step
    are rounded to fp16 before the codes are computed, so decoding with the stored values
    is exact up to half a step. A constant group gets step 0 and decodes exactly.
    """
    lo = values.amin(dim, keepdim=True).half()
    step = ((values.amax(dim, keepdim=True) - lo.float()) / levels).half()
    safe = torch.where(step.float() > 0, step.float(), torch.ones_like(step.float()))
    codes = torch.floor((values - lo.float()) / safe + 0.5).clamp(0, levels)
    return codes, step, lo


def dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
               recipe: QuantRecipe, rotated: bool = False) -> torch.Tensor:
    """Inverse of `quantize` (float32). `rotated=True` stays in the rotated space."""
    codes = unpack(packed, recipe.bits).float()
    d = codes.shape[-1]
    groups = codes.reshape(*codes.shape[:-1], d // recipe.group_size, recipe.group_size)
    xr = (groups * scale.float()[..., None] + minimum.float()[..., None]).reshape(codes.shape)
    return xr if rotated else block_hadamard(xr, recipe.hadamard_block)


def quantize_dequantize(x: torch.Tensor, recipe: QuantRecipe) -> torch.Tensor:
    """What attention sees after a round trip through the cache, in x's dtype."""
    return dequantize(*quantize(x, recipe), recipe).to(x.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar packing of the last dimension (see the module docstring)."""
    per_byte = 8 // bits
    c = codes.reshape(*codes.shape[:-1], per_byte, codes.shape[-1] // per_byte).to(torch.uint8)
    out = torch.zeros_like(c[..., 0, :])
    for i in range(per_byte):
        out |= c[..., i, :] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(per_byte)], -1)
