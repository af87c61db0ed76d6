"""End to end on the CPU: the OpenAI server serving SmolLM2 from an INT4 paged KV cache.

On the CPU the plugin's backend writes and reads the quantized pages with the PyTorch
reference, so these tests exercise the real vLLM allocator, scheduler, chunked prefill and
prefix caching on the quantized format.
"""

import re

import pytest

from tests.e2e.server import Server, answer

pytestmark = pytest.mark.e2e

# SmolLM2-135M: 30 layers x 3 KV heads; int4-hadamard stores a K or V vector of 64 elements
# as 32 bytes of codes + 1 group x 4 bytes = 36, so 30 x 3 x 72 bytes a token.
INT4_BYTES_PER_TOKEN = 30 * 3 * 72
FLOAT32_BYTES_PER_TOKEN = 30 * 3 * 2 * 64 * 4
KV_SPACE_BYTES = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (tests/e2e/server.py)
BLOCK = 128  # vLLM's CPU default block size


@pytest.fixture(scope="module")
def int4_server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "int4.log"
    # small batches force chunked prefill of the long prompt below
    server = Server(smollm2_path, ["--kv-compression", "int4-hadamard",
                                   "--max-num-batched-tokens", "256",
                                   "--enable-prefix-caching"], log)
    yield server
    server.stop()


def test_serves_from_quantized_pages(int4_server):
    log = int4_server.log_path.read_text()
    assert "vllm-kvplug: profile 'int4-hadamard' (builtin:int4-hadamard) active" in log
    text = int4_server.metrics()
    assert (f'kvplug_kv_cache_bytes_per_token{{profile="int4-hadamard"}} '
            f'{float(INT4_BYTES_PER_TOKEN)}') in text
    ratio = re.search(r'kvplug_kv_cache_compression_ratio\{profile="int4-hadamard"\} (\S+)',
                      text)
    assert ratio and float(ratio.group(1)) == pytest.approx(
        FLOAT32_BYTES_PER_TOKEN / INT4_BYTES_PER_TOKEN)


def test_allocator_gives_the_capacity_of_the_format(int4_server):
    info = re.search(r"^vllm:cache_config_info\{(.*)\}", int4_server.metrics(), re.M)
    assert info, "vllm:cache_config_info missing"
    blocks = int(re.search(r'num_gpu_blocks="(\d+)"', info.group(1)).group(1))
    assert blocks == KV_SPACE_BYTES // (BLOCK * INT4_BYTES_PER_TOKEN)
    # 7.1x the blocks float32 pages would give in the same memory
    assert blocks >= 7 * (KV_SPACE_BYTES // (BLOCK * FLOAT32_BYTES_PER_TOKEN))


def test_chat_answers_and_prefix_cache_hits_answer_the_same(int4_server):
    check_long_prompt_answer(int4_server)


def check_long_prompt_answer(server) -> str:
    """A long prompt (chunked prefill) answers sensibly, and again the same from the
    prefix cache. Used by other quantized-KV server tests too."""
    story = " ".join(f"Line {i}: the river keeps flowing past the old mill." for i in range(60))
    question = story + "\nWhat keeps flowing past the old mill?"
    first = answer(server.chat(question, max_tokens=16))
    assert first.strip(), "empty answer"
    before = _prefix_hits(server.metrics())
    second = answer(server.chat(question, max_tokens=16))
    assert _prefix_hits(server.metrics()) > before  # served from cached INT4 pages
    assert second == first
    assert "river" in first.lower() or "water" in first.lower(), first
    return first


def _prefix_hits(metrics: str) -> float:
    found = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", metrics, re.M)
    assert found, "vllm:prefix_cache_hits_total missing"
    return float(found.group(1))
