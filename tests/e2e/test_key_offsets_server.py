"""End to end on the CPU: calibrate static K offsets with the CLI on the real model, then
serve INT4 pages written with them (profile option quantization.key_offsets)."""

import subprocess
import sys

import pytest
import torch

from tests.e2e.server import Server, cpu_env
from tests.e2e.test_quantized_kv_server import check_long_prompt_answer
from vllm_kvplug.quant.key_offsets import load_key_offsets

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def offsets_path(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("koff") / "smollm2-key-offsets.safetensors"
    # the built-in text, 2 windows of 128 tokens: a few seconds
    proc = subprocess.run([sys.executable, "-m", "vllm_kvplug.calibrate", str(smollm2_path),
                           "--out", str(out), "--window-tokens", "128", "--max-tokens", "256"],
                          env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "30 layers x 3 KV heads x 64" in proc.stdout
    return out


@pytest.fixture(scope="module")
def koff_server(smollm2_path, offsets_path, tmp_path_factory):
    profile = offsets_path.parent / "int4-koff.yaml"
    profile.write_text("name: int4-koff\nquantization:\n  method: int4\n  group_size: 64\n"
                       "  hadamard_block: 64\n  key_offsets: smollm2-key-offsets.safetensors\n")
    log = tmp_path_factory.mktemp("srv") / "int4-koff.log"
    server = Server(smollm2_path, ["--kv-compression", str(profile),
                                   "--max-num-batched-tokens", "256",
                                   "--enable-prefix-caching"], log)
    yield server
    server.stop()


def test_calibration_cli_writes_offsets_for_the_model(offsets_path, smollm2_path):
    offsets = load_key_offsets(offsets_path)
    assert offsets.offsets.shape == (30, 3, 64)  # SmolLM2-135M: layers, KV heads, head size
    meta = offsets.metadata
    assert (meta["tokens"], meta["windows"], meta["window_tokens"]) == ("256", "2", "128")
    assert meta["model"] == str(smollm2_path) and meta["text"] == "builtin"
    norms = offsets.offsets.norm(dim=-1)
    # post-RoPE keys of this model have a large common component (mean norm ~13)
    assert torch.isfinite(offsets.offsets).all() and norms.mean() > 1


def test_serves_int4_pages_written_with_key_offsets(koff_server, offsets_path):
    log = koff_server.log_path.read_text()
    assert f"K offsets {offsets_path} subtracted before quantizing K" in log
    # the worker bound every layer's offset (the write refuses to run unbound)
    assert f"K offsets of 30 layers (KV heads 0..2) on cpu from {offsets_path}" in log
    check_long_prompt_answer(koff_server)
