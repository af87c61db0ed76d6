"""A quantization recipe: bits, group size, rotation, and the bytes it stores per token.

Layout of one (token, KV head) vector of `head_size` elements, for K and for V alike:
`head_size * bits / 8` bytes of packed codes, then per group of `group_size` elements an
fp16 scale and an fp16 minimum (asymmetric, 4 bytes a group).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvplug.profiles.schema import QuantizationSection

METADATA_BYTES_PER_GROUP = 4  # fp16 scale + fp16 minimum


@dataclass(frozen=True)
class QuantRecipe:
    bits: int
    group_size: int
    hadamard_block: int | None  # None: no rotation

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            raise ValueError(f"bits must be 2 or 4, got {self.bits}")
        if self.hadamard_block is not None and self.hadamard_block & (self.hadamard_block - 1):
            raise ValueError(f"hadamard_block must be a power of two, got {self.hadamard_block}")

    @classmethod
    def from_section(cls, section: QuantizationSection) -> QuantRecipe:
        if section.method == "none":
            raise ValueError("quantization.method is 'none': no recipe")
        return cls(bits={"int4": 4, "int2": 2}[section.method],
                   group_size=section.group_size,
                   hadamard_block=section.hadamard_block if section.rotation == "hadamard"
                   else None)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def check_head_size(self, head_size: int) -> None:
        """Raise a ValueError naming the option when `head_size` does not fit the recipe."""
        if head_size % self.group_size:
            raise ValueError(f"head size {head_size} is not a multiple of "
                             f"quantization.group_size {self.group_size}; use a group size "
                             f"that divides {head_size}")
        if self.hadamard_block is not None and head_size % self.hadamard_block:
            raise ValueError(f"head size {head_size} is not a multiple of "
                             f"quantization.hadamard_block {self.hadamard_block}; use a "
                             f"block that divides {head_size}")

    def bytes_per_vector(self, head_size: int) -> int:
        """Bytes stored for one (token, KV head) K or V vector."""
        self.check_head_size(head_size)
        return (head_size * self.bits // 8
                + head_size // self.group_size * METADATA_BYTES_PER_GROUP)
