"""End to end on the CPU: the OpenAI server with `--kv-compression int4-adakv` (INT4 pages +
Ada-KV eviction) answers a long prompt and exports the eviction metrics on /metrics."""

import math
import re

import pytest

from tests.e2e.server import Server, answer

pytestmark = pytest.mark.e2e

BLOCK = 128  # vLLM's CPU default block size


@pytest.fixture(scope="module")
def adakv_server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "adakv.log"
    server = Server(smollm2_path, ["--kv-compression", "int4-adakv",
                                   "--max-num-batched-tokens", "256",  # chunked prefill
                                   "--enable-prefix-caching"], log)
    yield server
    server.stop()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def test_serves_a_long_prompt_with_eviction_and_exports_metrics(adakv_server):
    story = " ".join(f"Line {i}: the river keeps flowing past the old mill." for i in range(60))
    question = story + "\nWhat keeps flowing past the old mill?"
    reply = adakv_server.chat(question, max_tokens=16)
    first = answer(reply)
    prompt_len = reply["usage"]["prompt_tokens"]
    # about the story (at 25 % this 135M model may name the mill rather than the river)
    assert any(word in first.lower() for word in ("river", "water", "mill")), first
    text = adakv_server.metrics()
    assert 'eviction="adakv"' in text and 'profile="int4-adakv"' in text
    # int4-adakv: 25 % of the prompt, window 128 -> ceil(budget / 128) blocks kept
    budget = max(math.floor(0.25 * prompt_len), 64, 4 + 128)
    freed = prompt_len // BLOCK - math.ceil(budget / BLOCK)
    assert freed > 0
    assert metric(text, "kvplug_eviction_requests_total") == 1
    assert metric(text, "kvplug_eviction_blocks_returned_total") == freed
    assert metric(text, "kvplug_eviction_kept_fraction_count") == 1
    kept = metric(text, "kvplug_eviction_kept_fraction_sum")
    assert kept == pytest.approx(budget / prompt_len)
    assert metric(text, "kvplug_eviction_tokens_evicted_total") == pytest.approx(
        prompt_len - budget)
    # the same prompt again: not served from the prefix cache (evicted blocks are never
    # hashed), evicted again, same answer
    hits = metric(text, "vllm:prefix_cache_hits_total")
    second = answer(adakv_server.chat(question, max_tokens=16))
    text = adakv_server.metrics()
    assert second == first
    assert metric(text, "vllm:prefix_cache_hits_total") == hits
    assert metric(text, "kvplug_eviction_requests_total") == 2
    assert metric(text, "kvplug_eviction_blocks_returned_total") == 2 * freed
