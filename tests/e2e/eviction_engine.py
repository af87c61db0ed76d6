"""Drive vLLM's offline engine on the CPU with an eviction profile and report as JSON.

Run as a script by tests/e2e/test_eviction_engine.py (the engine core runs in this process,
VLLM_ENABLE_V1_MULTIPROCESSING=0, so the scheduler's block pool can be read between steps):

    python tests/e2e/eviction_engine.py blocks PROFILE OUT.json
    python tests/e2e/eviction_engine.py preemption PROFILE OUT.json
    python tests/e2e/eviction_engine.py policy PROFILE OUT.json
    python tests/e2e/eviction_engine.py capacity PROFILE OUT.json
    python tests/e2e/eviction_engine.py optout PROFILE OUT.json

`blocks`: one long prompt stepped alone (free blocks of vLLM's pool at every step), the
same prompt again, a short prompt twice (below the eviction threshold: prefix-cached), a
long prompt that starts with the short one (evicted: must not read the prefix cache),
and the short prompt a third time (its cached blocks must be intact).
`preemption`: a prompt alone, then the same prompt preempted once (vLLM's own preemption
path, forced between two steps) after it generated tokens, and another one preempted in
the middle of its prefill; greedy outputs of both. One request at a time, so that the
batch shapes (and vLLM's CPU GEMMs' last bits) are the same in both runs.
`policy`: one long prompt, blocks returned against the plan. `capacity`: eight long
prompts at once into 160 blocks, the most requests running in one step.
`optout`: a long prompt sent with `kvplug_eviction: "off"` alone, again preempted after
12 generated tokens, and opted in; free blocks and eviction counters of each.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")

BLOCK = 16
BATCHED_TOKENS = 512
MAX_TOKENS = 32
SHORT = "The old mill stood by the river, and every morning the miller opened its doors."


def long_prompt(topic: str, lines: int = 60) -> str:
    story = " ".join(f"Line {i}: the {topic} keeps flowing past the old mill."
                     for i in range(lines))
    return story + f"\nWhat keeps flowing past the old mill?"


def listing_prompt(topic: str, lines: int = 44) -> str:
    """A numbered listing to continue: greedy decoding is confident at every step, so
    batch-dependent float noise (vLLM's CPU GEMMs differ in the last bits between batch
    shapes, and INT4 rounding can amplify that) does not flip tokens."""
    return " ".join(f"Line {i}: the {topic} keeps flowing past mill number {i * 7}."
                    for i in range(lines))


def make_llm(profile: str, **extra):
    from vllm import LLM

    from vllm_kvplug.models import ensure_smollm2

    extra.setdefault("max_model_len", 2048)
    return LLM(str(ensure_smollm2()), dtype="float32", enforce_eager=True, block_size=BLOCK, max_num_batched_tokens=BATCHED_TOKENS,
               enable_prefix_caching=True, additional_config={"kv_compression": profile},
               **extra)


def run(llm, prompts: dict[str, str], max_tokens: int, pool_trace: list | None = None,
        on_step=None, extra_args: dict | None = None):
    """Greedy outputs {id: {tokens, cached}} of prompts added together, stepped to the end."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0, extra_args=extra_args)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    pool = scheduler(llm).kv_cache_manager.block_pool
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = out.outputs[0]
                done[out.request_id] = {"tokens": list(result.token_ids),
                                        "logprobs": [lp[t].logprob for t, lp in
                                                     zip(result.token_ids, result.logprobs)],
                                        "text": out.outputs[0].text,
                                        "prompt_len": len(out.prompt_token_ids),
                                        "cached": out.num_cached_tokens}
        if pool_trace is not None:
            pool_trace.append(pool.get_num_free_blocks())
        if on_step is not None:
            on_step()
    return done


def scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def blocks(profile: str) -> dict:
    from vllm_kvplug.vllm_glue import kv_manager

    llm = make_llm(profile)
    pool = scheduler(llm).kv_cache_manager.block_pool
    report = {"free_start": pool.get_num_free_blocks()}
    trace: list[int] = []
    report["long"] = run(llm, {"long": long_prompt("river")}, 8, trace)["long"]
    report["trace"] = trace
    report["free_end"] = pool.get_num_free_blocks()
    planner = kv_manager.active_planner()
    plan = planner.plan(report["long"]["prompt_len"])
    report["plan"] = {"keep": plan.num_keep_blocks, "tail_block": plan.tail_block,
                      "freed": plan.blocks_freed}
    report["counters"] = {"blocks_returned": kv_manager.COUNTERS.blocks_returned,
                          "requests": kv_manager.COUNTERS.requests}
    report["long_again"] = run(llm, {"long2": long_prompt("river")}, 8)["long2"]
    report["short"] = [run(llm, {f"s{i}": SHORT}, 8)[f"s{i}"] for i in range(2)]
    report["short_plan"] = planner.plan(report["short"][0]["prompt_len"]) is not None
    report["short_prefixed_long"] = run(
        llm, {"sl": SHORT + " " + long_prompt("water")}, 8)["sl"]
    report["short_after"] = run(llm, {"s3": SHORT}, 8)["s3"]
    return report


def preemption(profile: str) -> dict:
    """Each prompt alone, then again with a forced preemption (vLLM's own
    `_preempt_request`, what the scheduler does when blocks run out) after its first
    prefill chunk, and after it generated tokens (the recompute prefills prompt and
    generated tokens together: the chunk that ends the prompt runs past it)."""
    from vllm_kvplug.vllm_glue import kv_manager

    llm = make_llm(profile)
    sched = scheduler(llm)
    report = {"cases": []}
    for rid, topic, when in (("a", "river", "decode"), ("b", "water", "prefill")):
        prompt = listing_prompt(topic)
        alone = run(llm, {rid: prompt}, MAX_TOKENS)[rid]
        requests_before = kv_manager.COUNTERS.requests
        events: list[dict] = []

        def preempt_once(rid2=f"{rid}-p", when=when, events=events):
            request = next((r for k, r in sched.requests.items()
                            if k == rid2 or k.startswith(rid2 + "-")), None)
            if events or request is None or request not in sched.running:
                return
            due = (request.num_output_tokens >= 12 if when == "decode"
                   else 0 < request.num_computed_tokens < request.num_prompt_tokens)
            if due:
                events.append({"computed": request.num_computed_tokens,
                               "outputs": request.num_output_tokens})
                sched.running.remove(request)
                sched._preempt_request(request, time.monotonic())

        again = run(llm, {f"{rid}-p": prompt}, MAX_TOKENS, on_step=preempt_once)[f"{rid}-p"]
        report["cases"].append({
            "when": when, "alone": alone, "preempted": again, "events": events,
            "evictions": kv_manager.COUNTERS.requests - requests_before,
            "num_preemptions": again.get("num_preemptions")})
    return report


def policy(profile: str) -> dict:
    """One long prompt: blocks returned against the plan, and the answer."""
    from vllm_kvplug.vllm_glue import kv_manager

    llm = make_llm(profile)
    trace: list[int] = []
    long = run(llm, {"long": long_prompt("river")}, 8, trace)["long"]
    plan = kv_manager.active_planner().plan(long["prompt_len"])
    return {"long": long, "trace": trace,
            "plan": {"keep": plan.num_keep_blocks, "tail_block": plan.tail_block,
                     "freed": plan.blocks_freed},
            "blocks_returned": kv_manager.COUNTERS.blocks_returned}


def capacity(profile: str) -> dict:
    """Eight long prompts at once into a pool of 160 blocks: how many run together."""
    llm = make_llm(profile, num_gpu_blocks_override=160, max_model_len=1024)
    sched = scheduler(llm)
    running: list[int] = []
    preempted: list[str] = []
    original = sched._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    sched._preempt_request = counting
    start = time.monotonic()
    prompts = {f"c{i}": listing_prompt(f"boat {i}") for i in range(8)}
    done = run(llm, prompts, 16, on_step=lambda: running.append(len(sched.running)))
    return {"max_running": max(running), "steps": len(running), "preemptions": len(preempted),
            "seconds": time.monotonic() - start, "finished": len(done),
            "outputs": {rid: d["tokens"] for rid, d in done.items()}}


def optout(profile: str) -> dict:
    """An opted-out long prompt: alone, preempted after 12 tokens (vLLM's own
    `_preempt_request`), then the same prompt opted in."""
    from vllm_kvplug.vllm_glue import kv_manager

    llm = make_llm(profile)
    sched = scheduler(llm)
    off = {"kvplug_eviction": "off"}
    prompt = listing_prompt("river")
    report = {}
    trace: list[int] = []
    report["alone"] = run(llm, {"o": prompt}, MAX_TOKENS, trace, extra_args=off)["o"]
    report["trace"] = trace
    report["counters_after_alone"] = kv_manager.COUNTERS.requests
    events: list[dict] = []

    def preempt_once():
        request = next((r for k, r in sched.requests.items() if k.startswith("op")), None)
        if events or request is None or request not in sched.running:
            return
        if request.num_output_tokens >= 12:
            events.append({"computed": request.num_computed_tokens,
                           "outputs": request.num_output_tokens})
            sched.running.remove(request)
            sched._preempt_request(request, time.monotonic())

    report["preempted"] = run(llm, {"op": prompt}, MAX_TOKENS, on_step=preempt_once,
                              extra_args=off)["op"]
    report["events"] = events
    report["counters_after_preempted"] = kv_manager.COUNTERS.requests
    report["on"] = run(llm, {"on": prompt}, MAX_TOKENS,
                       extra_args={"kvplug_eviction": "on"})["on"]
    report["counters_after_on"] = kv_manager.COUNTERS.requests
    try:
        run(llm, {"bad": prompt}, 4, extra_args={"kvplug_eviction": "no"})
        report["bad"] = None
    except ValueError as e:
        report["bad"] = str(e)
    return report


def main() -> None:
    scenario, profile, out = sys.argv[1:4]
    report = {"blocks": blocks, "preemption": preemption, "policy": policy,
              "capacity": capacity, "optout": optout}[scenario](profile)
    with open(out, "w") as f:
        json.dump(report, f)
    sys.stdout.flush()
    os._exit(0)  # vLLM's CPU shutdown is not always clean (../shared/notes/vllm-cpu.md)


if __name__ == "__main__":
    main()
