"""Offline throughput of KV-cache configurations, side by side, on one GPU.

Runs vLLM's offline engine with a real model *config* and random weights
(`load_format="dummy"`), token-id prompts and `ignore_eos`, so every configuration does
exactly the same work. For each configuration (see `engine_configs.py` for the syntax) and
each workload `REQUESTSxPROMPT+OUTPUT` it reports output tokens/s, the KV-cache blocks vLLM
allocated, and both as a ratio to the first configuration (bf16 by default), all measured
in the same run. Prints a markdown table and writes JSON.

    python bench/throughput.py --workloads 512x2048+256 \
        --configs bf16@FLASH_ATTN fp8@FLASH_ATTN int4_per_token_head@TRITON_ATTN
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_configs import KVConfig, markdown_table  # noqa: E402
from isolation import run_isolated, stop_engine  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parent / "model_configs" / "llama-3.1-8b"
DEFAULT_CONFIGS = ["bf16@FLASH_ATTN", "fp8@FLASH_ATTN", "int4_per_token_head@TRITON_ATTN"]


@dataclass(frozen=True)
class Workload:
    requests: int
    prompt_len: int
    output_len: int

    @classmethod
    def parse(cls, text: str) -> Workload:
        try:
            n, rest = text.lower().split("x", 1)
            prompt, output = rest.split("+", 1)
            workload = cls(int(n), int(prompt), int(output))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"workload {text!r} is not REQUESTSxPROMPT+OUTPUT, e.g. 512x2048+256"
            ) from None
        if min(workload.requests, workload.prompt_len, workload.output_len) < 1:
            raise argparse.ArgumentTypeError(f"workload {text!r}: all numbers must be >= 1")
        return workload

    def __str__(self) -> str:
        return f"{self.requests}x{self.prompt_len}+{self.output_len}"


def token_prompts(workload: Workload, vocab_size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(100, vocab_size - 100)
                              for _ in range(workload.prompt_len)]}
        for _ in range(workload.requests)
    ]


def measure(config: KVConfig, args: dict) -> dict:
    """Child process: start one engine, run every workload, return the numbers."""
    import torch
    from vllm import LLM

    workloads = [Workload.parse(w) for w in args["workloads"]]
    max_len = args["max_model_len"] or max(w.prompt_len + w.output_len for w in workloads)
    started = time.perf_counter()
    llm = None
    try:
        llm = LLM(
            model=args["model"],
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=args["dtype"],
            max_model_len=max_len,
            gpu_memory_utilization=args["gpu_memory_utilization"],
            enforce_eager=args["enforce_eager"],
            seed=args["seed"],
            disable_log_stats=not args["latency_stats"],
            **({"max_num_seqs": args["max_num_seqs"]} if args["max_num_seqs"] else {}),
            **profiler_kwargs(config, args),
            **config.llm_kwargs(),
        )
        cache = llm.llm_engine.vllm_config.cache_config
        result = {
            "num_gpu_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "kv_capacity_tokens": cache.num_gpu_blocks * cache.block_size,
            "startup_s": round(time.perf_counter() - started, 1),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "workloads": run_workloads(llm, workloads, args, profiler_dir(config, args)),
        }
    finally:
        stop_engine(llm)
    return result


def profiler_dir(config: KVConfig, args: dict) -> Path | None:
    if not args.get("profile_dir"):
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in config.label)
    return Path(args["profile_dir"]).resolve() / safe


def profiler_kwargs(config: KVConfig, args: dict) -> dict:
    """vLLM's torch profiler in the worker (`--profile-dir`): kernels only, no stacks."""
    out = profiler_dir(config, args)
    if out is None:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    return {"profiler_config": {"profiler": "torch", "torch_profiler_dir": str(out),
                                "torch_profiler_with_stack": False,
                                "ignore_frontend": True}}


# Kernel-name fragments of each category of GPU time, first match wins (lower case).
KERNEL_CATEGORIES = (
    ("attention", ("attention", "attn", "flash", "fmha", "merge_split")),
    ("kv write", ("write_kv", "reshape_and_cache", "concat_and_cache")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")),
)


def kernel_time_summary(trace: Path) -> dict:
    """GPU kernel time of one torch-profiler trace, grouped by `KERNEL_CATEGORIES`, with
    the ten most expensive kernels."""
    import gzip
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f).get("traceEvents", [])
    by_name: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            by_name[e["name"]] = by_name.get(e["name"], 0.0) + e["dur"] / 1e3
    categories = {name: 0.0 for name, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    for name, ms in by_name.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)),
                   "other")
        categories[cat] += ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {"kernel_ms_total": round(sum(by_name.values()), 1),
            "kernel_ms_by_category": {k: round(v, 1) for k, v in categories.items()},
            "top_kernels_ms": [[name[:120], round(ms, 1)] for name, ms in top]}


class RunningSampler:
    """Samples vLLM's `vllm:num_requests_running` gauge (Prometheus, in-process, needs log
    stats) every `period` seconds from a thread while a workload runs: max and mean."""

    def __init__(self, period: float = 0.25) -> None:
        import threading

        self.period, self.values = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from prometheus_client import REGISTRY

        while not self._stop.wait(self.period):
            running = [s.value for m in REGISTRY.collect()
                       if m.name == "vllm:num_requests_running" for s in m.samples]
            if running:
                self.values.append(sum(running))

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.values:
            return {}
        return {"max_running": int(max(self.values)),
                "mean_running": round(sum(self.values) / len(self.values), 1)}


def eviction_totals() -> dict:
    """The plugin's eviction counters in this process's Prometheus registry (present when
    the profile evicts and log stats are on)."""
    from prometheus_client import REGISTRY

    names = ("kvplug_eviction_requests_total", "kvplug_eviction_blocks_returned_total")
    totals = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in names:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def run_workloads(llm, workloads: list[Workload], args: dict, profile_to: Path | None = None
                  ) -> list[dict]:
    from vllm import SamplingParams

    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    # Warm-up outside the timed region (allocator, Triton autotuning, sampler).
    warm = Workload(min(8, workloads[0].requests), min(256, workloads[0].prompt_len), 8)
    llm.generate(token_prompts(warm, vocab, args["seed"] + 1),
                 SamplingParams(max_tokens=warm.output_len, ignore_eos=True), use_tqdm=False)
    entries = []
    for index, workload in enumerate(workloads):
        # A distinct prompt set per workload: a repeated prompt would be a prefix-cache hit.
        prompts = token_prompts(workload, vocab, args["seed"] + 7919 * index)
        params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True,
                                temperature=args["temperature"], seed=args["seed"])
        if profile_to is not None:
            llm.start_profile(profile_prefix=f"w{index}")
        sampler = RunningSampler()
        evicted_before = eviction_totals() if args["latency_stats"] else {}
        t0 = time.perf_counter()
        if args["latency_stats"]:
            with sampler:
                outputs = llm.generate(prompts, params, use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        entry = {
            "workload": str(workload),
            "elapsed_s": round(elapsed, 3),
            "output_tokens": out_tokens,
            "output_tok_per_s": round(out_tokens / elapsed, 1),
            "total_tok_per_s": round((out_tokens + workload.requests * workload.prompt_len)
                                     / elapsed, 1),
        }
        if args["latency_stats"]:
            entry.update(latency_summary(outputs))
            entry.update(sampler.summary())
            for name, total in eviction_totals().items():
                entry[name.replace("kvplug_eviction_", "evicted_").replace("_total", "")] = \
                    int(total - evicted_before.get(name, 0.0))
        if profile_to is not None:
            llm.stop_profile()
            traces = [p for p in profile_to.rglob("*.json*") if p.stat().st_mtime >= t0]
            newest = max(traces, key=lambda p: p.stat().st_mtime, default=None)
            entry["profile"] = (kernel_time_summary(newest) if newest
                                else {"error": f"no new trace under {profile_to}"})
        entries.append(entry)
    return entries


def latency_summary(outputs) -> dict:
    """Mean TTFT and TPOT from vLLM's per-request stats (needs log stats enabled)."""
    ttft, tpot = [], []
    for o in outputs:
        m = o.metrics
        if m is None or not m.first_token_ts:
            continue
        ttft.append(m.first_token_latency)
        n = len(o.outputs[0].token_ids)
        if n > 1:
            tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    mean = lambda xs: round(1000 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    return {"mean_ttft_ms": mean(ttft), "mean_tpot_ms": mean(tpot)}


def build_table(configs: list[KVConfig], results: dict[str, dict], workloads: list[str]):
    base = results.get(configs[0].label, {})
    header = ["config", "workload", "output tok/s", "x " + configs[0].label, "KV blocks",
              "blocks x", "startup s"]
    if any(w.get("mean_tpot_ms") is not None for r in results.values()
           for w in r.get("workloads", [])):
        header += ["mean TTFT ms", "mean TPOT ms", "running max / mean"]
    rows = []
    for config in configs:
        r = results[config.label]
        if not r.get("ok"):
            rows.append([config.label, "-", "FAILED: " + r.get("error", "")[:120]]
                        + ["-"] * (len(header) - 3))
            continue
        for w in r["workloads"]:
            base_w = next((b for b in base.get("workloads", [])
                           if b["workload"] == w["workload"]), None)
            speed = (f"{w['output_tok_per_s'] / base_w['output_tok_per_s']:.2f}"
                     if base_w else "-")
            blocks = (f"{r['num_gpu_blocks'] / base['num_gpu_blocks']:.2f}"
                      if base.get("ok") else "-")
            row = [config.label, w["workload"], f"{w['output_tok_per_s']:,.0f}", speed,
                   f"{r['num_gpu_blocks']:,}", blocks, r["startup_s"]]
            if len(header) > 7:
                running = (f"{w['max_running']} / {w['mean_running']}"
                           if "max_running" in w else "-")
                row += [w.get("mean_ttft_ms"), w.get("mean_tpot_ms"), running]
            rows.append(row)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="model folder (a config.json is enough with dummy weights)")
    parser.add_argument("--workloads", nargs="+", type=Workload.parse,
                        default=[Workload(512, 2048, 256)])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="first one is the baseline of the ratios")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="disable CUDA graphs / torch.compile")
    parser.add_argument("--latency-stats", action="store_true",
                        help="also report mean TTFT / TPOT (enables vLLM's stats logging)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--work-dir", default=None,
                        help="per-configuration results (default: OUT_DIR/work)")
    parser.add_argument("--tag", default="throughput")
    parser.add_argument("--profile-dir", default=None,
                        help="profile every timed workload with vLLM's torch profiler "
                             "(traces here; GPU kernel time by category in the JSON). "
                             "Profiling slows the run: use its times for shares only")
    ns = parser.parse_args(argv)

    configs = [KVConfig.parse(c) for c in ns.configs]
    child_args = {
        "model": ns.model, "workloads": [str(w) for w in ns.workloads], "dtype": ns.dtype,
        "gpu_memory_utilization": ns.gpu_memory_utilization,
        "max_model_len": ns.max_model_len, "max_num_seqs": ns.max_num_seqs,
        "enforce_eager": ns.enforce_eager, "latency_stats": ns.latency_stats,
        "temperature": ns.temperature, "seed": ns.seed, "profile_dir": ns.profile_dir,
    }
    out_dir = Path(ns.out_dir)
    results: dict[str, dict] = {}
    for config in configs:
        print(f"== {config.label}", flush=True)
        results[config.label] = run_isolated(measure, config, child_args,
                                              Path(ns.work_dir or out_dir / "work"),
                                              ns.timeout_s)
        print(json.dumps({k: v for k, v in results[config.label].items()
                          if k != "traceback"})[:2000], flush=True)

    table = build_table(configs, results, child_args["workloads"])
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"args": child_args, "configs": [c.label for c in configs],
              "host": platform.node(), "results": results, "table": table}
    (out_dir / f"{ns.tag}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{ns.tag}.md").write_text(table + "\n")
    return 0 if all(r.get("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
