"""A quantization recipe: bits, group size, rotation, and the bytes it stores per token.

One (token, KV head) vector of `head_size` elements costs `head_size * bits / 8` bytes of
packed codes plus, per group of `group_size` elements, an fp16 step and an fp16 minimum
(asymmetric, 4 bytes a group). K and V may use different bit widths (`KVRecipe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvplug.profiles.schema import QuantizationSection

METADATA_BYTES_PER_GROUP = 4  # fp16 scale + fp16 minimum
SUPPORTED_BITS = (2, 4, 8)
METHOD_BITS = {"int4": 4, "int2": 2}


@dataclass(frozen=True)
class QuantRecipe:
    bits: int
    group_size: int
    hadamard_block: int | None  # None: no rotation

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.hadamard_block is not None and self.hadamard_block & (self.hadamard_block - 1):
            raise ValueError(f"hadamard_block must be a power of two, got {self.hadamard_block}")

    @classmethod
    def from_section(cls, section: QuantizationSection, bits: int | None = None
                     ) -> QuantRecipe:
        """The recipe of a profile's quantization section (`bits` overrides the method's)."""
        if section.method == "none":
            raise ValueError("quantization.method is 'none': no recipe")
        return cls(bits=bits or METHOD_BITS[section.method],
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


@dataclass(frozen=True)
class KVRecipe:
    """The recipes of K and V of one layer (same groups and rotation, bits may differ)."""

    key: QuantRecipe
    value: QuantRecipe

    @classmethod
    def from_section(cls, section: QuantizationSection) -> KVRecipe:
        return cls(key=QuantRecipe.from_section(section, section.key_bits),
                   value=QuantRecipe.from_section(section))

    @property
    def hadamard_block(self) -> int | None:
        return self.key.hadamard_block

    def check_head_size(self, head_size: int) -> None:
        self.key.check_head_size(head_size)
        self.value.check_head_size(head_size)

    def bytes_per_token_head(self, head_size: int) -> int:
        """Bytes of K plus V for one (token, KV head)."""
        return self.key.bytes_per_vector(head_size) + self.value.bytes_per_vector(head_size)
