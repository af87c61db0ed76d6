"""Cost of evicting one prompt on the GPU: scoring, selection and compaction, per request.

Runs the worker's eviction of one request as served (`EvictedRequest.observe` with
`defer=True` in every layer of the chunk that ends the prompt, then `evict_pending`: SnapKV
scores of several layers at once from the observation window's queries over the
dequantized prompt keys, the policy's per-head selection on the host, the exact compaction
of the kept quantized entries into the head-packed layout) on quantized paged caches of
`--layers` layers, Llama-3.1-8B attention (32 query heads, 8 KV heads of 128, block 16),
and reports the median time per request and per layer. Needs torch + triton on a GPU, no
vLLM.

    python bench/eviction_cost.py --prompts 2048 8192 --out bench/results/eviction_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_kvplug.eviction.packed import packed_plan  # noqa: E402
from vllm_kvplug.eviction.policies import policy_from_section  # noqa: E402
from vllm_kvplug.eviction.serving import EvictedRequest  # noqa: E402
from vllm_kvplug.profiles.loader import load_profile  # noqa: E402
from vllm_kvplug.quant.paged import PagedLayout  # noqa: E402
from vllm_kvplug.quant.recipe import KVRecipe  # noqa: E402


def one_request(profile: str, prompt: int, layers: int, hq: int, h: int, d: int, bs: int,
                device: torch.device, repeats: int, profile_to: Path | None = None) -> dict:
    resolved = load_profile(profile)
    policy = policy_from_section(resolved.profile.eviction)
    recipe = KVRecipe.from_section(resolved.profile.quantization)
    layout = PagedLayout(recipe, h, d, bs)
    plan = packed_plan(policy, prompt, layers, bs)
    if plan is None:
        return {"prompt": prompt, "evicted": False}
    from vllm_kvplug.triton_kernels import write_kv

    blocks = -(-prompt // bs)
    block_ids = torch.randperm(blocks + 8, device=device)[:blocks].int()
    pos = torch.arange(prompt, device=device)
    slots = block_ids[pos // bs].long() * bs + pos % bs
    caches = []
    for _ in range(layers):
        cache = torch.zeros(blocks + 8, layout.page_bytes, dtype=torch.uint8, device=device)
        k = torch.randn(prompt, h, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(prompt, h, d, device=device, dtype=torch.bfloat16)
        write_kv(cache, k, v, slots, layout)
        caches.append(cache)
    window = min(policy.window_tokens, prompt)
    queries = [torch.randn(window, hq, d, device=device, dtype=torch.bfloat16)
               for _ in range(layers)]
    times = []
    for _ in range(repeats + 1):
        pristine = [c.clone() for c in caches]
        state = EvictedRequest(policy, plan, layers)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(layers):
            state.observe(layer, queries[layer], prompt - window, pristine[layer], layout,
                          block_ids, d ** -0.5, defer=True)
        state.evict_pending(layout)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert state.compacted_all()
    if profile_to is not None:  # where the time of one more request goes
        from torch.profiler import ProfilerActivity, profile as torch_profile

        pristine = [c.clone() for c in caches]
        state = EvictedRequest(policy, plan, layers)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for layer in range(layers):
                state.observe(layer, queries[layer], prompt - window, pristine[layer],
                              layout, block_ids, d ** -0.5, defer=True)
            state.evict_pending(layout)
            torch.cuda.synchronize()
        table = prof.key_averages(group_by_stack_n=0).table(
            sort_by="self_cpu_time_total", row_limit=30)
        Path(profile_to).write_text(table)
        print(table)
    per_request = sorted(times[1:])[len(times[1:]) // 2]  # median, first run is warm-up
    return {"prompt": prompt, "evicted": True, "profile": profile,
            "blocks_before": blocks, "blocks_kept": plan.num_keep_blocks,
            "blocks_freed": plan.blocks_freed, "layers": layers,
            "per_layer_ms": round(1000 * per_request / layers, 3),
            "per_request_ms": round(1000 * per_request, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["int4-adakv"])
    parser.add_argument("--prompts", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-profile", type=Path, default=None,
                        help="also profile one request; tables to PATH.<profile>.<prompt>.txt")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/eviction_cost.json")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    rows = [one_request(p, n, ns.layers, 32, 8, 128, 16, device, ns.repeats,
                        ns.torch_profile.with_suffix(f".{p}.{n}.txt")
                        if ns.torch_profile else None)
            for p in ns.profiles for n in ns.prompts]
    result = {"device": torch.cuda.get_device_name(), "rows": rows}
    print("| profile | prompt | blocks kept / before | ms per layer | ms per request |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["evicted"]:
            print(f"| {r['profile']} | {r['prompt']} | {r['blocks_kept']} / "
                  f"{r['blocks_before']} | {r['per_layer_ms']} | {r['per_request_ms']} |")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
