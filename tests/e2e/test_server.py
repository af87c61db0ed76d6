"""End to end on the CPU: vLLM's OpenAI server with the plugin, a real model, /metrics."""

import re
import subprocess

import pytest

from tests.e2e.server import Server, answer, cpu_env, free_port, server_command

pytestmark = pytest.mark.e2e

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server_with_profile(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "with-profile.log"
    server = Server(smollm2_path, ["--kv-compression", "none"], log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_without_flag(smollm2_path, tmp_path_factory, server_with_profile):
    # Depends on the first server only to run after it: one engine at a time on 2 cores.
    log = tmp_path_factory.mktemp("srv") / "without-flag.log"
    server = Server(smollm2_path, [], log)
    yield server
    server.stop()


def test_chat_completion_is_sensible(server_with_profile):
    text = answer(server_with_profile.chat(QUESTION))
    assert "Paris" in text, text


def test_metrics_carry_plugin_and_vllm_series(server_with_profile):
    text = server_with_profile.metrics()
    info = re.search(r"^kvplug_profile_info\{(.*)\} 1\.0$", text, re.M)
    assert info, text[-2000:]
    assert 'profile="none"' in info.group(1) and 'source="builtin:none"' in info.group(1)
    # SmolLM2-135M: 30 layers x 3 KV heads x 64 dims x (K and V) x 4 bytes (float32)
    assert 'kvplug_kv_cache_bytes_per_token{profile="none"} 46080.0' in text
    assert 'kvplug_kv_cache_compression_ratio{profile="none"} 1.0' in text
    assert "vllm:kv_cache_usage_perc" in text


def test_log_names_active_profile(server_with_profile):
    assert "vllm-kvplug: profile 'none' (builtin:none) active" in \
        server_with_profile.log_path.read_text()


def test_without_flag_vllm_is_untouched(server_with_profile, server_without_flag):
    assert "kvplug_" not in server_without_flag.metrics()
    assert "vllm-kvplug: profile" not in server_without_flag.log_path.read_text()
    # The passthrough profile must not change what the model says.
    assert answer(server_without_flag.chat(QUESTION, max_tokens=24)) == \
        answer(server_with_profile.chat(QUESTION, max_tokens=24))


def test_bad_profile_stops_startup_with_message(smollm2_path, tmp_path):
    bad = tmp_path / "bad-profile.yaml"
    bad.write_text("name: bad\nquantization: {method: int3}\neviction: {budget: 3}\n")
    proc = subprocess.run(server_command(smollm2_path, free_port(), ["--kv-compression", str(bad)]),
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"invalid kv-compression profile {bad}" in proc.stderr
    assert "quantization.method" in proc.stderr and "'none', 'int4', 'int2'" in proc.stderr
    assert "eviction.budget: unknown field" in proc.stderr


def test_metrics_with_several_api_servers(smollm2_path, tmp_path):
    # vLLM switches Prometheus to multiprocess mode; the plugin's gauges must still show.
    server = Server(smollm2_path, ["--kv-compression", "none", "--api-server-count", "2"],
                    tmp_path / "multi.log")
    try:
        for _ in range(4):  # connections may land on either API-server process
            text = server.metrics()
            assert re.search(r'^kvplug_profile_info\{.*profile="none".*\} 1\.0$', text, re.M)
            assert 'kvplug_kv_cache_bytes_per_token{profile="none"} 46080.0' in text
    finally:
        server.stop()


def test_dashboard_queries_name_live_metrics(server_with_profile):
    from tests.deploy_files import dashboard_metric_names, exposed_names

    server_with_profile.chat(QUESTION, max_tokens=4)  # histograms get samples
    live = exposed_names(server_with_profile.metrics())
    missing = sorted(dashboard_metric_names() - live)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
