"""Shifting-trace load against an OpenAI server: SLO attainment and goodput per phase.

Writes a timed trace of phases (by default quiet -> a burst of long prompts -> many short
chats; Poisson arrivals within each phase) in vLLM's `timed_trace` JSON-lines format,
replays it against a running server with vLLM's own client (`vllm bench serve
--dataset-name timed_trace --save-detailed`: arrivals at the trace's timestamps,
streaming TTFT and inter-token latencies), and splits the per-request results by phase:
requests, failures, SLO attainment (share of requests with TTFT and TPOT within the
targets; a failed request misses), goodput (requests within the SLO per second of the
phase), TTFT and TPOT. `run` measures one running server (one static profile); `sweep`
starts one server per profile in turn and replays the same trace against each; `compare`
prints runs side by side.

    python bench/load.py run --base-url http://127.0.0.1:8000 --model NAME \\
        --tokenizer MODEL_DIR --label int4-hadamard --slo-ttft-ms 2000 --slo-tpot-ms 100
    python bench/load.py compare results/load-none.json results/load-int4-hadamard.json
    python bench/load.py sweep --model-path MODEL_DIR --tokenizer MODEL_DIR \\
        --profiles none int4-hadamard k8v4-hadamard --server-args "--max-model-len 16384"

`--phases NAME:SECONDS:REQ_PER_S:PROMPT_TOKENS:OUTPUT_TOKENS ...` replaces the default
trace (sized for an 8B model on an H100); `--time-scale` stretches or shrinks every phase.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_configs import markdown_table  # noqa: E402
from server_process import ServerProcess  # noqa: E402

CHUNK_TOKENS = 16  # tokens per trace hash id (vLLM's --timed-trace-chunk-hash-size)


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float  # requests per second (Poisson)
    prompt_tokens: int
    output_tokens: int

    @classmethod
    def parse(cls, text: str) -> Phase:
        try:
            name, seconds, rate, prompt, output = text.split(":")
            phase = cls(name, float(seconds), float(rate), int(prompt), int(output))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"phase {text!r} is not NAME:SECONDS:REQ_PER_S:PROMPT_TOKENS:OUTPUT_TOKENS"
            ) from None
        if not name or phase.seconds <= 0 or phase.rate <= 0 or min(
                phase.prompt_tokens, phase.output_tokens) < 1:
            raise argparse.ArgumentTypeError(
                f"phase {text!r}: name, positive duration and rate, lengths >= 1")
        return phase


DEFAULT_PHASES = [Phase("quiet", 60, 0.5, 1024, 128), Phase("long-burst", 60, 4, 8192, 128),
                  Phase("short-chats", 60, 16, 256, 64)]


def make_trace(phases: list[Phase], seed: int = 0, time_scale: float = 1.0) -> list[dict]:
    """Requests of every phase in arrival order: Poisson arrivals at each phase's rate,
    phases back to back. Every request has its own hash ids, so no two prompts share a
    prefix (no prefix-cache hits between requests)."""
    rng = random.Random(seed)
    entries, start, next_hash = [], 0.0, 0
    for phase in phases:
        length = phase.seconds * time_scale
        t = rng.expovariate(phase.rate)
        while t < length:
            chunks = math.ceil(phase.prompt_tokens / CHUNK_TOKENS)
            entries.append({"timestamp": round(start + t, 6),
                            "input_length": phase.prompt_tokens,
                            "output_length": phase.output_tokens,
                            "hash_ids": list(range(next_hash, next_hash + chunks)),
                            "phase": phase.name})
            next_hash += chunks
            t += rng.expovariate(phase.rate)
        start += length
    return entries


def bench_serve_command(trace_path: Path, num_requests: int, args, base_url: str,
                        result_dir: Path, result_name: str) -> list[str]:
    """vLLM's serving benchmark replaying the trace (its client, its goodput)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
            "--backend", "vllm", "--base-url", base_url, "--model", args.model,
            "--tokenizer", args.tokenizer, "--dataset-name", "timed_trace",
            "--dataset-path", str(trace_path),
            "--timed-trace-chunk-hash-size", str(CHUNK_TOKENS),
            "--num-prompts", str(num_requests), "--ignore-eos", "--seed", str(args.seed),
            "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}",
            "--save-result", "--save-detailed", "--result-dir", str(result_dir),
            "--result-filename", result_name, "--disable-tqdm"]


def request_rows(trace: list[dict], detailed: dict) -> list[dict]:
    """One row per request: phase, ok, TTFT and TPOT in ms (vLLM keeps request order)."""
    n = len(trace)
    for key in ("ttfts", "itls", "errors", "output_lens"):
        if len(detailed.get(key, [])) != n:
            raise ValueError(f"benchmark result has {len(detailed.get(key, []))} {key}, "
                             f"the trace {n} requests")
    rows = []
    for entry, ttft, itl, error, out_len in zip(trace, detailed["ttfts"], detailed["itls"],
                                                 detailed["errors"], detailed["output_lens"]):
        ok = not error and out_len > 0
        rows.append({"phase": entry["phase"], "ok": ok,
                     "ttft_ms": ttft * 1000 if ok else None,
                     "tpot_ms": (sum(itl) / len(itl) * 1000 if itl else 0.0) if ok else None})
    return rows


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarize(rows: list[dict], phases: list[Phase], slo_ttft_ms: float,
              slo_tpot_ms: float, time_scale: float = 1.0) -> list[dict]:
    """Per phase and for the whole trace: attainment, goodput and latency statistics."""
    groups = [(p.name, p.seconds * time_scale) for p in phases]
    groups.append(("all", sum(seconds for _, seconds in groups)))
    out = []
    for name, seconds in groups:
        mine = [r for r in rows if name == "all" or r["phase"] == name]
        done = [r for r in mine if r["ok"]]
        good = [r for r in done if r["ttft_ms"] <= slo_ttft_ms and r["tpot_ms"] <= slo_tpot_ms]
        ttfts = [r["ttft_ms"] for r in done]
        tpots = [r["tpot_ms"] for r in done]
        out.append({
            "phase": name, "seconds": seconds, "requests": len(mine),
            "failed": len(mine) - len(done),
            "slo_attainment": len(good) / len(mine) if mine else None,
            "goodput_req_per_s": len(good) / seconds,
            "mean_ttft_ms": sum(ttfts) / len(ttfts) if ttfts else None,
            "p90_ttft_ms": _percentile(ttfts, 0.9),
            "mean_tpot_ms": sum(tpots) / len(tpots) if tpots else None,
            "p90_tpot_ms": _percentile(tpots, 0.9),
        })
    return out


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def table(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        for s in run["phases"]:
            rows.append([run["label"], s["phase"], s["requests"], s["failed"],
                         _fmt(s["slo_attainment"] * 100 if s["slo_attainment"] is not None
                              else None, 0) + " %", _fmt(s["goodput_req_per_s"], 2),
                         _fmt(s["mean_ttft_ms"]), _fmt(s["p90_ttft_ms"]),
                         _fmt(s["mean_tpot_ms"]), _fmt(s["p90_tpot_ms"])])
    return markdown_table(["profile", "phase", "requests", "failed", "SLO attainment",
                           "goodput req/s", "mean TTFT ms", "p90 TTFT ms", "mean TPOT ms",
                           "p90 TPOT ms"], rows)


def replay(args, base_url: str, label: str) -> dict:
    """Replay the trace against one server; the result of one configuration."""
    phases = args.phases or DEFAULT_PHASES
    trace = make_trace(phases, args.seed, args.time_scale)
    if not trace:
        raise SystemExit("the trace is empty: longer phases or higher rates")
    with tempfile.TemporaryDirectory(prefix="kvplug-load-") as tmp:
        tmp = Path(tmp)
        trace_path = tmp / "trace.jsonl"
        trace_path.write_text("".join(json.dumps(e) + "\n" for e in trace))
        cmd = bench_serve_command(trace_path, len(trace), args, base_url, tmp, "result.json")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
        if proc.returncode != 0 or not (tmp / "result.json").exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"vllm bench serve failed with exit code {proc.returncode}")
        detailed = json.loads((tmp / "result.json").read_text())
    summary = summarize(request_rows(trace, detailed), phases, args.slo_ttft_ms,
                        args.slo_tpot_ms, args.time_scale)
    return {"label": label, "base_url": base_url, "model": args.model,
            "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
            "time_scale": args.time_scale, "seed": args.seed,
            "trace": [asdict(p) for p in phases], "phases": summary,
            "vllm_request_goodput": detailed.get("request_goodput")}


def write(results: list[dict], out: Path) -> None:
    print(table(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    print(f"wrote {out}")


def run(args) -> int:
    write([replay(args, args.base_url, args.label)], Path(args.out))
    return 0


def sweep(args) -> int:
    """One server per profile, one after the other, the same trace against each."""
    results = []
    out = Path(args.out)
    for profile in args.profiles:
        label = Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile
        server = ServerProcess(
            ["--model", args.model_path, "--served-model-name", args.model,
             "--kv-compression", profile, *shlex.split(args.server_args)],
            out.parent / f"server-{label}.log")
        try:
            server.wait_ready(args.ready_timeout_s)
            results.append(replay(args, server.url, label))
        finally:
            server.stop()
    write(results, out)
    return 0


def compare(paths: list[str]) -> int:
    runs = []
    for path in paths:
        loaded = json.loads(Path(path).read_text())
        runs.extend(loaded if isinstance(loaded, list) else [loaded])
    print(table(runs))
    return 0


def _trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (prompt tokens)")
    parser.add_argument("--phases", nargs="+", type=Phase.parse, default=None)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000)
    parser.add_argument("--slo-tpot-ms", type=float, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=3600, help="per replay")
    parser.add_argument("--out", default="bench/results/load.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="replay the trace against one running server")
    r.add_argument("--base-url", required=True)
    r.add_argument("--model", required=True, help="the server's model name")
    r.add_argument("--label", required=True, help="name of this configuration, e.g. profile")
    _trace_options(r)
    w = sub.add_parser("sweep", help="start one server per profile and replay against each")
    w.add_argument("--model-path", required=True, help="model folder for the servers")
    w.add_argument("--model", default="model", help="served model name")
    w.add_argument("--profiles", nargs="+", required=True,
                   help="--kv-compression values (built-in names or YAML files)")
    w.add_argument("--server-args", default="", help="more `vllm serve` options, one string")
    w.add_argument("--ready-timeout-s", type=float, default=900)
    _trace_options(w)
    c = sub.add_parser("compare", help="print several runs side by side")
    c.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    if args.command == "compare":
        return compare(args.results)
    if args.time_scale <= 0:
        p.error("--time-scale must be > 0")
    return run(args) if args.command == "run" else sweep(args)


if __name__ == "__main__":
    sys.exit(main())
