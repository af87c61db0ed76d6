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


def test_a_request_can_opt_out_of_eviction_and_bad_values_are_a_400(adakv_server):
    import requests

    story = " ".join(f"Line {i}: the boat keeps drifting past the old pier." for i in range(60))
    question = story + "\nWhat keeps drifting past the old pier?"
    off = {"vllm_xargs": {"kvplug_eviction": "off"}}
    text = adakv_server.metrics()
    requests_before = metric(text, "kvplug_eviction_requests_total")
    returned_before = metric(text, "kvplug_eviction_blocks_returned_total")
    hits_before = metric(text, "vllm:prefix_cache_hits_total")
    reply = adakv_server.chat(question, max_tokens=8, **off)
    assert answer(reply).strip() and reply["usage"]["prompt_tokens"] > 3 * BLOCK
    text = adakv_server.metrics()
    # not evicted: no block returned, no eviction counted
    assert metric(text, "kvplug_eviction_requests_total") == requests_before
    assert metric(text, "kvplug_eviction_blocks_returned_total") == returned_before
    # its blocks were hashed like any request's: the same prompt again hits the cache
    again = adakv_server.chat(question, max_tokens=8, **off)
    assert answer(again) == answer(reply)
    text = adakv_server.metrics()
    assert metric(text, "vllm:prefix_cache_hits_total") > hits_before
    assert metric(text, "kvplug_eviction_requests_total") == requests_before
    # the same prompt with "on" (the default) is evicted
    adakv_server.chat(question, max_tokens=8, vllm_xargs={"kvplug_eviction": "on"})
    text = adakv_server.metrics()
    assert metric(text, "kvplug_eviction_requests_total") == requests_before + 1
    assert metric(text, "kvplug_eviction_blocks_returned_total") > returned_before
    # a bad value or a misspelled field: 400 naming the field, the server keeps serving
    for xargs, message in (({"kvplug_eviction": "no"}, "vllm_xargs.kvplug_eviction: must be"),
                           ({"kvplug_evict": "off"}, "vllm_xargs.kvplug_evict: unknown field")):
        body = {"model": "smollm2", "max_tokens": 4, "vllm_xargs": xargs,
                "messages": [{"role": "user", "content": "Hello"}]}
        response = requests.post(adakv_server.url + "/v1/chat/completions", json=body,
                                 timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert message in error["message"], response.text
        assert error["param"] == "vllm_xargs." + next(iter(xargs)), response.text
    assert answer(adakv_server.chat("Hello", max_tokens=4)).strip()
