"""Pieces of the benchmark harnesses that need no engine."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from engine_configs import KVConfig, markdown_table  # noqa: E402
from isolation import root_cause  # noqa: E402
from throughput import Workload, kernel_time_summary  # noqa: E402


@pytest.mark.parametrize("text, expected", [
    ("bf16@FLASH_ATTN", ("auto", None, "FLASH_ATTN")),
    ("fp8", ("fp8", None, None)),
    ("int4_per_token_head@TRITON_ATTN", ("int4_per_token_head", None, "TRITON_ATTN")),
    ("profile:none", ("auto", "none", None)),
    ("fp8+profile:/x/p.yaml@FLASH_ATTN", ("fp8", "/x/p.yaml", "FLASH_ATTN")),
])
def test_config_syntax(text, expected):
    c = KVConfig.parse(text)
    assert (c.kv_cache_dtype, c.profile, c.attention_backend) == expected
    assert c.label == text


def test_config_llm_kwargs():
    kwargs = KVConfig.parse("fp8+profile:none@FLASH_ATTN").llm_kwargs()
    assert kwargs == {"kv_cache_dtype": "fp8",
                      "additional_config": {"kv_compression": "none"},
                      "attention_config": {"backend": "FLASH_ATTN"}}
    assert KVConfig.parse("bf16").llm_kwargs() == {"kv_cache_dtype": "auto"}
    with pytest.raises(ValueError, match="empty profile"):
        KVConfig.parse("profile:")


def test_workload_syntax():
    assert Workload.parse("512x2048+256") == Workload(512, 2048, 256)
    assert str(Workload(8, 8192, 512)) == "8x8192+512"
    for bad in ("512x2048", "ax1+1", "0x1+1"):
        with pytest.raises(Exception):
            Workload.parse(bad)


def test_kernel_time_summary_groups_gpu_kernels(tmp_path):
    """`throughput.py --profile-dir`: kernel events summed per category, CPU ops ignored."""
    import gzip
    import json
    events = [{"cat": "kernel", "name": "_attention_kernel", "dur": 3000},
              {"cat": "kernel", "name": "nvjet_tst_128x256_64x4", "dur": 5000},
              {"cat": "kernel", "name": "_write_kv_kernel", "dur": 1000},
              {"cat": "kernel", "name": "triton_poi_fused_silu_0", "dur": 500},
              {"cat": "kernel", "name": "_paged_attention_kernel", "dur": 1000},
              {"cat": "cpu_op", "name": "aten::mm", "dur": 99999}]
    trace = tmp_path / "w0.pt.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = kernel_time_summary(trace)
    assert summary["kernel_ms_total"] == 10.5
    assert summary["kernel_ms_by_category"] == {"attention": 4.0, "kv write": 1.0,
                                                "gemm": 5.0, "other": 0.5}
    assert summary["top_kernels_ms"][0] == ["nvjet_tst_128x256_64x4", 5.0]


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_root_cause_finds_first_exception(tmp_path):
    log = tmp_path / "engine.log"
    log.write_text(
        "INFO 11-23 10:00:00 [core.py:1] starting\n"
        "(EngineCore pid=12) ERROR 11-23 10:00:01 [core.py:2] ValueError: bad head size 96\n"
        "RuntimeError: Engine core initialization failed.\n")
    assert root_cause(log) == "ValueError: bad head size 96"
    log.write_text("corrupted double-linked list\n"
                   "ERROR 11-23 10:00:02 [x.py:3] Engine core proc EngineCore died unexpectedly\n")
    cause = root_cause(log)
    assert cause.startswith("Engine core proc EngineCore died unexpectedly")
    assert "corrupted double-linked list" in cause
    assert root_cause(tmp_path / "missing.log") is None


def test_ablation_recipe_syntax():
    from kv_quant_ablation import Variant

    from vllm_kvplug.quant import QuantRecipe

    v = Variant.parse("int2/g32/h64/s4/only-v")
    assert v.recipe == QuantRecipe(2, 32, 64)
    assert (v.sink_tokens, v.quantize_k, v.quantize_v) == (4, False, True)
    assert Variant.parse("int4/g64/none").recipe == QuantRecipe(4, 64, None)
    assert Variant.parse("baseline").recipe is None
    assert Variant.parse("int4/g64/h64/kmean64").key_mean_tokens == 64
    assert Variant.parse("int4/g32/h64/kcal").key_calibrated
    with pytest.raises(Exception, match="is not int4"):
        Variant.parse("int3/g32/h32")


def test_attention_is_invariant_to_a_shared_key_offset():
    """The premise of `kmean`: removing one offset from all keys leaves attention as is."""
    import torch
    from kv_quant_ablation import _ACTIVE, Variant, fake_quant_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q, k, v = (torch.randn(1, 2, 12, 64) for _ in range(3))
    k = k + 5.0  # a large shared offset, as in models with k_proj biases
    try:
        _ACTIVE[0] = Variant.parse("int4/g64/h64/only-v/kmean4")
        centred = fake_quant_attention(module, q, k, v, None)[0]
        _ACTIVE[0] = Variant.parse("int4/g64/h64/only-v")
        plain = fake_quant_attention(module, q, k, v, None)[0]
    finally:
        _ACTIVE[0] = None
    torch.testing.assert_close(centred, plain, atol=1e-5, rtol=1e-5)


def test_fake_quant_attention_changes_only_what_it_should():
    import torch
    from kv_quant_ablation import _ACTIVE, Variant, fake_quant_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = (torch.randn(1, 2, 8, 64) for _ in range(3))
    try:
        _ACTIVE[0] = Variant("baseline", None)
        base, _ = fake_quant_attention(module, q, k, v, None)
        _ACTIVE[0] = Variant.parse("int2/g32/h64/only-v")
        quant, _ = fake_quant_attention(module, q, k, v, None)
        _ACTIVE[0] = Variant.parse("int4/g64/h64/s8")  # every token is a sink: exact
        sinks, _ = fake_quant_attention(module, q, k, v, None)
    finally:
        _ACTIVE[0] = None
    assert not torch.allclose(base, quant)
    torch.testing.assert_close(sinks, base)


def test_channelwise_key_quantization():
    import torch
    from kv_quant_ablation import Variant, channelwise_quantize_dequantize, mean_bytes_per_vector

    from vllm_kvplug.quant import QuantRecipe

    torch.manual_seed(0)
    recipe = QuantRecipe(4, 64, None)
    x = torch.randn(2, 40, 64)
    x[..., 5] *= 30  # outlier channel: per-channel scales absorb it
    out = channelwise_quantize_dequantize(x, recipe, tokens=16)
    for start in range(0, 40, 16):  # half a step per channel per token group (+ fp16)
        g = x[:, start:start + 16]
        step = (g.amax(1) - g.amin(1)) / recipe.levels
        err = (out[:, start:start + 16] - g).abs().amax(1)
        assert torch.all(err <= step / 2 + 1e-3 * g.abs().amax(1) + 1e-5)
    const = torch.ones(1, 16, 64) * torch.arange(64.0)  # constant over tokens: exact
    torch.testing.assert_close(channelwise_quantize_dequantize(const, recipe, 16), const)
    assert mean_bytes_per_vector(Variant.parse("int4/g64/h64/kc16"), 64) == (48 + 36) / 2


def test_vllm_int4_per_token_head_emulation():
    """The emulation of vLLM's format: a vector already on its grid (integer zero point,
    scale (max-min)/15, after the randomized Hadamard) comes back unchanged; a Gaussian
    one comes back with the error of 16 levels; 36 bytes a head-64 vector."""
    import torch
    from kv_quant_ablation import Variant, mean_bytes_per_vector, vllm_int4_per_token_head

    from vllm_kvplug.quant.reference import hadamard_matrix

    d = 64
    gen = torch.Generator().manual_seed(0x9E3779B9)  # the emulation's sign vector
    signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    h = hadamard_matrix(d)
    codes = torch.randint(0, 16, (5, d), generator=torch.Generator().manual_seed(1)).float()
    codes[:, 0], codes[:, 1] = 0, 15  # min and max on the grid's ends
    zero, scale = 3.0, 0.25
    on_grid = (((codes - zero) * scale) @ h) * signs  # rotated back to the model's basis
    torch.testing.assert_close(vllm_int4_per_token_head(on_grid), on_grid, atol=1e-5, rtol=0)

    x = torch.randn(200, d, generator=torch.Generator().manual_seed(2))
    err = (vllm_int4_per_token_head(x) - x).norm() / x.norm()
    assert 0.02 < err < 0.15, err
    variant = Variant.parse("vllm-int4pth")
    assert variant.vllm_int4 and mean_bytes_per_vector(variant, d) == 36


def test_load_trace_phases_and_summary():
    """The shifting trace: phases back to back with Poisson arrivals inside their window,
    no shared prompt prefixes; the summary counts SLO misses and failures per phase."""
    import pytest
    from load import Phase, make_trace, request_rows, summarize

    phases = [Phase.parse("quiet:10:1:64:8"), Phase.parse("burst:5:20:512:8")]
    trace = make_trace(phases, seed=1)
    assert trace == make_trace(phases, seed=1) and trace != make_trace(phases, seed=2)
    quiet = [e for e in trace if e["phase"] == "quiet"]
    burst = [e for e in trace if e["phase"] == "burst"]
    assert 3 <= len(quiet) <= 20 and 60 <= len(burst) <= 140   # ~10 and ~100 expected
    assert all(0 <= e["timestamp"] < 10 for e in quiet)
    assert all(10 <= e["timestamp"] < 15 for e in burst)
    assert [e["timestamp"] for e in trace] == sorted(e["timestamp"] for e in trace)
    ids = [h for e in trace for h in e["hash_ids"]]
    assert len(ids) == len(set(ids)) and len(burst[0]["hash_ids"]) == 32
    assert len(make_trace(phases, seed=1, time_scale=0.5)) < len(trace)
    with pytest.raises(Exception):
        Phase.parse("quiet:10:0:64:8")

    small = [{"phase": "a"}, {"phase": "a"}, {"phase": "b"}, {"phase": "b"}]
    detailed = {"ttfts": [0.1, 0.5, 0.2, 0.0], "itls": [[0.01, 0.03], [0.01], [0.2], []],
                "errors": ["", "", "", "boom"], "output_lens": [3, 2, 2, 0]}
    rows = request_rows(small, detailed)
    assert [r["ok"] for r in rows] == [True, True, True, False]
    assert rows[0]["tpot_ms"] == pytest.approx(20.0)
    s = {x["phase"]: x for x in summarize(rows, [Phase("a", 2, 1, 8, 8), Phase("b", 4, 1, 8, 8)],
                                          slo_ttft_ms=300, slo_tpot_ms=50)}
    assert s["a"]["slo_attainment"] == 0.5 and s["a"]["goodput_req_per_s"] == 0.5  # TTFT miss
    assert s["b"]["slo_attainment"] == 0.0 and s["b"]["failed"] == 1  # TPOT miss + failure
    assert s["all"]["requests"] == 4 and s["all"]["goodput_req_per_s"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        request_rows(small[:3], detailed)
