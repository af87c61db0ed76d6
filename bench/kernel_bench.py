"""Benchmark and full-size check of the Triton KV kernels (`vllm_kvplug.triton_kernels`).

Runs on one GPU with torch + triton and this repository on PYTHONPATH (no vLLM needed):

1. correctness at full size against `vllm_kvplug.quant.paged.attention_reference`
   (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head size 128, block 16): decode
   batches 8 x 8192 and 64 x 2048 tokens of context, and a 2048-token prefill chunk with
   2048 cached tokens;
2. decode kernel time and achieved bandwidth (bytes of KV pages read / time) against the
   GPU's peak, and against a bf16 baseline of the same shapes (torch SDPA on a dense bf16
   KV: the GQA group folded into the query length, which is exact for decode), for the
   profiles K4V4 g64 h64, K8V4 g64 h64 and K2V2 g32 h64;
3. cache-write kernel time per token (4096 tokens x 8 KV heads) against a plain bf16
   `index_copy_` of K and V into a paged bf16 cache.

Prints markdown tables and writes JSON (`--out`, default bench/results/kernel_bench.json).
`--smoke` runs tiny shapes (also on the CPU under TRITON_INTERPRET=1; used by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_kvplug.quant.paged import PagedLayout, attention_reference  # noqa: E402
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe  # noqa: E402


def load_kernels():
    import vllm_kvplug.triton_kernels as tk  # needs `pip install -e .` (package-dir map)

    return tk


PROFILES = {  # name: (key bits, value bits, group, hadamard block)
    "K4V4 g64 h64": (4, 4, 64, 64),
    "K8V4 g64 h64": (8, 4, 64, 64),
    "K2V2 g32 h64": (2, 2, 32, 64),
}


def peak_bandwidth(device: torch.device) -> tuple[str, float | None]:
    """(device name, peak HBM bytes/s or None when unknown)."""
    if device.type != "cuda":
        return "cpu (interpreter)", None
    name = torch.cuda.get_device_name(device)
    up = name.upper()
    if "H100" in up:
        return name, 2.0e12 if "PCIE" in up else 3.35e12
    if "H200" in up:
        return name, 4.8e12
    if "A100" in up:
        return name, 2.0e12
    return name, None


def timed(fn, device: torch.device, smoke: bool) -> float:
    """Seconds per call (triton do_bench on a GPU, one wall-clock call on the CPU)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100 if not smoke else 10) * 1e-3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Setup:
    """A paged cache filled by write_kv for `seq_lens`, and a batch of queries."""

    def __init__(self, tk, layout: PagedLayout, num_q_heads: int, seq_lens: list[int],
                 q_lens: list[int], device, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_size
        blocks = [max(1, -(-n // bs)) for n in seq_lens]
        num_blocks = sum(blocks)
        perm = torch.randperm(num_blocks, generator=gen)
        self.block_table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
        used = 0
        for i, nb in enumerate(blocks):
            self.block_table[i, :nb] = perm[used:used + nb]
            used += nb
        self.block_table = self.block_table.to(device)
        self.cache = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8,
                                 device=device)
        self.pages_read = num_blocks
        for i, n in enumerate(seq_lens):  # per sequence: bounded temporary memory
            pos = torch.arange(n, device=device)
            slots = self.block_table[i, pos // bs].long() * bs + pos % bs
            k = (torch.randn(n, h, d, generator=gen) + 0.5 * torch.randn(1, h, d, generator=gen))
            v = torch.randn(n, h, d, generator=gen)
            tk.write_kv(self.cache, k.to(device, torch.bfloat16), v.to(device, torch.bfloat16),
                        slots, layout)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        self.query_start_loc = torch.tensor(qsl, dtype=torch.int32, device=device)
        self.query = torch.randn(qsl[-1], num_q_heads, d, generator=gen).to(device,
                                                                           torch.bfloat16)
        self.output = torch.empty_like(self.query)
        self.max_query_len, self.max_seq_len = max(q_lens), max(seq_lens)
        self.layout = layout

    def run(self, tk, workspace=None, num_splits=None):
        return tk.paged_attention(self.query, self.cache, self.block_table, self.seq_lens,
                                  self.query_start_loc, self.layout,
                                  self.layout.head_size ** -0.5, self.output,
                                  max_query_len=self.max_query_len,
                                  max_seq_len=self.max_seq_len, workspace=workspace,
                                  num_splits=num_splits)

    def reference(self):
        """attention_reference, computed on the CPU (it builds its masks there)."""
        cpu = [t.cpu() for t in (self.query, self.cache, self.block_table, self.seq_lens,
                                 self.query_start_loc)]
        return attention_reference(*cpu, self.layout, self.layout.head_size ** -0.5)


def make_layout(profile: str, heads: int, head_size: int, block_size: int) -> PagedLayout:
    kb, vb, g, hb = PROFILES[profile]
    return PagedLayout(KVRecipe(QuantRecipe(kb, g, hb), QuantRecipe(vb, g, hb)), heads,
                       head_size, block_size)


def bf16_decode_baseline(batch, seq_len, hq, h, d, device, smoke):
    """Seconds of SDPA decode on a dense bf16 KV [B, H, S, D] (GQA group as query rows)."""
    q = torch.randn(batch, h, hq // h, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, h, seq_len, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    return timed(fn, device, smoke), 2 * k.numel() * 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "kernel_bench.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter ok)")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("no GPU: run with TRITON_INTERPRET=1 (and --smoke)")
    tk = load_kernels()
    name, peak = peak_bandwidth(device)
    if args.smoke:
        hq, h, d, bs = 4, 2, 64, 16
        correctness_cases = [("decode", [40, 23], [1, 1]), ("prefill", [24], [8])]
        decode_shapes = [(2, 48)]
        write_tokens = 32
        profiles = list(PROFILES)[:2]
    else:
        hq, h, d, bs = 32, 8, 128, 16  # Llama-3.1-8B
        correctness_cases = [("decode 8x8192", [8192] * 8, [1] * 8),
                             ("decode 64x2048", [2048] * 64, [1] * 64),
                             ("prefill 2048 + 2048 cached", [4096], [2048])]
        decode_shapes = [(8, 8192), (64, 2048), (32, 4096), (1, 32768)]
        write_tokens = 4096
        profiles = list(PROFILES)

    result = {"device": name, "peak_bytes_per_s": peak, "smoke": args.smoke,
              "shape": {"q_heads": hq, "kv_heads": h, "head_size": d, "block_size": bs},
              "correctness": [], "decode": [], "prefill": [], "write": []}

    # 1. correctness at full size
    if not args.skip_correctness:
        for profile in profiles:
            layout = make_layout(profile, h, d, bs)
            for case, seq_lens, q_lens in correctness_cases:
                s = Setup(tk, layout, hq, seq_lens, q_lens, device)
                got = s.run(tk).float().cpu()
                want = s.reference().float()
                err = (got - want).abs()
                ok = bool(err.max() < 3e-2 and err.mean() < 2e-3)
                result["correctness"].append({"profile": profile, "case": case,
                                              "max_abs_err": err.max().item(),
                                              "mean_abs_err": err.mean().item(), "ok": ok})
                if s.max_query_len == 1:  # the split path, forced, against the same reference
                    got = s.run(tk, num_splits=4).float().cpu()
                    err = (got - want).abs()
                    result["correctness"].append({
                        "profile": profile, "case": case + " split4",
                        "max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
                        "ok": bool(err.max() < 3e-2 and err.mean() < 2e-3)})
                del s, got, want, err
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # 2. decode time and bandwidth
    for profile in profiles:
        layout = make_layout(profile, h, d, bs)
        for batch, ctx in decode_shapes:
            s = Setup(tk, layout, hq, [ctx] * batch, [1] * batch, device)
            splits = tk.choose_num_splits(batch, h, 1, ctx, device)
            ws = tk.AttentionWorkspace(batch, hq, d, max(splits, 1), device)
            sec = timed(lambda: s.run(tk, workspace=ws), device, args.smoke)
            nbytes = s.pages_read * layout.page_bytes
            base_sec, base_bytes = bf16_decode_baseline(batch, ctx, hq, h, d, device, args.smoke)
            row = {"profile": profile, "batch": batch, "context": ctx, "splits": splits,
                   "time_us": sec * 1e6, "kv_bytes": nbytes, "gbytes_per_s": nbytes / sec / 1e9,
                   "frac_of_peak": nbytes / sec / peak if peak else None,
                   "bf16_sdpa_time_us": base_sec * 1e6,
                   "bf16_gbytes_per_s": base_bytes / base_sec / 1e9,
                   "speedup_vs_bf16": base_sec / sec}
            result["decode"].append(row)
            del s, ws

    # prefill chunk time (no baseline of the same causal shape in SDPA: report TFLOP/s)
    pre_seq, pre_q = ([24], [8]) if args.smoke else ([4096], [2048])
    for profile in profiles:
        layout = make_layout(profile, h, d, bs)
        s = Setup(tk, layout, hq, pre_seq, pre_q, device)
        sec = timed(lambda: s.run(tk), device, args.smoke)
        ctx = pre_seq[0] - pre_q[0]
        pairs = pre_q[0] * ctx + pre_q[0] * (pre_q[0] + 1) / 2  # causal (query, key) pairs
        flops = 4 * pairs * hq * d
        result["prefill"].append({"profile": profile, "q_len": pre_q[0], "seq_len": pre_seq[0],
                                  "time_us": sec * 1e6, "tflops": flops / sec / 1e12})
        del s

    # 3. cache write
    for profile in profiles:
        layout = make_layout(profile, h, d, bs)
        t = write_tokens
        num_blocks = -(-t // bs) + 1
        cache = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8, device=device)
        qkv = torch.randn(t, hq + 2 * h, d, device=device, dtype=torch.bfloat16)
        key, value = qkv[:, hq:hq + h], qkv[:, hq + h:]
        slots = torch.randperm(num_blocks * bs, device=device)[:t]
        sec = timed(lambda: tk.write_kv(cache, key, value, slots, layout), device, args.smoke)
        dense = torch.zeros(num_blocks * bs, 2, h, d, device=device, dtype=torch.bfloat16)
        kv = torch.stack([key, value], 1)  # outside the timed region: the copy is the baseline

        def copy():
            dense.index_copy_(0, slots, kv)
        base = timed(copy, device, args.smoke)
        result["write"].append({"profile": profile, "tokens": t, "kv_heads": h,
                                "time_us": sec * 1e6, "ns_per_token": sec / t * 1e9,
                                "bf16_index_copy_us": base * 1e6,
                                "slowdown_vs_bf16_copy": sec / base})

    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0 if all(c["ok"] for c in result["correctness"]) else 1


def fmt(x, digits=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return str(x)


def print_tables(result: dict) -> None:
    print(f"# Triton KV kernels on {result['device']}"
          + (f" (peak {result['peak_bytes_per_s'] / 1e12:.2f} TB/s)"
             if result["peak_bytes_per_s"] else ""))
    if result["correctness"]:
        print("\n| profile | case | max abs err | mean abs err | ok |\n|---|---|---|---|---|")
        for c in result["correctness"]:
            print(f"| {c['profile']} | {c['case']} | {c['max_abs_err']:.2e} | "
                  f"{c['mean_abs_err']:.2e} | {c['ok']} |")
    print("\n| profile | batch x context | splits | time us | GB/s | % peak | bf16 SDPA us "
          "| bf16 GB/s | speedup |\n|---|---|---|---|---|---|---|---|---|")
    for r in result["decode"]:
        pct = fmt(r["frac_of_peak"] * 100 if r["frac_of_peak"] else None, 0)
        print(f"| {r['profile']} | {r['batch']} x {r['context']} | {r['splits']} | "
              f"{fmt(r['time_us'])} | {fmt(r['gbytes_per_s'], 0)} | {pct} | "
              f"{fmt(r['bf16_sdpa_time_us'])} | {fmt(r['bf16_gbytes_per_s'], 0)} | "
              f"{fmt(r['speedup_vs_bf16'], 2)} |")
    print("\n| profile | prefill q_len / seq_len | time us | TFLOP/s |\n|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['profile']} | {r['q_len']} / {r['seq_len']} | {fmt(r['time_us'])} | "
              f"{fmt(r['tflops'], 1)} |")
    print("\n| profile | write tokens x heads | time us | ns/token | bf16 index_copy us "
          "| ratio |\n|---|---|---|---|---|---|")
    for r in result["write"]:
        print(f"| {r['profile']} | {r['tokens']} x {r['kv_heads']} | {fmt(r['time_us'])} | "
              f"{fmt(r['ns_per_token'])} | {fmt(r['bf16_index_copy_us'])} | "
              f"{fmt(r['slowdown_vs_bf16_copy'], 2)} |")


if __name__ == "__main__":
    sys.exit(main())
