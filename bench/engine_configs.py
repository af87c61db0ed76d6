"""KV-cache configurations compared by the benchmarks, and their markdown tables.

A configuration is written on the command line as

    KV[+profile:PROFILE][@BACKEND]     or     profile:PROFILE[@BACKEND]

where KV is one of vLLM's `kv_cache_dtype` values (`bf16`/`auto` = the model dtype,
`fp8`, `int4_per_token_head`, ...), PROFILE a vllm-kvplug profile name or YAML path, and
BACKEND a vLLM attention backend (FLASH_ATTN, TRITON_ATTN, ...). Examples: `bf16@FLASH_ATTN`,
`fp8@FLASH_ATTN`, `int4_per_token_head@TRITON_ATTN`, `profile:none`.

`isolation.py` runs each configuration in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVConfig:
    label: str
    kv_cache_dtype: str = "auto"
    profile: str | None = None
    attention_backend: str | None = None

    @classmethod
    def parse(cls, text: str) -> KVConfig:
        spec, _, backend = text.partition("@")
        kv, profile = "auto", None
        for part in spec.split("+"):
            if part.startswith("profile:"):
                profile = part[len("profile:"):]
                if not profile:
                    raise ValueError(f"empty profile in configuration {text!r}")
            elif part:
                kv = "auto" if part in ("bf16", "auto", "model") else part
        return cls(label=text, kv_cache_dtype=kv, profile=profile,
                   attention_backend=backend or None)

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM` that select this configuration."""
        kwargs: dict[str, Any] = {"kv_cache_dtype": self.kv_cache_dtype}
        if self.profile is not None:
            kwargs["additional_config"] = {"kv_compression": self.profile}
        if self.attention_backend is not None:
            kwargs["attention_config"] = {"backend": self.attention_backend}
        return kwargs


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
