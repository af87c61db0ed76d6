"""Tensor parallelism with the compressed KV cache: active on every rank, same outputs.

For each configuration (`engine_configs.py` syntax: `bf16@FLASH_ATTN`,
`profile:int4-hadamard`, ...) this starts, one after the other and each in its own
process (`isolation.py`), an offline `vllm.LLM` at every requested tensor-parallel size
(default TP=1 with vLLM's default executor, then TP=2 with
`distributed_executor_backend="ray"`), runs the same greedy token-id prompts with the
log-probabilities of the generated tokens, and asks every worker, through
`LLM.collective_rpc(vllm_kvplug.rank_report.attention_report)`, which attention backend,
KV-cache spec and cache tensor each of its layers has after the run.

Reported per configuration: KV-cache blocks at each TP size; per rank the backends, specs
and whether it serves the plugin's quantized cache (plugin backend on every layer,
QuantizedKVSpec pages of the layout's size, a uint8 cache with bytes written, the model's
KV heads divided by TP: `kv_head_range`); and TP=1 against each other size
(`consistency_metrics.py`): identical generated tokens, first divergence and the greedy
margin there, mean/max |logprob difference| on the common prefix. The first configuration
is the control (bf16 without the plugin by default): TP changes the order of reductions
even without compression, so a compressed configuration is judged against the control's
own TP=1 vs TP=2 numbers. Prints a markdown table, writes JSON and markdown to
`--out-dir`; exits 1 if a configuration fails or a rank of a quantizing profile does not
serve the compressed cache.

    python3 bench/tiny_model.py /tmp/tiny-llama --seed 0
    python3 bench/tp_consistency.py --model /tmp/tiny-llama \
        --configs bf16@FLASH_ATTN profile:int4-hadamard profile:int2-hadamard

Real weights are needed (`load_format="dummy"` initialises each shard on its own, so TP=1
and TP=2 would run different models): `tiny_model.py` builds a small Llama from a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from consistency_metrics import chosen_logprobs, compare_runs  # noqa: E402
from engine_configs import KVConfig, markdown_table  # noqa: E402
from isolation import run_isolated, stop_engine  # noqa: E402

DEFAULT_CONFIGS = ["bf16@FLASH_ATTN", "profile:int4-hadamard", "profile:int2-hadamard"]


@dataclass(frozen=True)
class EngineRun:
    """One configuration at one tensor-parallel size (`label` names its files)."""

    config: KVConfig
    tp: int
    backend: str | None

    @property
    def label(self) -> str:
        return f"{self.config.label}@tp{self.tp}"


def token_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def quantizing(config: KVConfig) -> bool:
    """Whether the configuration's profile quantizes (so every rank must run the plugin)."""
    if config.profile is None:
        return False
    from vllm_kvplug.profiles import load_profile

    return load_profile(config.profile).profile.quantization.method != "none"


def measure(run: EngineRun, args: dict) -> dict:
    """Child process: one engine, the prompts, the per-rank reports."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(function)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_started = start_ray(args) if run.backend == "ray" and args.get("ray_prestart") else False
    from vllm import LLM, SamplingParams

    from vllm_kvplug.rank_report import attention_report

    started = time.perf_counter()
    llm = None
    try:
        llm = LLM(
            model=args["model"],
            skip_tokenizer_init=True,
            dtype=args["dtype"],
            tensor_parallel_size=run.tp,
            **({"distributed_executor_backend": run.backend} if run.backend else {}),
            max_model_len=args["prompt_len"] + args["output_len"],
            gpu_memory_utilization=args["gpu_memory_utilization"],
            enforce_eager=args["enforce_eager"],
            seed=args["seed"],
            **({"max_num_seqs": args["max_num_seqs"]} if args["max_num_seqs"] else {}),
            **run.config.llm_kwargs(),
        )
        startup = time.perf_counter() - started
        model_config = llm.llm_engine.vllm_config.model_config
        prompts = token_prompts(args["prompts"], args["prompt_len"],
                                model_config.get_vocab_size(), args["seed"])
        params = SamplingParams(temperature=0.0, max_tokens=args["output_len"],
                                ignore_eos=True, logprobs=2)
        t0 = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        elapsed = time.perf_counter() - t0
        sequences = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            logprobs, margins = chosen_logprobs(ids, out.outputs[0].logprobs)
            sequences.append({"token_ids": ids, "logprobs": logprobs, "margins": margins})
        ranks = llm.collective_rpc(attention_report, timeout=300)
        cache = llm.llm_engine.vllm_config.cache_config
        return {
            "tp": run.tp,
            "backend": run.backend or "default",
            "executor": str(llm.llm_engine.vllm_config.parallel_config
                            .distributed_executor_backend),
            "num_gpu_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "total_kv_heads": model_config.get_total_num_kv_heads(),
            "startup_s": round(startup, 1),
            "generate_s": round(elapsed, 2),
            "sequences": sequences,
            "ranks": sorted(ranks, key=lambda r: r["tp_rank"]),
        }
    finally:
        stop_engine(llm)
        if ray_started:
            import ray
            ray.shutdown()


def start_ray(args: dict) -> bool:
    """Start a Ray instance owned by this child and point vLLM's engine at it (RAY_ADDRESS),
    so the next engine never finds a stale cluster and shutdown stops everything.

    Ray picks the node IP itself (the address routed towards a public one, 127.0.0.1 on a
    host without a route); vLLM's RayExecutorV2 uses Ray's node IPs. Pinning Ray to
    loopback on a host that has a routed address makes a second driver (vLLM's engine
    core) look for its raylet at the routed address and hang, so nothing is pinned here.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return False  # use the cluster the caller named
    ray.init(include_dashboard=False, log_to_driver=True,
             **({"num_cpus": args["ray_num_cpus"]} if args.get("ray_num_cpus") else {}))
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return True


def rank_summary(result: dict, must_quantize: bool) -> dict:
    """Per-rank verdicts of one engine run."""
    from vllm_kvplug.rank_report import compression_problems

    ranks = []
    problems: list[str] = []
    for r in result.get("ranks", []):
        p = compression_problems(r, result.get("total_kv_heads")) if must_quantize else []
        problems += p
        first = r["layers"][0] if r.get("layers") else {}
        ranks.append({"tp_rank": r["tp_rank"], "pid": r["pid"], "device": r["device"],
                      "backends": r["backends"], "specs": r["specs"],
                      "kv_heads": first.get("num_kv_heads"),
                      "page_bytes": first.get("spec_page_bytes"),
                      "cache_dtype": first.get("cache_dtype"),
                      "min_nonzero_fraction": min(
                          (e.get("cache_nonzero_fraction", 0) for e in r["layers"]),
                          default=0),
                      "evicted_requests": r.get("evicted_requests"),
                      "compressed": must_quantize and not p})
    if len(ranks) != result.get("tp"):
        problems.append(f"{len(ranks)} rank reports for TP={result.get('tp')}")
    return {"ranks": ranks, "problems": problems}


def summarize(configs: list[KVConfig], tps: list[int], results: dict[str, dict[int, dict]],
              must: dict[str, bool]) -> dict[str, dict]:
    """Per configuration: blocks and rank verdicts per TP, TP=first vs each other."""
    summary = {}
    for config in configs:
        per_tp = results[config.label]
        entry: dict = {"quantizing": must[config.label], "tp": {}, "consistency": {}}
        for tp in tps:
            r = per_tp.get(tp, {})
            if not r.get("ok"):
                entry["tp"][tp] = {"ok": False, "error": r.get("error"),
                                   "root_cause": r.get("root_cause")}
                continue
            entry["tp"][tp] = {"ok": True, "num_gpu_blocks": r["num_gpu_blocks"],
                               "startup_s": r["startup_s"], "executor": r["executor"],
                               **rank_summary(r, must[config.label])}
        base = per_tp.get(tps[0], {})
        for tp in tps[1:]:
            other = per_tp.get(tp, {})
            if base.get("ok") and other.get("ok"):
                entry["consistency"][tp] = compare_runs(base["sequences"], other["sequences"])
        summary[config.label] = entry
    return summary


def build_table(configs: list[KVConfig], tps: list[int], summary: dict) -> str:
    control = configs[0].label
    header = ["config"] + [f"blocks TP={tp}" for tp in tps] + [
        "compressed on every rank", f"tokens equal TP={tps[0]} vs {tps[-1]}",
        "common prefix", "identical seqs", "first divergence min / median",
        "margin at divergence (median)", "mean / max |dlogprob|",
        f"control ({control}) tokens equal", "control mean / max |dlogprob|"]
    control_c = summary.get(control, {}).get("consistency", {}).get(tps[-1])
    rows = []
    for config in configs:
        s = summary[config.label]
        blocks = [f"{s['tp'][tp]['num_gpu_blocks']:,}" if s["tp"][tp].get("ok") else
                  "FAILED: " + str(s["tp"][tp].get("root_cause") or s["tp"][tp].get(
                      "error"))[:100] for tp in tps]
        ok_tps = [s["tp"][tp] for tp in tps if s["tp"][tp].get("ok")]
        if not s["quantizing"]:
            verdict = "n/a (no quantizing profile)"
        elif len(ok_tps) == len(tps) and not any(t["problems"] for t in ok_tps):
            verdict = "yes: " + ", ".join(f"TP={tp} {len(s['tp'][tp]['ranks'])}/"
                                          f"{len(s['tp'][tp]['ranks'])}" for tp in tps)
        else:
            reasons = [f"TP={tp} failed" for tp in tps if not s["tp"][tp].get("ok")]
            reasons += [p for t in ok_tps for p in t["problems"]]
            verdict = "NO: " + "; ".join(reasons)[:160]
        c = s["consistency"].get(tps[-1]) if len(tps) > 1 else None
        rows.append([config.label, *blocks, verdict, *consistency_cells(c),
                     *(consistency_cells(control_c)[0:1] + consistency_cells(control_c)[5:6])])
    return markdown_table(header, rows)


def consistency_cells(c: dict | None) -> list:
    if not c:
        return ["-"] * 6
    dash = lambda x: "-" if x is None else x  # noqa: E731
    margins = sorted(c["margin_at_divergence"])
    median_margin = f"{margins[len(margins) // 2]:.3f}" if margins else "-"
    return [f"{c['token_match_fraction']:.3f}", f"{c['common_prefix_fraction']:.3f}",
            f"{c['identical_sequences']}/{c['prompts']}",
            f"{dash(c['min_first_divergence'])} / {dash(c['median_first_divergence'])}",
            median_margin, _pair(c["mean_abs_logprob_diff"], c["max_abs_logprob_diff"])]


def _pair(a, b) -> str:
    return "-" if a is None else f"{a:.3g} / {b:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model folder with real weights (bench/tiny_model.py)")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="the first one is the control")
    parser.add_argument("--tp-sizes", nargs="+", type=int, default=[1, 2],
                        help="the first is the reference of the comparisons")
    parser.add_argument("--backend", default="ray",
                        help="distributed_executor_backend for TP > 1 (ray, mp)")
    parser.add_argument("--tp1-backend", default=None,
                        help="distributed_executor_backend for TP = 1 (default: vLLM's)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="disable CUDA graphs / torch.compile (faster start)")
    parser.add_argument("--ray-prestart", action="store_true",
                        help="start Ray in the benchmark child and hand its address to vLLM "
                             "(RAY_ADDRESS). Default: vLLM's engine core starts Ray itself, as "
                             "`vllm serve --distributed-executor-backend ray` does on one node; "
                             "on the 2 x H200 host the prestarted cluster hung vLLM's placement "
                             "group creation (bench/results-h200/README-tp.md)")
    parser.add_argument("--ray-num-cpus", type=int, default=None,
                        help="with --ray-prestart: CPUs the Ray instance advertises")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--tag", default="tp_consistency")
    ns = parser.parse_args(argv)
    if len(set(ns.tp_sizes)) != len(ns.tp_sizes):
        parser.error("--tp-sizes must not repeat a size")

    configs = [KVConfig.parse(c) for c in ns.configs]
    must = {c.label: quantizing(c) for c in configs}
    child_args = {"model": ns.model, "prompts": ns.prompts, "prompt_len": ns.prompt_len,
                  "output_len": ns.output_len, "dtype": ns.dtype,
                  "gpu_memory_utilization": ns.gpu_memory_utilization,
                  "max_num_seqs": ns.max_num_seqs, "enforce_eager": ns.enforce_eager,
                  "ray_num_cpus": ns.ray_num_cpus, "ray_prestart": ns.ray_prestart,
                  "seed": ns.seed}
    out_dir = Path(ns.out_dir)
    work_dir = out_dir / f"{ns.tag}-work"
    results: dict[str, dict[int, dict]] = {}
    for config in configs:
        results[config.label] = {}
        for tp in ns.tp_sizes:
            run = EngineRun(config, tp, ns.backend if tp > 1 else ns.tp1_backend)
            print(f"== {run.label} ({run.backend or 'default executor'})", flush=True)
            r = run_isolated(measure, run, child_args, work_dir, ns.timeout_s)
            results[config.label][tp] = r
            brief = {k: v for k, v in r.items() if k not in ("sequences", "ranks",
                                                             "traceback")}
            print(json.dumps(brief)[:1500], flush=True)

    summary = summarize(configs, ns.tp_sizes, results, must)
    table = build_table(configs, ns.tp_sizes, summary)
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = [f"{label} TP={tp}" for label, per_tp in results.items()
              for tp, r in per_tp.items() if not r.get("ok")]
    uncompressed = [p for s in summary.values() for t in s["tp"].values()
                    for p in t.get("problems", [])]
    report = {"args": child_args, "configs": [c.label for c in configs],
              "tp_sizes": ns.tp_sizes, "backend": ns.backend, "host": platform.node(),
              "model_recipe": _recipe(ns.model), "summary": summary, "results": results,
              "failed": failed, "uncompressed": uncompressed, "table": table}
    (out_dir / f"{ns.tag}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{ns.tag}.md").write_text(table + "\n")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    for line in uncompressed:
        print(f"NOT COMPRESSED: {line}", file=sys.stderr)
    return 1 if failed or uncompressed else 0


def _recipe(model_dir: str) -> dict | None:
    from tiny_model import recipe_of

    return recipe_of(model_dir)


if __name__ == "__main__":
    sys.exit(main())
