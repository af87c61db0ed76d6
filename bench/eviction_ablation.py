"""Ablation of per-head KV eviction policies (StreamingLLM / SnapKV / PyramidKV / Ada-KV).

Before eviction exists in vLLM, this measures what each policy and budget costs in quality,
with the PyTorch reference (`vllm_kvplug.eviction`) on a real model in Hugging Face
transformers, simulated the way kvpress does:

1. the prompt is prefilled normally (full attention); an attention function records every
   layer's post-RoPE keys and the queries of the prompt's last `--window-tokens` tokens;
2. per layer, `score_snapkv` scores the prompt tokens per KV head, and each policy picks
   the kept tokens of every (layer, KV head) (its budgets are recorded);
3. generation then attends, in every layer and KV head, only to that head's kept prompt
   tokens plus all generated tokens: the attention function masks the evicted positions
   with -inf before the softmax, so they get exactly zero weight (positions, and so RoPE,
   are unchanged, as in a compacted paged cache). The first generated token comes from
   the prefill itself (full attention), as it will when vLLM compresses at the end of the
   prefill; every later one sees only kept tokens.

All configurations of one prompt share the prefill and run as one batch (one row each, a
row-specific mask). Measured:

- passkey retrieval: a random key hidden in KJV text at several depths of prompts of exact
  token lengths (`bench/quality.py`'s prompt builder, raw format), greedy decoding; correct
  when the key's digits appear in the answer;
- perplexity of continuations: windows of `--ppl-prefix` + `--ppl-tokens` + 1 corpus tokens;
  the prefix is prefilled and compressed (its last `--window-tokens` tokens are the
  observation window), then the continuation is teacher-forced: its tokens attend to the
  kept prefix tokens and to all earlier continuation tokens, and the `--ppl-tokens`
  predictions they make are scored;
- what is kept: the mean fraction of prompt (token, head) entries kept, and the KV pages a
  request would hold after eviction under the design's layouts (`kv_pages`: pad-to-max-head,
  head-packed, and the per-layer ideal), relative to the uncompressed prompt, from the
  measured per-head budgets.

    KVPLUG_CACHE_DIR=/tmp/kvcache python bench/eviction_ablation.py
    python bench/eviction_ablation.py --smoke --out-dir /tmp/ev   # tiny, ~1 min on CPU

Results: `<out-dir>/<tag>.json` and `<out-dir>/<tag>.md`; the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus as corpora  # noqa: E402
from engine_configs import markdown_table  # noqa: E402
from quality import (  # noqa: E402
    DEFAULT_ANSWER_PREFIX,
    DEFAULT_INTRO,
    DEFAULT_NEEDLE,
    DEFAULT_QUESTION,
    PromptBuilder,
    grouped_accuracy,
    passkey_accuracy,
)

from vllm_kvplug.eviction import (  # noqa: E402
    EvictionPolicy,
    full_kv_pages,
    keep_mask,
    kv_pages,
    policy_from_section,
    score_snapkv,
)
from vllm_kvplug.profiles.schema import EvictionSection  # noqa: E402

ATTENTION_NAME = "kvplug_eviction"
DEFAULT_POLICIES = ["streamingllm", "snapkv", "pyramidkv", "adakv"]
DEFAULT_FRACTIONS = [0.1, 0.25, 0.5]
PAGE_LAYOUTS = ("padded", "packed", "ideal")


# ------------------------------------------------------------------ attention function

class _State:
    """What the attention function does in the current forward pass.

    Prefill (`window` > 0): ordinary causal attention; every layer's prompt K/V are kept
    (batch 1) and its last `window` queries recorded. Generation (`keep` set): the prompt
    K/V stay shared by all rows (never copied per row); each row's new tokens get their
    own K/V, appended here (the model runs without a transformers cache).
    """

    window = 0
    captured: dict[int, torch.Tensor] = {}  # layer -> last-window queries [Hq, W, D]
    prompt_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # [1, H_kv, S, D] each
    new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # [B, H_kv, T, D] each
    keep: list[torch.Tensor] | None = None  # per layer [B, H_kv, S] bool


STATE = _State()


def visibility_mask(keep: torch.Tensor | None, q_len: int, k_len: int,
                    group: int) -> torch.Tensor:
    """[B|1, Hq|1, q_len, k_len] bool: which keys each query may attend to.

    Queries are the last q_len of k_len positions (causal). keep [B, H_kv, S]: which of the
    first S positions (the prompt) each row and KV head kept; positions >= S (generated
    tokens) are always visible. Query head j reads KV head j // group. (The reference
    semantics of `evicting_attention`, used by the tests.)
    """
    pos = torch.arange(k_len)
    visible = pos[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None]  # [q, k]
    if keep is None:
        return visible[None, None]
    rows, _, prompt_len = keep.shape
    if prompt_len > k_len:
        raise ValueError(f"keep mask of {prompt_len} prompt tokens, only {k_len} keys")
    per_key = torch.ones(rows, keep.shape[1], k_len, dtype=torch.bool)
    per_key[..., :prompt_len] = keep
    per_key = per_key.repeat_interleave(group, dim=1)  # [B, Hq, k]
    return visible[None, None] & per_key[:, :, None, :]


def evicting_attention(module, query, key, value, attention_mask, scaling=None,
                       dropout=0.0, **kwargs):
    """transformers attention function; query [B, Hq, q, D], key/value [B, H_kv, q, D].

    Batch rows have no padding; transformers' mask is ignored and rebuilt here.
    """
    layer = module.layer_idx
    if STATE.keep is None:  # prefill
        if STATE.window:
            STATE.captured[layer] = query[0, :, -STATE.window:].clone()
            STATE.prompt_kv[layer] = (key, value)
        group = query.shape[1] // key.shape[1]
        q_len, k_len = query.shape[2], key.shape[2]
        causal = {"is_causal": True} if q_len == k_len else {
            "attn_mask": visibility_mask(None, q_len, k_len, group)}
        out = F.scaled_dot_product_attention(
            query, key.repeat_interleave(group, dim=1), value.repeat_interleave(group, 1),
            scale=scaling, **causal)
        return out.transpose(1, 2).contiguous(), None
    return _attend_kept(layer, query, key, value, scaling), None


def _attend_kept(layer, query, key, value, scaling):
    """Generation: attend to this row's kept prompt tokens and all its new tokens."""
    k_prompt, v_prompt = STATE.prompt_kv[layer]
    if layer in STATE.new_kv:
        k_old, v_old = STATE.new_kv[layer]
        key, value = torch.cat([k_old, key], 2), torch.cat([v_old, value], 2)
    STATE.new_kv[layer] = (key, value)
    rows, q_heads, q_len, dim = query.shape
    kv_heads, new_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    # GQA without copying K/V: the `group` query heads of a KV head become extra query rows
    # (query head j = kv head j // group, the order of transformers' repeat_kv).
    q = query.reshape(rows, kv_heads, group * q_len, dim)
    scale = scaling if scaling is not None else dim ** -0.5
    logits_prompt = (q @ k_prompt.transpose(-1, -2)) * scale  # [B, H_kv, g*q, S]
    logits_prompt = logits_prompt.masked_fill(~STATE.keep[layer][:, :, None, :], float("-inf"))
    logits_new = (q @ key.transpose(-1, -2)) * scale  # [B, H_kv, g*q, T]
    causal = (torch.arange(new_len)[None, :]
              <= (new_len - q_len + torch.arange(q_len))[:, None])  # [q, T]
    logits_new = logits_new.masked_fill(~causal.repeat(group, 1), float("-inf"))
    probs = torch.softmax(torch.cat([logits_prompt, logits_new], -1).float(), -1)
    probs = probs.to(value.dtype)
    prompt_len = k_prompt.shape[2]
    out = probs[..., :prompt_len] @ v_prompt + probs[..., prompt_len:] @ value
    return out.reshape(rows, q_heads, q_len, dim).transpose(1, 2).contiguous()


# ------------------------------------------------------------------ configurations

@dataclass(frozen=True)
class Config:
    label: str
    policy: EvictionPolicy | None  # None: full cache
    section: dict


def build_configs(policies: list[str], fractions: list[float], min_tokens: int,
                  window_tokens: int, sink_tokens: int) -> list[Config]:
    configs = [Config("full", None, {"policy": "none"})]
    for name in policies:
        for fraction in fractions:
            section = EvictionSection(policy=name, budget_fraction=float(fraction),
                                      min_tokens=min_tokens, window_tokens=window_tokens,
                                      sink_tokens=sink_tokens)
            configs.append(Config(f"{name}@{fraction:g}", policy_from_section(section),
                                  section.model_dump()))
    return configs


class Compressor:
    """Scores one prefilled prompt and builds every configuration's keep masks."""

    def __init__(self, configs: list[Config], num_layers: int, num_kv_heads: int,
                 pool_kernel: int, pooling: str, block_size: int):
        self.configs = configs
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.pool_kernel, self.pooling, self.block_size = pool_kernel, pooling, block_size
        # label -> list of per-compression stats
        self.stats: dict[str, list[dict]] = {c.label: [] for c in configs}

    def masks(self, captured: dict, prompt_len: int) -> list[torch.Tensor]:
        """Per layer [B, H_kv, S] keep masks, one row per configuration."""
        scores = None
        if any(c.policy is not None and c.policy.uses_scores for c in self.configs):
            scores = [score_snapkv(captured[layer], STATE.prompt_kv[layer][0][0],
                                   pool_kernel=self.pool_kernel, pooling=self.pooling)
                      for layer in range(self.num_layers)]
        L, H = self.num_layers, self.num_kv_heads
        keep = [torch.ones(len(self.configs), H, prompt_len, dtype=torch.bool)
                for _ in range(L)]
        full_pages = full_kv_pages(prompt_len, self.block_size)
        for row, config in enumerate(self.configs):
            if config.policy is None:
                budgets = torch.full((L, H), prompt_len)
            else:
                budgets, kept = config.policy.plan(prompt_len, L, H, scores)
                for layer in range(L):
                    mask = keep_mask(kept[layer], prompt_len)
                    assert mask.sum(-1).tolist() == budgets[layer].tolist()
                    keep[layer][row] = mask
            self.stats[config.label].append({
                "prompt_len": prompt_len,
                "kept_fraction": float(budgets.sum()) / (L * H * prompt_len),
                "max_head_budget_fraction": float(budgets.max()) / prompt_len,
                **{f"pages_{lay}": kv_pages(budgets, self.block_size, lay) / full_pages
                   for lay in PAGE_LAYOUTS},
            })
        return keep

    def summary(self, label: str) -> dict:
        rows = self.stats[label]
        keys = ["kept_fraction", "max_head_budget_fraction"] + [f"pages_{lay}"
                                                                for lay in PAGE_LAYOUTS]
        return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys} | {
            "compressions": len(rows)}


# ------------------------------------------------------------------ model passes

@torch.inference_mode()
def prefill(model, ids: list[int], window: int):
    """Full-attention prefill: (last-position logits, captured window queries per layer).

    The prompt K/V stay in STATE.prompt_kv for `generate` / `continuation_nll`.
    """
    STATE.window, STATE.captured, STATE.prompt_kv, STATE.keep = window, {}, {}, None
    try:
        out = model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    finally:
        STATE.window = 0
    return out.logits[0, -1].float(), STATE.captured


def _evicted_forward(model, ids: torch.Tensor, start: int):
    """Rows of new tokens at positions start.. after the prompt, with STATE.keep set."""
    positions = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    return model(ids, position_ids=positions, use_cache=False).logits


@torch.inference_mode()
def generate(model, prompt_len: int, first_logits, keep: list[torch.Tensor],
             steps: int) -> list[list[int]]:
    """Greedy decoding of every row with its own keep masks; `steps` tokens per row."""
    rows = keep[0].shape[0]
    token = first_logits.argmax().repeat(rows)
    tokens = [token]
    STATE.keep, STATE.new_kv = keep, {}
    try:
        for step in range(steps - 1):
            logits = _evicted_forward(model, token[:, None], prompt_len + step)
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
    finally:
        STATE.keep, STATE.new_kv = None, {}
    return torch.stack(tokens, 1).tolist()


@torch.inference_mode()
def continuation_nll(model, prompt_len: int, keep: list[torch.Tensor],
                     continuation: list[int]) -> list[float]:
    """Per row: summed NLL of continuation[1:], teacher-forced after the evicted prefix."""
    rows = keep[0].shape[0]
    ids = torch.tensor([continuation[:-1]]).expand(rows, -1)
    STATE.keep, STATE.new_kv = keep, {}
    try:
        logits = _evicted_forward(model, ids, prompt_len).float()
    finally:
        STATE.keep, STATE.new_kv = None, {}
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation[1:])[None, :, None].expand(rows, -1, 1)
    return (-logp.gather(2, target)[..., 0].sum(1)).tolist()


@torch.inference_mode()
def plain_nll(model, window: list[int], prefix: int) -> float:
    """Reference: summed NLL of window[prefix + 1:] from one ordinary forward pass."""
    logits = model(torch.tensor([window]), use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[prefix:-1], -1)
    return float(-logp.gather(1, torch.tensor(window[prefix + 1:])[:, None]).sum())


# ------------------------------------------------------------------ evaluation

def run_passkey(model, tokenizer, cases, configs, compressor, ns) -> dict[str, list[dict]]:
    trials: dict[str, list[dict]] = {c.label: [] for c in configs}
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        ids = case["prompt_token_ids"]
        logits, captured = prefill(model, ids, ns.window_tokens)
        keep = compressor.masks(captured, len(ids))
        answers = generate(model, len(ids), logits, keep, ns.answer_tokens)
        for config, answer_ids in zip(configs, answers):
            answer = tokenizer.decode(answer_ids)
            trials[config.label].append(
                {k: case[k] for k in ("length", "depth", "trial", "key", "needle_depth")}
                | {"correct": case["key"] in answer, "answer": answer})
        found = sum(t[-1]["correct"] for t in trials.values())
        print(f"passkey {i}/{len(cases)} length {case['length']} depth {case['depth']}: "
              f"{found}/{len(configs)} configs correct ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    return trials


def run_ppl(model, windows, configs, compressor, ns) -> dict:
    nll = {c.label: [] for c in configs}
    check = None
    for i, window in enumerate(windows, 1):
        t0 = time.perf_counter()
        prefix, continuation = window[:ns.ppl_prefix], window[ns.ppl_prefix:]
        _, captured = prefill(model, prefix, ns.window_tokens)
        keep = compressor.masks(captured, len(prefix))
        for config, value in zip(configs, continuation_nll(model, len(prefix), keep,
                                                           continuation)):
            nll[config.label].append(value)
        if ns.check and i == 1:
            reference = plain_nll(model, window, ns.ppl_prefix)
            check = {"full_cache_nll": round(nll["full"][0], 5),
                     "plain_forward_nll": round(reference, 5),
                     "abs_diff": abs(nll["full"][0] - reference)}
            print(f"check: full-cache rows vs plain forward: {check}", flush=True)
        print(f"ppl window {i}/{len(windows)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    n = ns.ppl_tokens
    return {"nll": nll, "check": check,
            "ppl": {label: math.exp(sum(v) / (n * len(v))) for label, v in nll.items()}}


def build_tables(configs, results, lengths, depths) -> str:
    base_ppl = results["full"].get("perplexity", {}).get("ppl")
    header = (["config", "kept %", "ppl", "ppl vs full", "passkey"]
              + [f"pk@{n}" for n in lengths]
              + [f"pages {lay} %" for lay in PAGE_LAYOUTS])
    rows = []
    for config in configs:
        r = results[config.label]
        ppl = r.get("perplexity", {}).get("ppl")
        pk = r.get("passkey", {})
        rows.append(
            [config.label, f"{100 * r['kept']['kept_fraction']:.1f}",
             "-" if ppl is None else f"{ppl:.3f}",
             "-" if ppl is None else f"{100 * (ppl / base_ppl - 1):+.2f} %",
             "-" if not pk else f"{pk['accuracy']:.2f}"]
            + ["-" if not pk else f"{pk['by_length'].get(str(n), 0):.2f}" for n in lengths]
            + [f"{100 * r['kept'][f'pages_{lay}']:.1f}" for lay in PAGE_LAYOUTS])
    table = markdown_table(header, rows)
    if not lengths:
        return table
    detail = markdown_table(
        ["config", "length"] + [f"depth {d}" for d in depths],
        [[c.label, n] + [f"{results[c.label]['passkey']['by_length_depth'].get(f'{n}/{d}', 0):.2f}"
                         for d in depths]
         for c in configs for n in lengths])
    return table + "\n\nPasskey accuracy by prompt length and needle depth:\n\n" + detail


# ------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--corpus-file", default=None,
                   help="default: $KVPLUG_CACHE_DIR/corpus/kjv.txt (fetched if missing)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="tiny run: 1 trial of 256 tokens at depth 0.5, one 256+32 ppl "
                        "window, plus the full-cache consistency check")

    g = p.add_argument_group("policies (profile eviction section)")
    g.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                   choices=DEFAULT_POLICIES)
    g.add_argument("--fractions", type=float, nargs="+", default=DEFAULT_FRACTIONS,
                   help="budget_fraction values")
    g.add_argument("--min-tokens", type=int, default=EvictionSection().min_tokens)
    g.add_argument("--window-tokens", type=int, default=EvictionSection().window_tokens)
    g.add_argument("--sink-tokens", type=int, default=EvictionSection().sink_tokens)
    g.add_argument("--pool-kernel", type=int, default=7,
                   help="score pooling width (odd; 1: none)")
    g.add_argument("--pooling", choices=("avg", "max"), default="max",
                   help="max keeps whole runs of important tokens (docs/eviction.md)")
    g.add_argument("--block-size", type=int, default=16, help="page size for page counts")

    g = p.add_argument_group("passkey retrieval")
    g.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048],
                   help="prompt lengths in tokens; none skips passkey")
    g.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    g.add_argument("--trials", type=int, default=3, help="random keys per length")
    g.add_argument("--key-digits", type=int, default=5)
    g.add_argument("--answer-tokens", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl-windows", type=int, default=6, help="0 skips perplexity")
    g.add_argument("--ppl-prefix", type=int, default=1024, help="compressed prefix tokens")
    g.add_argument("--ppl-tokens", type=int, default=128, help="scored continuation tokens")
    g.add_argument("--check", action="store_true",
                   help="compare the full-cache row with a plain forward (first window)")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="bench/results-cpu")
    g.add_argument("--tag", default="eviction_ablation")
    ns = p.parse_args(argv)
    if ns.smoke:
        ns.lengths, ns.depths, ns.trials = [256], [0.5], 1
        ns.ppl_windows, ns.ppl_prefix, ns.ppl_tokens, ns.check = 1, 256, 32, True
    # quality.PromptBuilder's passkey settings (raw format, the same texts).
    ns.prompt_format, ns.intro, ns.needle = "raw", DEFAULT_INTRO, DEFAULT_NEEDLE
    ns.question, ns.answer_prefix = DEFAULT_QUESTION, DEFAULT_ANSWER_PREFIX
    if any(not 0 < f <= 1 for f in ns.fractions):
        p.error("--fractions must be in (0, 1]")
    if ns.window_tokens > min(ns.lengths + [ns.ppl_prefix]):
        p.error("--window-tokens is longer than a prompt")
    return ns


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    wall = time.perf_counter()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.model is None:
        from vllm_kvplug.models import ensure_smollm2

        ns.model = str(ensure_smollm2())
    corpus_file = ns.corpus_file or corpora.corpus_path()
    if not Path(corpus_file).is_file():
        corpus_file = corpora.setup_corpus()

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    AttentionInterface.register(ATTENTION_NAME, evicting_attention)
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    model = AutoModelForCausalLM.from_pretrained(
        ns.model, dtype=getattr(torch, ns.dtype), attn_implementation=ATTENTION_NAME).eval()
    cfg = model.config
    num_layers, num_kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads

    builder = PromptBuilder(tokenizer, corpora.read_corpus(corpus_file), ns)
    cases = builder.passkey_cases() if ns.lengths else []
    windows = builder.ppl_windows(ns.ppl_windows, ns.ppl_prefix + ns.ppl_tokens + 1)
    configs = build_configs(ns.policies, ns.fractions, ns.min_tokens, ns.window_tokens,
                            ns.sink_tokens)
    print(f"{len(configs)} configurations; {len(cases)} passkey prompts; {len(windows)} ppl "
          f"windows; model {ns.model} ({num_layers} layers, {num_kv_heads} KV heads), "
          f"{torch.get_num_threads()} threads", flush=True)

    compressor = Compressor(configs, num_layers, num_kv_heads, ns.pool_kernel, ns.pooling,
                            ns.block_size)
    t0 = time.perf_counter()
    trials = run_passkey(model, tokenizer, cases, configs, compressor, ns)
    passkey_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = run_ppl(model, windows, configs, compressor, ns) if windows else None
    ppl_s = time.perf_counter() - t0

    results = {}
    base_ppl = ppl["ppl"]["full"] if ppl else None
    for config in configs:
        r = {"section": config.section, "kept": compressor.summary(config.label)}
        if cases:
            ts = trials[config.label]
            r["passkey"] = {"accuracy": passkey_accuracy(ts),
                            "by_length": grouped_accuracy(ts, ("length",)),
                            "by_length_depth": grouped_accuracy(ts, ("length", "depth")),
                            "trials": ts}
        if ppl:
            value = ppl["ppl"][config.label]
            r["perplexity"] = {"ppl": round(value, 4), "ppl_ratio": round(value / base_ppl, 4),
                               "tokens": ns.ppl_tokens * len(windows),
                               "per_window_ppl": [round(math.exp(v / ns.ppl_tokens), 3)
                                                  for v in ppl["nll"][config.label]]}
        results[config.label] = r

    table = build_tables(configs, results, ns.lengths, ns.depths)
    wall_s = round(time.perf_counter() - wall, 1)
    print()
    print(table)
    print(f"\nwall time {wall_s} s (passkey {passkey_s:.0f} s, ppl {ppl_s:.0f} s)", flush=True)

    out_dir = Path(ns.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(ns).items() if k not in ("intro", "needle", "question")}
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if argv is None
        else " ".join(["eviction_ablation.py"] + argv),
        "settings": settings | {"corpus_file": str(corpus_file)},
        "model": {"path": ns.model, "layers": num_layers, "kv_heads": num_kv_heads,
                  "query_heads": cfg.num_attention_heads},
        "configs": [{"label": c.label, **c.section} for c in configs],
        "passkey_prompts": len(cases), "ppl_windows": len(windows),
        "consistency_check": ppl["check"] if ppl else None,
        "host": platform.node(), "threads": torch.get_num_threads(),
        "wall_s": wall_s, "passkey_s": round(passkey_s, 1), "ppl_s": round(ppl_s, 1),
        "results": results, "table": table,
    }
    (out_dir / f"{ns.tag}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{ns.tag}.md").write_text(table + "\n")
    print(f"wrote {out_dir / (ns.tag + '.json')} and {out_dir / (ns.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
