"""What one vLLM worker holds for its attention layers: a read-only report for checks.

`attention_report` runs inside a worker (every tensor-parallel rank) through
`LLM.collective_rpc(attention_report)`; it says which attention backend and
implementation each layer uses, which KV-cache spec it reports, the dtype and bytes per
block of the cache tensor vLLM bound to it, and how much of that tensor has been written.
`compression_problems` turns one rank's report into the reasons it is *not* serving the
plugin's quantized cache (an empty list when it is). The function must be importable in
the worker, which is why it lives in the installed package and not in `bench/`.

Calling a function through `collective_rpc` needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1`
in the process that creates the `LLM` (vLLM pickles the function for the engine core).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

QUANTIZED_SPECS = ("QuantizedKVSpec", "EvictingKVSpec")


def attention_report(worker) -> dict[str, Any]:
    """Run in a vLLM worker: its tensor-parallel rank and its attention layers."""
    import torch
    from vllm.distributed import (get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)

    worker = getattr(worker, "worker", None) or worker  # WorkerWrapperBase or worker
    runner = worker.model_runner
    vllm_config = runner.vllm_config
    layers = {name: layer for name, layer in
              vllm_config.compilation_config.static_forward_context.items()
              if hasattr(layer, "attn_backend") and hasattr(layer, "kv_cache")}
    entries = []
    for name, layer in sorted(layers.items()):
        backend = layer.attn_backend
        spec = layer.get_kv_cache_spec(vllm_config)
        cache = layer.kv_cache
        if isinstance(cache, (list, tuple)):  # one per virtual engine in some releases
            cache = cache[0] if cache else None
        entry = {
            "layer": name,
            "backend": f"{backend.__module__}.{backend.__qualname__}",
            "backend_name": backend.get_name(),
            "impl": type(layer.impl).__qualname__,
            "quantized_backend": _is_quantized_backend(backend),
            "num_kv_heads": int(layer.num_kv_heads),
            "head_size": int(layer.head_size),
            "kv_cache_dtype_setting": str(getattr(layer, "kv_cache_dtype", "")),
            "spec": type(spec).__qualname__ if spec is not None else None,
            "spec_page_bytes": int(spec.page_size_bytes) if spec is not None else None,
            "spec_block_size": int(spec.block_size) if spec is not None else None,
        }
        if entry["quantized_backend"] and spec is not None:
            from vllm_kvplug.vllm_glue.attention_backend import layout_for

            entry["expected_page_bytes"] = layout_for(
                vllm_config, layer.num_kv_heads, layer.head_size, spec.block_size).page_bytes
        if cache is not None and cache.numel():
            blocks = runner.kv_cache_config.num_blocks if getattr(
                runner, "kv_cache_config", None) else None
            entry.update(
                cache_dtype=str(cache.dtype).replace("torch.", ""),
                cache_shape=list(cache.shape),
                cache_bytes=cache.numel() * cache.element_size(),
                cache_blocks=blocks,
                cache_nonzero_fraction=_nonzero_bytes_fraction(cache),
            )
        entries.append(entry)
    device = str(getattr(worker, "device", "")) or None
    from vllm_kvplug.vllm_glue.eviction_rows import evicted_requests

    return {
        "evicted_requests": evicted_requests(),
        "tp_rank": get_tensor_model_parallel_rank(),
        "tp_size": get_tensor_model_parallel_world_size(),
        "pid": os.getpid(),
        "device": device,
        "device_name": (torch.cuda.get_device_name(worker.device)
                        if device and device.startswith("cuda") else "cpu"),
        "worker_class": type(worker).__qualname__,
        "num_layers": len(entries),
        "backends": dict(Counter(e["backend_name"] for e in entries)),
        "specs": dict(Counter(str(e["spec"]) for e in entries)),
        "layers": entries,
    }


def _nonzero_bytes_fraction(tensor, chunk: int = 1 << 28) -> float:
    """Fraction of the non-zero bytes of the storage under `tensor`, counted in chunks (a
    cache may fill most of a GPU and may be a strided view; no copy, no large temporary)."""
    import torch

    raw = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(
        tensor.untyped_storage())
    total = raw.numel()
    nonzero = sum(int(torch.count_nonzero(raw[i:i + chunk]).item())
                  for i in range(0, total, chunk))
    return nonzero / total if total else 0.0


def _is_quantized_backend(backend) -> bool:
    try:
        from vllm_kvplug.vllm_glue.attention_backend import QuantizedKVBackend
    except Exception:  # noqa: BLE001 - a report must not fail on an import problem
        return False
    return isinstance(backend, type) and issubclass(backend, QuantizedKVBackend)


def compression_problems(report: dict[str, Any], total_kv_heads: int | None = None
                         ) -> list[str]:
    """Why the rank of `report` does not serve the quantized cache ([] if it does).

    Every attention layer must run on the plugin's backend, report `QuantizedKVSpec`
    (or a subclass) with the page size of the plugin's layout, be bound to a uint8 cache
    whose blocks have that size, and have bytes written in it; with `total_kv_heads`, it
    must also hold the model's KV heads divided by the tensor-parallel size.
    """
    problems = []
    entries = report.get("layers", [])
    if not entries:
        return [f"rank {report.get('tp_rank')}: no attention layers found"]
    if total_kv_heads is not None:
        from vllm_kvplug.quant.key_offsets import kv_head_range

        _, expected_heads = kv_head_range(total_kv_heads, report["tp_size"],
                                          report["tp_rank"])
    else:
        expected_heads = None
    for e in entries:
        where = f"rank {report.get('tp_rank')} layer {e['layer']}"
        if not e.get("quantized_backend"):
            problems.append(f"{where}: backend {e['backend']} is not the plugin's")
            continue
        if e.get("spec") not in QUANTIZED_SPECS:
            problems.append(f"{where}: KV spec {e.get('spec')} is not QuantizedKVSpec")
        if e.get("spec_page_bytes") != e.get("expected_page_bytes"):
            problems.append(f"{where}: page {e.get('spec_page_bytes')} bytes, the layout "
                            f"needs {e.get('expected_page_bytes')}")
        if e.get("cache_dtype") != "uint8":
            problems.append(f"{where}: cache dtype {e.get('cache_dtype')}, expected uint8")
        blocks = e.get("cache_blocks")
        if blocks and e.get("cache_bytes") != blocks * (e.get("expected_page_bytes") or 0):
            problems.append(f"{where}: cache of {e.get('cache_bytes')} bytes is not "
                            f"{blocks} pages of {e.get('expected_page_bytes')} bytes")
        if not e.get("cache_nonzero_fraction"):
            problems.append(f"{where}: nothing written to the cache")
        if expected_heads is not None and e.get("num_kv_heads") != expected_heads:
            problems.append(f"{where}: {e.get('num_kv_heads')} KV heads, expected "
                            f"{expected_heads} of {total_kv_heads} at TP={report['tp_size']}")
    return problems
