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

from vllm_kvplug.quant.paged import (PagedLayout, attention_reference,  # noqa: E402
                                     write_reference)
from vllm_kvplug.quant.recipe import KVRecipe, QuantRecipe  # noqa: E402
from vllm_kvplug.quant.reference import unpack  # noqa: E402


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
    """Seconds per call of fn on the GPU alone, or one wall-clock call on the CPU.

    On a GPU the calls are captured in a CUDA graph and the graph's replays are timed
    (median), as vLLM runs decode: a timing of eager calls also counts the Python launch
    path (argument checks, split choice, two Triton launches), which for short kernels
    exceeded the kernel time and made eager timings of the same launch vary up to 4x
    between runs. Half a second of replays first lets the clocks leave their idle state.
    """
    if device.type == "cuda":
        import triton.testing
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        t_end = time.perf_counter() + 0.5
        while time.perf_counter() < t_end:
            fn()
            torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=100 if not smoke else 10,
                                                 return_mode="median") * 1e-3
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


# Inner-loop variants of the attention kernel (overrides of paged_attention._TUNING).
VARIANTS = {
    "default": {},  # what the launcher picks
    # the previous release's choices that remain switchable: steps on every element, and
    # for prefill the Q rotation inside the kernel (fp32 dot, spills at BLOCK_M = 64);
    # its per-group metadata gathers are gone (the H100 runs of `release-0` had them)
    "release-0": {"after_dot": False, "rotate_q_in_kernel": True},
    # launch-shape alternatives for the default inner loop (decode tiles / warps)
    "tile32": {"tile_n": 32},
    "tile64": {"tile_n": 64},
    "warps8": {"warps": 8},
    # the unpacking of the codes through 32-bit shifts and masks (the interpreter's path)
    # instead of the inline-PTX PRMT/LOP3/HFMA2 sequence
    "slow-unpack": {"fast_unpack": False},
    # decode without the register cap, 3 programs an SM (the previous default)
    "occ3": {"maxnreg": None, "programs_per_sm": 3},
}


def with_tuning(tuning: dict, fn):
    """Run fn() with these launch overrides (`paged_attention._TUNING`), restoring the
    launcher after."""
    # the module (the package attribute of the same name is the function)
    pa = sys.modules["vllm_kvplug.triton_kernels.paged_attention"]
    saved = dict(pa._TUNING)
    pa._TUNING.clear()
    pa._TUNING.update(tuning)
    try:
        return fn()
    finally:
        pa._TUNING.clear()
        pa._TUNING.update(saved)


def with_variant(variant: str, fn):
    """Run fn() with the named variant's launch overrides."""
    return with_tuning(VARIANTS[variant], fn)


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


SWEEP_SPLITS = (1, 2, 3, 4, 6, 8, 9, 12, 16, 24, 32, 48)
SWEEP_PREFILL = ((64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2),
                 (128, 64, 8, 3))  # (block_m, tile_n, warps, stages)


def launch_sweep(tk, device, smoke, profiles, hq, h, d, bs, decode_shapes, prefill_cases):
    """Decode: every split count (>= 128 tokens a split) x tile 32/64; prefill: the
    (block_m, tile_n, warps, stages) grid. Times each launch shape of the default inner loop
    (the launcher's own choice is timed first and again last, to show drift)."""
    rows = []
    for profile in profiles:
        layout = make_layout(profile, h, d, bs)
        for batch, ctx in decode_shapes:
            s = Setup(tk, layout, hq, [ctx] * batch, [1] * batch, device)
            auto = tk.choose_num_splits(batch, h, 1, ctx, device)

            def time_it(tuning, splits):
                ws = tk.AttentionWorkspace(batch * max(splits, 1), hq, d, device)
                return with_tuning(tuning, lambda: timed(
                    lambda: s.run(tk, workspace=ws, num_splits=splits), device, smoke))
            first = time_it({}, auto)
            for tile in (32, 64):
                for splits in SWEEP_SPLITS:
                    if splits > 1 and ctx // splits < 128:
                        continue
                    rows.append({"kind": "decode", "profile": profile, "batch": batch,
                                 "context": ctx, "tile_n": tile, "splits": splits,
                                 "time_us": time_it({"tile_n": tile}, splits) * 1e6})
            rows.append({"kind": "decode", "profile": profile, "batch": batch,
                         "context": ctx, "tile_n": "auto", "splits": auto,
                         "time_us": first * 1e6,
                         "again_time_us": time_it({}, auto) * 1e6})
            del s
        for seq_len, q_len, nseq in prefill_cases:
            s = Setup(tk, layout, hq, [seq_len] * nseq, [q_len] * nseq, device)
            for block_m, tile, warps, stages in SWEEP_PREFILL:
                tuning = {"block_m": block_m, "tile_n": tile, "warps": warps,
                          "stages": stages}
                sec = with_tuning(tuning, lambda: timed(lambda: s.run(tk), device, smoke))
                rows.append({"kind": "prefill", "profile": profile, "seqs": nseq,
                             "q_len": q_len, "seq_len": seq_len, "block_m": block_m,
                             "tile_n": tile, "warps": warps, "stages": stages,
                             "time_us": sec * 1e6})
            del s
    return rows


def key_offset_write_check(tk, layout: PagedLayout, tokens: int, device) -> dict:
    """The write kernel with a static K offset (`quantization.key_offsets`) against
    `write_reference` (float32 on the CPU), at full size: K codes may differ by one step in
    a few entries (bf16 rotation on the GPU vs float32), steps and minima by rounding."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    h, d, bs = layout.num_kv_heads, layout.head_size, layout.block_size
    offset = 8 * torch.randn(h, d, generator=gen)  # a large per-(head, channel) component
    key = (offset + torch.randn(tokens, h, d, generator=gen)).to(torch.bfloat16)
    value = torch.randn(tokens, h, d, generator=gen).to(torch.bfloat16)
    num_blocks = -(-tokens // bs) + 1
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens]
    want = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8)
    write_reference(want, key, value, slots, layout, key_offset=offset)
    got = torch.zeros(num_blocks, layout.page_bytes, dtype=torch.uint8, device=device)
    tk.write_kv(got, key.to(device), value.to(device), slots.to(device), layout,
                key_offset=offset.to(device))
    got = got.cpu()
    (wc, ws, wm), (gc, gs, gm) = layout.views(want, "key"), layout.views(got, "key")
    bits = layout.recipe.key.bits
    code_diff = unpack(gc, bits).int() - unpack(wc, bits).int()
    meta_err = max(((g.float() - w.float()).abs() / w.float().abs().clamp_min(1e-3)).max()
                   .item() for g, w in ((gs, ws), (gm, wm)))
    return {"case": f"write {tokens} tokens with key offset",
            "max_abs_err": float(code_diff.abs().max()),
            "mean_abs_err": float((code_diff != 0).float().mean()),
            "meta_max_rel_err": meta_err,
            "ok": bool(code_diff.abs().max() <= 1 and (code_diff != 0).float().mean() < 0.01
                       and meta_err < 1e-2)}


def bf16_prefill_baseline(q_len, seq_len, hq, d, device, smoke):
    """Seconds of bf16 SDPA (FlashAttention on a GPU) for q_len new tokens after
    seq_len - q_len cached ones (bottom-right causal mask as an explicit bias only when
    there is cached context; with none it is `is_causal`)."""
    q = torch.randn(1, hq, q_len, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, hq, seq_len, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if q_len == seq_len:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True)
    else:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(q_len, seq_len)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=mask)
    return timed(fn, device, smoke)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "kernel_bench.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter ok)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                    help="inner-loop variants to time side by side (correctness: each)")
    ap.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=None)
    ap.add_argument("--only", choices=["decode", "prefill", "write"], default=None,
                    help="time one kernel family only")
    ap.add_argument("--sweep", action="store_true",
                    help="only time launch shapes (split counts, tiles, prefill blocks)")
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
    if args.profiles:
        profiles = args.profiles

    result = {"device": name, "peak_bytes_per_s": peak, "smoke": args.smoke,
              "shape": {"q_heads": hq, "kv_heads": h, "head_size": d, "block_size": bs},
              "correctness": [], "decode": [], "prefill": [], "write": []}

    prefill_cases = [(24, 8, 1)] if args.smoke else [(4096, 2048, 1), (2048, 2048, 4)]
    if args.sweep:
        result["sweep"] = launch_sweep(tk, device, args.smoke, profiles, hq, h, d, bs,
                                       decode_shapes, prefill_cases)
        for r in result["sweep"]:
            print(json.dumps(r))
        write_json(result, Path(args.out))
        return 0

    # 1. correctness at full size
    if not args.skip_correctness:
        for profile in profiles:
            layout = make_layout(profile, h, d, bs)
            for case, seq_lens, q_lens in correctness_cases:
                s = Setup(tk, layout, hq, seq_lens, q_lens, device)
                want = s.reference().float()
                runs = [(v, None) for v in args.variants]
                if s.max_query_len == 1:  # the split path, forced, against the same reference
                    runs += [(v, 4) for v in args.variants]
                for variant, forced in runs:
                    got = with_variant(variant, lambda: s.run(tk, num_splits=forced))
                    err = (got.float().cpu() - want).abs()
                    result["correctness"].append({
                        "profile": profile, "variant": variant,
                        "case": case + (f" split{forced}" if forced else ""),
                        "max_abs_err": err.max().item(), "mean_abs_err": err.mean().item(),
                        "ok": bool(err.max() < 3e-2 and err.mean() < 2e-3)})
                del s, got, want, err
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            check = key_offset_write_check(tk, layout, 64 if args.smoke else 4096, device)
            result["correctness"].append({"profile": profile, "variant": "default", **check})

    # 2. decode time and bandwidth
    for profile in (profiles if args.only in (None, "decode") else []):
        layout = make_layout(profile, h, d, bs)
        for batch, ctx in decode_shapes:
            s = Setup(tk, layout, hq, [ctx] * batch, [1] * batch, device)
            splits = tk.choose_num_splits(batch, h, 1, ctx, device)
            ws = tk.AttentionWorkspace(batch * 64, hq, d, device)  # any variant's split
            nbytes = s.pages_read * layout.page_bytes
            base_sec, base_bytes = bf16_decode_baseline(batch, ctx, hq, h, d, device, args.smoke)
            for variant in args.variants:
                sec = with_variant(variant, lambda: timed(
                    lambda: s.run(tk, workspace=ws), device, args.smoke))
                ppsm = VARIANTS[variant].get("programs_per_sm")
                result["decode"].append({
                    "profile": profile, "variant": variant, "batch": batch, "context": ctx,
                    "splits": splits if ppsm is None else tk.choose_num_splits(
                        batch, h, 1, ctx, device, programs_per_sm=ppsm),
                    "time_us": sec * 1e6, "kv_bytes": nbytes,
                    "gbytes_per_s": nbytes / sec / 1e9,
                    "frac_of_peak": nbytes / sec / peak if peak else None,
                    "bf16_sdpa_time_us": base_sec * 1e6,
                    "bf16_gbytes_per_s": base_bytes / base_sec / 1e9,
                    "speedup_vs_bf16": base_sec / sec})
            del s, ws

    # prefill chunk time and TFLOP/s, against bf16 SDPA on the same causal shape
    for seq_len, q_len, nseq in (prefill_cases if args.only in (None, "prefill") else []):
        pairs = nseq * (q_len * (seq_len - q_len) + q_len * (q_len + 1) / 2)  # causal pairs
        flops = 4 * pairs * hq * d
        base = nseq * bf16_prefill_baseline(q_len, seq_len, hq, d, device, args.smoke)
        for profile in profiles:
            layout = make_layout(profile, h, d, bs)
            s = Setup(tk, layout, hq, [seq_len] * nseq, [q_len] * nseq, device)
            for variant in args.variants:
                sec = with_variant(variant, lambda: timed(lambda: s.run(tk), device,
                                                                args.smoke))
                result["prefill"].append({
                    "profile": profile, "variant": variant, "seqs": nseq, "q_len": q_len,
                    "seq_len": seq_len, "time_us": sec * 1e6, "tflops": flops / sec / 1e12,
                    "bf16_sdpa_time_us": base * 1e6, "bf16_tflops": flops / base / 1e12,
                    "speedup_vs_bf16": base / sec})
            del s

    # 3. cache write
    for profile in (profiles if args.only in (None, "write") else []):
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
    write_json(result, Path(args.out))
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
        print("\n| profile | variant | case | max abs err | mean abs err | ok |\n"
              "|---|---|---|---|---|---|")
        for c in result["correctness"]:
            print(f"| {c['profile']} | {c['variant']} | {c['case']} | {c['max_abs_err']:.2e} | "
                  f"{c['mean_abs_err']:.2e} | {c['ok']} |")
    print("\n| profile | variant | batch x context | splits | time us | GB/s | % peak "
          "| bf16 SDPA us | bf16 GB/s | speedup |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in result["decode"]:
        pct = fmt(r["frac_of_peak"] * 100 if r["frac_of_peak"] else None, 0)
        print(f"| {r['profile']} | {r['variant']} | {r['batch']} x {r['context']} | "
              f"{r['splits']} | "
              f"{fmt(r['time_us'])} | {fmt(r['gbytes_per_s'], 0)} | {pct} | "
              f"{fmt(r['bf16_sdpa_time_us'])} | {fmt(r['bf16_gbytes_per_s'], 0)} | "
              f"{fmt(r['speedup_vs_bf16'], 2)} |")
    print("\n| profile | variant | prefill seqs x (new / length) | time us | TFLOP/s "
          "| bf16 SDPA us | bf16 TFLOP/s | speedup |\n|---|---|---|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['profile']} | {r['variant']} | {r['seqs']} x ({r['q_len']} / "
              f"{r['seq_len']}) | {fmt(r['time_us'])} | {fmt(r['tflops'], 1)} | "
              f"{fmt(r['bf16_sdpa_time_us'])} | {fmt(r['bf16_tflops'], 1)} | "
              f"{fmt(r['speedup_vs_bf16'], 2)} |")
    print("\n| profile | write tokens x heads | time us | ns/token | bf16 index_copy us "
          "| ratio |\n|---|---|---|---|---|---|")
    for r in result["write"]:
        print(f"| {r['profile']} | {r['tokens']} x {r['kv_heads']} | {fmt(r['time_us'])} | "
              f"{fmt(r['ns_per_token'])} | {fmt(r['bf16_index_copy_us'])} | "
              f"{fmt(r['slowdown_vs_bf16_copy'], 2)} |")


if __name__ == "__main__":
    sys.exit(main())
