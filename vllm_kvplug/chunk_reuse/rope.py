"""Moving stored post-RoPE keys to new positions.

vLLM caches keys *after* rotary position embedding: the key of a token at position p is
R(p)·k, where R(p) rotates each pair of rotary dimensions (i, i') by the angle
p·θ_i, θ_i = base^(-2i / rotary_dim). Rotations compose, R(b)·R(a) = R(a + b), so a key
stored at position p_old is moved to p_new by applying R(p_new - p_old); there is no need
to keep the pre-RoPE key. Values carry no position and are reused unchanged.

Pairing of the rotary dimensions (the first `rotary_dim` of each head; the rest pass
through unchanged, "partial rotary"):

* GPT-NeoX style (`is_neox_style=True`, Llama, Qwen, ...): element i pairs with
  i + rotary_dim/2;
* GPT-J style (`is_neox_style=False`): elements 2i and 2i + 1 pair.

Only plain RoPE (``rope_type`` "default") is supported. Scaled variants (llama3, linear,
yarn, dynamic NTK, longrope, mrope, ...) raise `NotImplementedError` naming the type.
Angles are computed in float64 and the rotation in float32 (or float64 for float64 input),
then cast back to the key's dtype.

`reposition_rotated_keys` does the same for keys kept in the Hadamard-rotated space of the
quantized KV format (K' = K·H): K' ↦ (R(Δ)·(K'·H))·H, H being its own inverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default",)


@dataclass(frozen=True)
class RopeParams:
    rotary_dim: int
    base: float
    is_neox_style: bool = True


def check_rope_type(rope_type: str | None) -> None:
    """Raise `NotImplementedError` for RoPE variants the re-positioning does not handle."""
    if rope_type in (None, "default"):
        return
    raise NotImplementedError(
        f"chunk reuse: re-positioning keys for rope_type {rope_type!r} is not implemented "
        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); disable chunk_reuse for this model")


def rope_params_from_config(rope_parameters: Mapping[str, object] | None, head_size: int,
                            is_neox_style: bool = True) -> RopeParams:
    """`RopeParams` from a Hugging Face / vLLM ``rope_parameters`` dict.

    Reads ``rope_type`` (checked), ``rope_theta`` (default 10000), and ``rope_dim`` or
    ``partial_rotary_factor`` for the rotary dimension, as vLLM's `get_rope` does.
    """
    params = dict(rope_parameters or {})
    check_rope_type(params.get("rope_type", params.get("type")))  # type: ignore[arg-type]
    base = float(params.get("rope_theta", 10000.0))  # type: ignore[arg-type]
    rotary_dim = params.get("rope_dim")
    if not rotary_dim:
        factor = float(params.get("partial_rotary_factor", 1.0))  # type: ignore[arg-type]
        rotary_dim = int(head_size * factor)
    return RopeParams(int(rotary_dim), base, is_neox_style)  # type: ignore[arg-type]


def _as_positions(positions: torch.Tensor | Sequence[int] | int, n: int,
                  device: torch.device) -> torch.Tensor:
    p = torch.as_tensor(positions, device=device)
    if p.dtype.is_floating_point or p.is_complex():
        raise TypeError("positions must be integers")
    p = p.to(torch.int64)
    if p.dim() == 0:
        p = p.expand(n)
    if p.shape != (n,):
        raise ValueError(f"positions must be a scalar or have shape ({n},), got {tuple(p.shape)}")
    return p


def _check_dims(x: torch.Tensor, rotary_dim: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"keys must be [tokens, ..., head_size], got shape {tuple(x.shape)}")
    head_size = x.shape[-1]
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_dim must be even and in (0, head_size={head_size}], "
                         f"got {rotary_dim}")


def apply_rope(x: torch.Tensor, positions: torch.Tensor | Sequence[int] | int,
               rotary_dim: int, base: float, is_neox_style: bool,
               rope_type: str | None = "default") -> torch.Tensor:
    """R(positions)·x for x of shape ``[tokens, ..., head_size]`` (positions per token).

    Negative positions rotate backwards (R(-p) is the inverse of R(p)).
    """
    check_rope_type(rope_type)
    _check_dims(x, rotary_dim)
    n = x.shape[0]
    pos = _as_positions(positions, n, x.device)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64,
                                      device=x.device) / rotary_dim)
    angles = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, half]
    shape = (n,) + (1,) * (x.dim() - 2) + (half,)  # broadcast over the head dims
    cos = angles.cos().to(compute).reshape(shape)
    sin = angles.sin().to(compute).reshape(shape)
    rot, rest = x[..., :rotary_dim].to(compute), x[..., rotary_dim:]
    if is_neox_style:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def reposition_keys(k: torch.Tensor, old_positions: torch.Tensor | Sequence[int] | int,
                    new_positions: torch.Tensor | Sequence[int] | int, rotary_dim: int,
                    base: float, is_neox_style: bool,
                    rope_type: str | None = "default") -> torch.Tensor:
    """Post-RoPE keys computed at `old_positions`, as if computed at `new_positions`.

    `k` is ``[tokens, heads, head_size]`` (any leading head dims, or none); positions are
    per token (or scalars). Returns a new tensor of k's dtype.
    """
    n = k.shape[0] if k.dim() else 0
    old = _as_positions(old_positions, n, k.device)
    new = _as_positions(new_positions, n, k.device)
    return apply_rope(k, new - old, rotary_dim, base, is_neox_style, rope_type)


def reposition_rotated_keys(k_rotated: torch.Tensor, old_positions, new_positions,
                            rotary_dim: int, base: float, is_neox_style: bool,
                            hadamard_block: int, rope_type: str | None = "default"
                            ) -> torch.Tensor:
    """`reposition_keys` for keys stored as K·blockdiag(H) (the quantized format's space).

    The rotation R(Δ) does not commute with the Hadamard blocks, so the keys are taken
    back to the plain space, re-rotated, and rotated again. Dequantization before and
    requantization after are the caller's (see `vllm_kvplug.quant.reference`).
    """
    from vllm_kvplug.quant.reference import block_hadamard

    plain = block_hadamard(k_rotated, hadamard_block)
    moved = reposition_keys(plain, old_positions, new_positions, rotary_dim, base,
                            is_neox_style, rope_type)
    return block_hadamard(moved, hadamard_block)
