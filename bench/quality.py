"""Quality of KV-cache configurations, side by side: perplexity and passkey retrieval.

The evaluation harness for every KV-cache feature of vllm-kvplug. For each configuration
(vLLM `kv_cache_dtype` values and vllm-kvplug profiles; syntax in `engine_configs.py`,
e.g. `auto`, `fp8`, `int4_per_token_head@TRITON_ATTN`, `profile:none`,
`fp8+profile:NAME_OR_YAML`) it starts one vLLM engine on a real model, in its own child
process, and measures

- perplexity on real text: N windows of W tokens spread evenly over the corpus, scored
  with vLLM's prompt logprobs (the logprob vLLM assigns to each actual next token of the
  window), plus top-1 next-token accuracy;
- passkey (needle-in-a-haystack) retrieval: a random key is hidden in corpus text at
  several depths of prompts of several exact token lengths; greedy decoding; a trial
  counts as correct when the key's digits appear in the answer.

Every configuration sees exactly the same token-id prompts (built once, here). Results go
to `<out-dir>/<tag>.json` and `<out-dir>/<tag>.md`; the table is also printed; each
configuration's engine log goes to `<out-dir>/work/engine-<config>.log`. A configuration
that fails to start or whose engine dies is reported as failed, with the root cause found
in its log, and the others still run.

    python bench/quality.py --setup                    # fetch the default corpus (Debian)
    python bench/quality.py --dtype float32 --configs auto fp8 profile:none   # CPU
    python bench/quality.py --corpus-file kjv.txt --gpu-memory-utilization 0.8 \\
        --configs bf16@FLASH_ATTN fp8@FLASH_ATTN int4_per_token_head@TRITON_ATTN  # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpora  # noqa: E402
from engine_configs import KVConfig, markdown_table  # noqa: E402
from isolation import run_isolated, stop_engine  # noqa: E402

DEFAULT_CONFIGS = ["auto", "fp8", "profile:none"]
DEFAULT_INTRO = ("There is an important piece of information hidden inside a lot of "
                 "irrelevant text. Find it and memorize it. I will quiz you about it.\n\n")
DEFAULT_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
DEFAULT_QUESTION = "\n\nWhat is the pass key?"
DEFAULT_ANSWER_PREFIX = " The pass key is"
SNAP_TOKENS = 256  # how far the needle may move to land at the start of a line


# ------------------------------------------------------------------ prompts (parent)

class PromptBuilder:
    """Token-id prompts from one tokenized corpus; lengths are exact."""

    def __init__(self, tokenizer, text: str, ns: argparse.Namespace):
        self.tok = tokenizer
        self.ns = ns
        self.corpus_ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        # What the tokenizer itself puts before a text (e.g. BOS for Llama 3; nothing
        # for SmolLM2), so prompts start the way the model saw documents in training.
        self.special_prefix: list[int] = tokenizer("").input_ids
        self._newline_ids: set[int] | None = None

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    # -- perplexity
    def ppl_windows(self, count: int, width: int) -> list[list[int]]:
        body = width - len(self.special_prefix)
        total = len(self.corpus_ids)
        if count <= 0:
            return []
        if body < 2:
            raise SystemExit(f"--ppl-window-tokens {width} is too small")
        if total < body:
            raise SystemExit(f"corpus has {total} tokens, fewer than one window ({body})")
        if count * body > total:
            print(f"warning: {count} windows of {body} tokens overlap: the corpus has only "
                  f"{total} tokens", file=sys.stderr)
        step = (total - body) / max(count - 1, 1)
        starts = [round(i * step) for i in range(count)]
        return [self.special_prefix + self.corpus_ids[s:s + body] for s in starts]

    # -- passkey
    def passkey_frame(self) -> tuple[list[int], list[int]]:
        """Token ids before the haystack and after it (question, answer prefix)."""
        ns = self.ns
        if ns.prompt_format == "chat":
            marker = "\x00HAYSTACK\x00"
            rendered = self.tok.apply_chat_template(
                [{"role": "user", "content": marker}], add_generation_prompt=True,
                tokenize=False)
            before, after = rendered.split(marker)
            head = self.encode(before) + self.encode(ns.intro)
            tail = (self.encode(ns.question.rstrip()) + self.encode(after)
                    + self.encode(ns.answer_prefix.lstrip()))
            # A chat template renders its own BOS, if any.
            return head, tail
        head = self.special_prefix + self.encode(ns.intro)
        return head, self.encode(ns.question + ns.answer_prefix)

    def passkey_cases(self) -> list[dict]:
        ns = self.ns
        head, tail = self.passkey_frame()
        cases = []
        for length in ns.lengths:
            for trial in range(ns.trials):
                # One key and one haystack per (length, trial): depths differ only in
                # where the needle sits.
                rng = random.Random(f"{ns.seed}/{length}/{trial}")
                key = str(rng.randrange(10 ** (ns.key_digits - 1), 10 ** ns.key_digits))
                needle = self.encode(ns.needle.format(key=key))
                hay_len = length - len(head) - len(needle) - len(tail)
                if hay_len < 16:
                    raise SystemExit(f"length {length} leaves only {hay_len} haystack tokens")
                if hay_len > len(self.corpus_ids):
                    raise SystemExit(f"length {length} needs {hay_len} haystack tokens; the "
                                     f"corpus has {len(self.corpus_ids)}")
                start = self.line_start(rng.randrange(0, len(self.corpus_ids) - hay_len + 1),
                                        limit=len(self.corpus_ids) - hay_len)
                hay = self.corpus_ids[start:start + hay_len]
                for depth in ns.depths:
                    pos = self.snap_to_line(hay, round(depth * hay_len))
                    ids = head + hay[:pos] + needle + hay[pos:] + tail
                    assert len(ids) == length, (len(ids), length)
                    cases.append({"length": length, "depth": depth, "trial": trial,
                                  "key": key, "needle_depth": round(pos / hay_len, 3),
                                  "prompt_token_ids": ids})
        return cases

    @property
    def newline_ids(self) -> set[int]:
        """Corpus tokens that end a line."""
        if self._newline_ids is None:
            self._newline_ids = {t for t in set(self.corpus_ids)
                                 if self.tok.decode([t]).endswith("\n")}
        return self._newline_ids

    def line_start(self, start: int, limit: int) -> int:
        """The first line start at or after `start` (within SNAP_TOKENS and `limit`)."""
        for p in range(start, min(start + SNAP_TOKENS, limit) + 1):
            if p == 0 or self.corpus_ids[p - 1] in self.newline_ids:
                return p
        return start

    def snap_to_line(self, hay: list[int], pos: int) -> int:
        """Move `pos` to the nearest line start within SNAP_TOKENS, if there is one."""
        for delta in range(SNAP_TOKENS + 1):
            for p in (pos - delta, pos + delta):
                if 0 < p <= len(hay) and hay[p - 1] in self.newline_ids:
                    return p
        return pos


# ------------------------------------------------------------ evaluation (child)

def evaluate(config: KVConfig, args: dict) -> dict:
    """Child process: one engine with `config`; perplexity and passkey results."""
    llm = None
    settings = args["settings"]
    try:
        import torch
        from vllm import LLM

        started = time.perf_counter()
        optional = {k: settings[k] for k in ("gpu_memory_utilization", "max_num_seqs")
                    if settings.get(k) is not None}
        if settings["no_prefix_caching"]:
            optional["enable_prefix_caching"] = False
        llm = LLM(
            model=settings["model"],
            dtype=settings["dtype"],
            max_model_len=settings["max_model_len"],
            enforce_eager=settings["enforce_eager"],
            seed=settings["seed"],
            **optional,
            **config.llm_kwargs(),
        )
        vllm_config = llm.llm_engine.vllm_config
        cache = vllm_config.cache_config
        result = {
            "startup_s": round(time.perf_counter() - started, 1),
            "kv_cache_dtype": cache.cache_dtype,
            "num_blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "kv_capacity_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
            "model_dtype": str(vllm_config.model_config.dtype).replace("torch.", ""),
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu"),
        }
        if args["windows"]:
            t0 = time.perf_counter()
            result["perplexity"] = perplexity(llm, args["windows"])
            result["perplexity"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        if args["cases"]:
            t0 = time.perf_counter()
            result["passkey"] = passkey(llm, args["cases"], settings["answer_tokens"])
            result["passkey"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        return result
    finally:
        stop_engine(llm)


def perplexity(llm, windows: list[list[int]]) -> dict:
    """exp(mean NLL) of every window token after the first, from vLLM prompt logprobs.

    vLLM 0.26 returns `prompt_logprobs` as a list with one entry per prompt token: None
    for the first token, then a dict {token_id: Logprob} that always contains the actual
    prompt token (with its rank; rank 1 = the model's top choice) plus the top-k others
    (k = the `prompt_logprobs` value, 0 here). Logprobs are the raw model distribution
    (vLLM's default `logprobs_mode="raw_logprobs"`).
    """
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params,
                           use_tqdm=False)
    nll_total, count, top1, per_window = 0.0, 0, 0, []
    for window, out in zip(windows, outputs):
        logprobs = out.prompt_logprobs
        if logprobs is None or len(logprobs) != len(window):
            raise RuntimeError(f"expected {len(window)} prompt logprobs, got "
                               f"{None if logprobs is None else len(logprobs)}")
        nll = 0.0
        for position in range(1, len(window)):
            entry = logprobs[position][window[position]]
            nll -= entry.logprob
            top1 += entry.rank == 1
        nll_total += nll
        count += len(window) - 1
        per_window.append(round(_exp(nll / (len(window) - 1)), 3))
    return {"ppl": round(_exp(nll_total / count), 4), "tokens": count,
            "top1_acc": round(top1 / count, 4), "mean_nll": round(nll_total / count, 5),
            "per_window_ppl": per_window}


def passkey(llm, cases: list[dict], answer_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=answer_tokens, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": c["prompt_token_ids"]} for c in cases],
                           params, use_tqdm=False)
    trials = []
    for case, out in zip(cases, outputs):
        answer = out.outputs[0].text
        trials.append({k: case[k] for k in ("length", "depth", "trial", "key",
                                             "needle_depth")}
                      | {"correct": case["key"] in answer, "answer": answer})
    return {"accuracy": passkey_accuracy(trials),
            "by_length": grouped_accuracy(trials, ("length",)),
            "by_length_depth": grouped_accuracy(trials, ("length", "depth")), "trials": trials}


def grouped_accuracy(trials: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """Passkey accuracy grouped by the values of `keys` (e.g. "1024/0.5" -> 0.67)."""
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault("/".join(str(t[k]) for k in keys), []).append(t)
    return {name: passkey_accuracy(ts) for name, ts in groups.items()}


def passkey_accuracy(trials: list[dict]) -> float:
    return round(sum(t["correct"] for t in trials) / len(trials), 4) if trials else 0.0


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))


# ----------------------------------------------------------------- report (parent)

def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def build_tables(configs: list[KVConfig], results: dict[str, dict],
                 lengths: list[int], depths: list[float]) -> str:
    base = next((results[c.label] for c in configs if results[c.label].get("ok")), None)
    base_ppl = (base or {}).get("perplexity", {}).get("ppl")
    header = ["config", "KV dtype", "KV tokens", "ppl", "ppl vs " +
              (next(c.label for c in configs if results[c.label] is base) if base else "-"),
              "top-1 acc", "passkey"] + [f"pk@{n}" for n in lengths] + ["start s", "eval s"]
    rows = []
    for config in configs:
        r = results[config.label]
        if not r.get("ok"):
            error = r.get("root_cause") or r.get("error") or "?"
            error = error.splitlines()[0]
            rows.append([config.label, "FAILED: " + error.replace("|", "/")[:200]]
                        + ["-"] * (len(header) - 2))
            continue
        ppl = r.get("perplexity", {})
        pk = r.get("passkey", {})
        ratio = (f"{ppl['ppl'] / base_ppl:.4f}" if ppl.get("ppl") and base_ppl else None)
        eval_s = sum(x.get("elapsed_s", 0) for x in (ppl, pk))
        rows.append(
            [config.label, r["kv_cache_dtype"], f"{r['kv_capacity_tokens']:,}",
             _cell(ppl.get("ppl"), "{:.3f}"), _cell(ratio),
             _cell(ppl.get("top1_acc"), "{:.4f}"), _cell(pk.get("accuracy"), "{:.2f}")]
            + [_cell(pk.get("by_length", {}).get(str(n)), "{:.2f}") for n in lengths]
            + [r["startup_s"], round(eval_s, 1)])
    summary = markdown_table(header, rows)

    detail_rows = []
    for config in configs:
        by = results[config.label].get("passkey", {}).get("by_length_depth")
        if not by:
            continue
        for n in lengths:
            detail_rows.append([config.label, n]
                               + [_cell(by.get(f"{n}/{d}"), "{:.2f}") for d in depths])
    if not detail_rows:
        return summary
    detail = markdown_table(["config", "length"] + [f"depth {d}" for d in depths],
                            detail_rows)
    return summary + "\n\nPasskey accuracy by context length and needle depth:\n\n" + detail


# ------------------------------------------------------------------------- main

def _is_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


def _platform_defaults(ns: argparse.Namespace) -> bool:
    """Environment and option defaults for the platform; returns True on CPU."""
    on_cpu = _is_cpu()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        cores = sorted(os.sched_getaffinity(0))
        contiguous = cores == list(range(cores[0], cores[-1] + 1))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              f"{cores[0]}-{cores[-1]}" if contiguous
                              else ",".join(map(str, cores)))
        if ns.dtype == "auto":
            print("note: --dtype auto on CPU: SmolLM2 in bf16 answers garbage on vLLM-CPU; "
                  "use --dtype float32 there", file=sys.stderr)
    else:
        import importlib.util

        if importlib.util.find_spec("flashinfer") is None:
            # Without FlashInfer installed vLLM's sampler still tries to import it.
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if ns.enforce_eager is None:
        ns.enforce_eager = on_cpu  # eager starts much faster on CPU
    return on_cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("corpus")
    g.add_argument("--setup", action="store_true",
                   help="fetch and convert the corpus (--setup-corpus) and exit")
    g.add_argument("--setup-corpus", choices=corpora.CORPORA, default=corpora.DEFAULT_CORPUS)
    g.add_argument("--setup-max-mb", type=float, default=None,
                   help="cut the set-up corpus to this many MB (default: whole KJV, "
                        "4 MB of the Python docs)")
    g.add_argument("--corpus-file", default=None,
                   help="any UTF-8 text file (default: the set-up corpus in "
                        "$KVPLUG_CACHE_DIR/corpus/, fetched if missing)")

    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct "
                   "(vllm_kvplug.models.ensure_smollm2)")
    g.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="KV[+profile:P][@BACKEND] or profile:P[@BACKEND]; the first one "
                        "that runs is the baseline of the ppl ratio")
    g.add_argument("--attention-backend", default=None,
                   help="backend for configurations without @BACKEND")
    g.add_argument("--dtype", default="auto", help="model dtype (use float32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="default: just enough for the longest prompt")
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for CPU, off for GPU")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout-s", type=float, default=3600,
                   help="per configuration: start plus evaluation")

    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-windows", type=int, default=16, help="0 skips perplexity")
    g.add_argument("--ppl-window-tokens", type=int, default=2048)

    g = p.add_argument_group("passkey retrieval")
    g.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8000],
                   help="exact prompt lengths in tokens; none skips passkey")
    g.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="needle position as a fraction of the haystack")
    g.add_argument("--trials", type=int, default=3, help="random keys per length/depth")
    g.add_argument("--key-digits", type=int, default=5)
    g.add_argument("--answer-tokens", type=int, default=12)
    g.add_argument("--prompt-format", choices=("raw", "chat"), default="raw",
                   help="raw text, or wrapped in the model's chat template")
    g.add_argument("--intro", default=DEFAULT_INTRO, help="text before the haystack")
    g.add_argument("--needle", default=DEFAULT_NEEDLE, help="must contain {key}")
    g.add_argument("--question", default=DEFAULT_QUESTION)
    g.add_argument("--answer-prefix", default=DEFAULT_ANSWER_PREFIX,
                   help="start of the answer, after the question")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="bench/results")
    g.add_argument("--tag", default="quality", help="file name of the JSON and markdown")
    ns = p.parse_args(argv)
    if "{key}" not in ns.needle:
        p.error("--needle must contain {key}")
    if any(not 0.0 <= d <= 1.0 for d in ns.depths):
        p.error("--depths must be between 0 and 1")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.setup:
        path = corpora.setup_corpus(ns.setup_corpus, max_mb=ns.setup_max_mb)
        print(f"corpus {ns.setup_corpus}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return 0

    wall = time.perf_counter()
    on_cpu = _platform_defaults(ns)
    if ns.model is None:
        from vllm_kvplug.models import ensure_smollm2

        ns.model = str(ensure_smollm2())
    corpus_file = ns.corpus_file
    if corpus_file is None:
        corpus_file = corpora.corpus_path()
        if not corpus_file.is_file():
            print(f"corpus {corpus_file} missing; fetching it (--setup)", flush=True)
            corpus_file = corpora.setup_corpus()

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    t0 = time.perf_counter()
    builder = PromptBuilder(tokenizer, corpora.read_corpus(corpus_file), ns)
    windows = builder.ppl_windows(ns.ppl_windows, ns.ppl_window_tokens)
    cases = builder.passkey_cases() if ns.lengths else []
    print(f"corpus {corpus_file}: {len(builder.corpus_ids):,} tokens; {len(windows)} ppl "
          f"windows, {len(cases)} passkey prompts (built in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)

    needed = max([len(w) + 1 for w in windows]
                 + [c_len + ns.answer_tokens for c_len in ns.lengths])
    model_max = getattr(AutoConfig.from_pretrained(ns.model), "max_position_embeddings", None)
    if ns.max_model_len is None:
        ns.max_model_len = needed
    if ns.max_model_len < needed or (model_max and ns.max_model_len > model_max):
        raise SystemExit(f"prompts need max_model_len >= {needed} (longest prompt + "
                         f"answer); --max-model-len is {ns.max_model_len}, the model "
                         f"allows {model_max}")

    settings = {
        "model": ns.model, "dtype": ns.dtype, "max_model_len": ns.max_model_len,
        "enforce_eager": ns.enforce_eager, "seed": ns.seed,
        "gpu_memory_utilization": ns.gpu_memory_utilization,
        "max_num_seqs": ns.max_num_seqs, "no_prefix_caching": ns.no_prefix_caching,
        "answer_tokens": ns.answer_tokens, "timeout_s": ns.timeout_s,
    }
    configs = []
    for text in ns.configs:
        config = KVConfig.parse(text)
        if config.attention_backend is None and ns.attention_backend:
            config = KVConfig(config.label, config.kv_cache_dtype, config.profile,
                              ns.attention_backend)
        configs.append(config)
    if len({c.label for c in configs}) != len(configs):
        raise SystemExit("--configs has duplicates")

    out_dir = Path(ns.out_dir)
    child_args = {"settings": settings, "windows": windows, "cases": cases}
    results: dict[str, dict] = {}
    work_dir = out_dir / "work"
    for i, config in enumerate(configs, 1):
        print(f"== [{i}/{len(configs)}] {config.label}", flush=True)
        t0 = time.perf_counter()
        result = run_isolated(evaluate, config, child_args, work_dir, ns.timeout_s)
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        results[config.label] = result
        print(f"== {config.label}: " + json.dumps(_brief(result)), flush=True)

    table = build_tables(configs, results, ns.lengths, ns.depths)
    wall_s = round(time.perf_counter() - wall, 1)
    print()
    print(table)
    print(f"\nwall time {wall_s} s", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "settings": settings,
        "corpus_file": str(corpus_file),
        "corpus_tokens": len(builder.corpus_ids),
        "ppl": {"windows": len(windows), "window_tokens": ns.ppl_window_tokens},
        "passkey": {"lengths": ns.lengths, "depths": ns.depths, "trials": ns.trials,
                    "prompt_format": ns.prompt_format, "intro": ns.intro,
                    "needle": ns.needle, "question": ns.question,
                    "answer_prefix": ns.answer_prefix},
        "configs": [c.__dict__ for c in configs],
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("VLLM_CPU_", "VLLM_USE_FLASHINFER"))},
        "host": platform.node(), "on_cpu": on_cpu, "wall_s": wall_s,
        "results": results, "table": table,
    }
    (out_dir / f"{ns.tag}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{ns.tag}.md").write_text(table + "\n")
    print(f"wrote {out_dir / (ns.tag + '.json')} and {out_dir / (ns.tag + '.md')}")
    return 0 if all(r.get("ok") for r in results.values()) else 1


def _brief(result: dict) -> dict:
    if not result.get("ok"):
        return {"ok": False, "error": result.get("error", "")[:300],
                "root_cause": result.get("root_cause")}
    return {"ok": True, "kv_tokens": result.get("kv_capacity_tokens"),
            "ppl": result.get("perplexity", {}).get("ppl"),
            "passkey": result.get("passkey", {}).get("accuracy"),
            "startup_s": result.get("startup_s"), "wall_s": result.get("wall_s")}


if __name__ == "__main__":
    sys.exit(main())
