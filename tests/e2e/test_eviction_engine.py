"""End to end on the CPU: per-head eviction served by vLLM's engine (SmolLM2, INT4 pages).

Each scenario runs tests/e2e/eviction_engine.py in a subprocess (the engine core in that
process, so the block pool and the scheduler can be read between steps) and checks its
JSON report.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import cpu_env

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("eviction_engine.py")
PROFILE = """name: test-adakv
quantization: {method: int4, group_size: 64, hadamard_block: 64}
eviction: {policy: adakv, budget_fraction: 0.25, min_tokens: 64, window_tokens: 32}
"""


def scenario(name: str, tmp_path: Path, smollm2_path) -> dict:
    return scenario_with(PROFILE, name, tmp_path)


def scenario_with(profile_text: str, name: str, tmp_path: Path) -> dict:
    profile = tmp_path / "profile.yaml"
    profile.write_text(profile_text)
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(profile), str(out)],
                          env=cpu_env(), capture_output=True, text=True, timeout=900)
    assert out.exists(), (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def blocks_report(smollm2_path, tmp_path_factory):
    return scenario("blocks", tmp_path_factory.mktemp("evict"), smollm2_path)


def test_evicted_prompt_returns_its_middle_blocks_to_the_pool(blocks_report):
    r = blocks_report
    prompt_len = r["long"]["prompt_len"]
    # Ada-KV at 25 %: 209 tokens per head -> 14 blocks of 16 kept, the prompt's last
    # partial block (52) and the decode tail stay, blocks 14..51 go back to the pool
    budget = max(math.floor(0.25 * prompt_len), 64, 4 + 32)
    keep, tail = math.ceil(budget / 16), prompt_len // 16
    assert r["plan"] == {"keep": keep, "tail_block": tail, "freed": tail - keep}
    assert r["counters"] == {"blocks_returned": tail - keep, "requests": 1}
    trace = r["trace"]
    # free blocks: the prefill takes all prompt blocks (2 chunks of 512 tokens), the
    # first decode step returns the evicted ones, the end returns the rest
    full = r["free_start"] - math.ceil((prompt_len + 1) / 16)
    assert min(trace) <= full
    after_eviction = trace[trace.index(min(trace)) + 1]
    assert after_eviction - min(trace) == tail - keep
    assert r["free_end"] == r["free_start"]
    assert r["long"]["text"].strip()


def test_evicted_requests_neither_read_nor_feed_the_prefix_cache(blocks_report):
    r = blocks_report
    # the same long prompt again: no prefix hit (its blocks were never hashed), same answer
    assert r["long"]["cached"] == 0 and r["long_again"]["cached"] == 0
    assert r["long_again"]["tokens"] == r["long"]["tokens"]
    # a short prompt is not evicted and is prefix-cached as usual (prefix caching is on)
    assert r["short_plan"] is False
    assert r["short"][0]["cached"] == 0 and r["short"][1]["cached"] > 0
    # a long prompt starting with the short one does not read its cached blocks (its
    # compaction would overwrite them) ...
    assert r["short_prefixed_long"]["cached"] == 0
    # ... so the short prompt's cached blocks are intact afterwards
    assert r["short_after"]["cached"] > 0
    assert r["short_after"]["tokens"] == r["short"][0]["tokens"]


def test_preemption_and_recompute_give_the_same_output(smollm2_path, tmp_path):
    r = scenario("preemption", tmp_path, smollm2_path)
    cases = {c["when"]: c for c in r["cases"]}
    decode, prefill = cases["decode"], cases["prefill"]
    prompt_len = decode["alone"]["prompt_len"]
    # preempted after 12 generated tokens: the recompute prefills prompt + 11 tokens, and
    # its chunk that ends the prompt runs past it (chunks of 512 tokens)
    assert decode["events"] == [{"computed": prompt_len + 11, "outputs": 12}]
    assert prompt_len > 512
    assert prefill["events"] == [{"computed": 512, "outputs": 0}]
    assert decode["evictions"] == 2 and prefill["evictions"] == 1  # evicted again
    for case in (decode, prefill):
        alone, again = case["alone"], case["preempted"]
        assert again["tokens"] == alone["tokens"], case["when"]
        diff = [abs(a - b) for a, b in zip(alone["logprobs"], again["logprobs"])]
        # before the preemption: bit-identical; after it, the recomputed K/V of the
        # generated tokens come from another batch shape, so INT4 codes can round
        # differently (measured: max 0.054 here, 0.005 without eviction). Tokens after
        # the prompt attending to the full cache instead of the evicted one (the error
        # this guards against) measured 0.68.
        assert max(diff[:12]) == 0.0, case["when"]
        assert max(diff) < 0.2, (case["when"], diff)


@pytest.mark.parametrize("policy", ["pyramidkv", "streamingllm"])
def test_other_policies_return_their_planned_blocks(policy, smollm2_path, tmp_path):
    profile = PROFILE.replace("adakv", policy)
    r = scenario_with(profile, "policy", tmp_path)
    prompt_len = r["long"]["prompt_len"]
    tail = prompt_len // 16
    if policy == "pyramidkv":  # its first layer keeps the most: that layer sets the blocks
        assert r["plan"]["keep"] > math.ceil(max(math.floor(0.25 * prompt_len), 64) / 16)
    else:
        assert r["plan"]["keep"] == math.ceil(max(math.floor(0.25 * prompt_len), 64) / 16)
    assert r["plan"]["freed"] == tail - r["plan"]["keep"] > 0
    assert r["blocks_returned"] == r["plan"]["freed"]
    lowest = min(r["trace"])
    assert r["trace"][r["trace"].index(lowest) + 1] - lowest == r["plan"]["freed"]
    assert r["long"]["text"].strip()


def test_more_requests_run_at_once(smollm2_path, tmp_path):
    # 8 prompts of 721 tokens (+16 generated) into 160 blocks of 16: without eviction a
    # request holds 47 blocks, so at most 3 run at once (measured: 3, 53 steps); evicted
    # to 25 % a request holds 13 + its tail
    r = scenario("capacity", tmp_path, smollm2_path)
    assert r["finished"] == 8
    assert r["max_running"] > 160 // math.ceil((721 + 16) / 16)
    assert r["max_running"] >= 6


def test_an_opted_out_request_is_not_evicted_through_preemption(smollm2_path, tmp_path):
    r = scenario("optout", tmp_path, smollm2_path)
    prompt_len = r["alone"]["prompt_len"]
    assert prompt_len // 16 - math.ceil(max(math.floor(0.25 * prompt_len), 64) / 16) > 0
    # alone: nothing evicted, the pool only shrinks while it runs (no gap returned)
    assert r["counters_after_alone"] == 0
    trace = r["trace"][:-1]  # the last step finishes the request and frees everything
    assert all(b <= a for a, b in zip(trace, trace[1:])), trace
    # preempted after 12 tokens and resumed: still not evicted, same greedy tokens
    # (the recompute reads its own prefix-cached blocks, as without eviction)
    assert r["events"] and r["events"][0]["outputs"] == 12
    assert r["counters_after_preempted"] == 0
    assert r["preempted"]["tokens"] == r["alone"]["tokens"]
    # the first run's blocks were hashed: the second read them from the prefix cache
    assert r["preempted"]["cached"] > 0
    # opted in, the same prompt is evicted (and reads no prefix cache)
    assert r["counters_after_on"] == 1 and r["on"]["cached"] == 0
    # a bad value is refused before it reaches the engine, naming the field
    assert r["bad"] and "vllm_xargs.kvplug_eviction" in r["bad"]
