"""The compression-profile schema: what a profile YAML may say, with types and limits.

A profile describes one treatment of the KV cache. Each feature of the plugin owns one
section (quantization, eviction, chunk reuse, controller); a section whose switch is off
("none" / false) leaves that part of vLLM untouched. Unknown keys are rejected so that a
typo never silently turns a feature off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROFILE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class QuantizationSection(_Section):
    """Quantized paged KV (INT4 / INT2 with block-diagonal Hadamard rotation)."""

    method: Literal["none", "int4", "int2"] = "none"
    # Bits of K when they differ from the method's (K carries most of the error; e.g. 8
    # with method int4 keeps K at INT8 and V at INT4). None: same as the method.
    key_bits: Literal[2, 4, 8] | None = None
    # Token-wise group: how many consecutive elements of one head vector share a scale.
    group_size: Literal[32, 64, 128] = 128
    rotation: Literal["none", "hadamard"] = "hadamard"
    # Size of each diagonal block of the Hadamard rotation (a power of two).
    hadamard_block: Literal[16, 32, 64, 128, 256] = 64
    # Tokens kept at higher precision: the first `sink_tokens` and the last `recent_tokens`.
    sink_tokens: int = Field(default=0, ge=0, le=1024)
    recent_tokens: int = Field(default=0, ge=0, le=65536)
    # Static per-(layer, KV head) K offsets subtracted before quantizing K (a file from
    # `python -m vllm_kvplug.calibrate`; relative paths in a profile file are relative to
    # that file's folder). None: off.
    key_offsets: str | None = None

    @field_validator("key_offsets")
    @classmethod
    def _key_offsets_file_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"K offsets file not found: {value} (make one with "
                             "python -m vllm_kvplug.calibrate MODEL --out FILE)")
        return value

    @model_validator(mode="after")
    def _key_offsets_need_quantization(self) -> QuantizationSection:
        if self.key_offsets is not None and self.method == "none":
            raise ValueError("key_offsets is set but method is 'none': K offsets only "
                             "apply to a quantized KV cache (set method: int4 or int2, or "
                             "remove key_offsets)")
        return self


class EvictionSection(_Section):
    """Per-KV-head token eviction with a budget (SnapKV / PyramidKV / Ada-KV family)."""

    policy: Literal["none", "snapkv", "pyramidkv", "adakv", "streamingllm"] = "none"
    # Budget: a fraction of the prompt, an absolute token count, or both (the smaller wins).
    budget_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    budget_tokens: int | None = Field(default=None, gt=0)
    # Never keep fewer than this many tokens per head.
    min_tokens: int = Field(default=64, ge=0)
    # Prompt tail whose queries score the rest (SnapKV observation window).
    window_tokens: int = Field(default=32, gt=0, le=4096)
    # First tokens always kept (attention sinks).
    sink_tokens: int = Field(default=4, ge=0, le=1024)

    @model_validator(mode="after")
    def _budget_required(self) -> EvictionSection:
        if self.policy != "none" and self.budget_fraction is None and self.budget_tokens is None:
            raise ValueError(
                f"policy '{self.policy}' needs a budget: set budget_fraction (0 < f <= 1) "
                "and/or budget_tokens (> 0)"
            )
        return self


class ChunkReuseSection(_Section):
    """Reuse of stored chunk KV at any position with selective recompute (CacheBlend)."""

    enabled: bool = False
    # Fraction of each reused chunk's tokens recomputed (0 = plain reuse).
    recompute_ratio: float = Field(default=0.15, ge=0.0, le=1.0)


class ControllerSection(_Section):
    """Which profiles the service-aware controller may switch between."""

    enabled: bool = False
    allowed_profiles: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _needs_candidates(self) -> ControllerSection:
        if self.enabled and not self.allowed_profiles:
            raise ValueError("enabled controller needs a non-empty allowed_profiles list")
        return self


class Profile(_Section):
    """One named KV-cache compression profile."""

    name: str = Field(pattern=PROFILE_NAME_PATTERN)
    description: str = ""
    quantization: QuantizationSection = QuantizationSection()
    eviction: EvictionSection = EvictionSection()
    chunk_reuse: ChunkReuseSection = ChunkReuseSection()
    controller: ControllerSection = ControllerSection()

    @property
    def is_passthrough(self) -> bool:
        """True when the profile changes nothing about vLLM's KV cache."""
        return (
            self.quantization.method == "none"
            and self.eviction.policy == "none"
            and not self.chunk_reuse.enabled
        )

    def enabled_settings(self) -> dict[str, object]:
        """The switches this profile turns on, as dotted field -> value."""
        settings: dict[str, object] = {}
        if self.quantization.method != "none":
            settings["quantization.method"] = self.quantization.method
            for key in ("sink_tokens", "recent_tokens"):
                if getattr(self.quantization, key):
                    settings[f"quantization.{key}"] = getattr(self.quantization, key)
        if self.eviction.policy != "none":
            settings["eviction.policy"] = self.eviction.policy
        if self.chunk_reuse.enabled:
            settings["chunk_reuse.enabled"] = True
        if self.controller.enabled:
            settings["controller.enabled"] = True
        return settings
