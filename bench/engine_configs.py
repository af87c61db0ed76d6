"""KV-cache configurations compared by the benchmarks, and running each in isolation.

A configuration is written on the command line as

    KV[+profile:PROFILE][@BACKEND]     or     profile:PROFILE[@BACKEND]

where KV is one of vLLM's `kv_cache_dtype` values (`bf16`/`auto` = the model dtype,
`fp8`, `int4_per_token_head`, ...), PROFILE a vllm-kvplug profile name or YAML path, and
BACKEND a vLLM attention backend (FLASH_ATTN, TRITON_ATTN, ...). Examples: `bf16@FLASH_ATTN`,
`fp8@FLASH_ATTN`, `int4_per_token_head@TRITON_ATTN`, `profile:none`.

Each configuration runs in its own child process, so one engine's memory and CUDA state
never leak into the next measurement, and a configuration that fails to start is reported
instead of ending the whole run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


def _child(fn: Callable, config: KVConfig, args: dict, result_path: str) -> None:
    try:
        result = {"ok": True, **fn(config, args)}
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    Path(result_path).write_text(json.dumps(result))
    # vLLM's CPU engine sometimes aborts during interpreter shutdown after all work is
    # done; the result is already on disk, so leave without running finalizers.
    os._exit(0)


def run_isolated(fn: Callable[[KVConfig, dict], dict], config: KVConfig, args: dict,
                 work_dir: Path, timeout_s: float | None = None) -> dict:
    """Run `fn(config, args)` in a spawned child and return its JSON-able result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.label)
    result_path = work_dir / f"result-{safe}.json"
    result_path.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(fn, config, args, str(result_path)))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"ok": False, "error": f"timed out after {timeout_s} s"}
    if not result_path.exists():
        return {"ok": False, "error": f"child exited with code {proc.exitcode} and no result"}
    return json.loads(result_path.read_text())


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
