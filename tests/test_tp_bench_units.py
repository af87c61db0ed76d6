"""The tensor-parallel consistency check without an engine: metrics, rank verdicts, the
report table, and the seeded tiny model (bench/tiny_model.py)."""

import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from consistency_metrics import chosen_logprobs, compare_runs, first_divergence  # noqa: E402
from engine_configs import KVConfig  # noqa: E402
from tiny_model import TinyLlama, build, recipe_of, weights_digest  # noqa: E402
from tp_consistency import build_table, summarize  # noqa: E402

from vllm_kvplug.rank_report import compression_problems  # noqa: E402

SMALL = dict(layers=2, hidden=256, heads=4, kv_heads=2, head_size=64, intermediate=512,
             vocab=1024)


def seq(tokens, logprobs=None, margins=None):
    n = len(tokens)
    return {"token_ids": list(tokens), "logprobs": logprobs or [-1.0] * n,
            "margins": margins or [1.0] * n}


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([], []) is None


def test_compare_identical_runs():
    a = [seq([1, 2, 3, 4]), seq([5, 6, 7, 8])]
    c = compare_runs(a, a)
    assert c["token_match_fraction"] == 1.0 and c["common_prefix_fraction"] == 1.0
    assert c["identical_sequences"] == 2 and c["first_divergence"] == [None, None]
    assert c["min_first_divergence"] is None and c["margin_at_divergence"] == []
    assert c["mean_abs_logprob_diff"] == 0.0 and c["logprob_positions"] == 8


def test_compare_divergent_runs():
    a = [seq([1, 2, 3, 4], [-1.0, -2.0, -3.0, -4.0], [0.5, 0.4, 0.01, 2.0]),
         seq([5, 6, 7, 8], [-1.0] * 4)]
    b = [seq([1, 2, 9, 4], [-1.5, -2.0, -0.1, -4.0]),  # diverges at 2, rejoins at 3
         seq([5, 6, 7, 8], [-1.25] * 4)]
    c = compare_runs(a, b)
    assert c["tokens"] == 8
    assert c["token_match_fraction"] == 7 / 8
    assert c["common_prefix_fraction"] == (2 + 4) / 8
    assert c["identical_sequences"] == 1
    assert c["first_divergence"] == [2, None]
    assert c["min_first_divergence"] == 2 and c["median_first_divergence"] == 2
    assert c["margin_at_divergence"] == [0.01]
    # the common prefix only: positions 0-1 of the first prompt, 0-3 of the second
    assert c["logprob_positions"] == 6
    assert c["max_abs_logprob_diff"] == 0.5
    assert c["mean_abs_logprob_diff"] == pytest.approx((0.5 + 0 + 4 * 0.25) / 6)
    with pytest.raises(ValueError):
        compare_runs(a, b[:1])


def test_chosen_logprobs_from_vllm_dicts():
    Logprob = namedtuple("Logprob", "logprob rank decoded_token")
    steps = [{7: Logprob(-0.1, 1, None), 9: Logprob(-2.6, 2, None)},
             {3: Logprob(-3.0, 3, None), 4: Logprob(-0.5, 1, None), 5: Logprob(-0.7, 2, None)}]
    chosen, margins = chosen_logprobs([7, 3], steps)
    assert chosen == [-0.1, -3.0]
    assert margins == [pytest.approx(2.5), pytest.approx(0.2)]
    assert chosen_logprobs([1], None) == ([], [])


def layer(**over):
    entry = {"layer": "model.layers.0.self_attn.attn", "quantized_backend": True,
             "backend": "vllm_kvplug.vllm_glue.attention_backend.QuantizedKVBackend",
             "spec": "QuantizedKVSpec", "spec_page_bytes": 1000, "expected_page_bytes": 1000,
             "cache_dtype": "uint8", "cache_bytes": 10_000, "cache_blocks": 10,
             "cache_nonzero_fraction": 0.01, "num_kv_heads": 2}
    return {**entry, **over}


def rank(tp_rank=0, tp_size=2, **over):
    return {"tp_rank": tp_rank, "tp_size": tp_size, "pid": 1, "device": f"cuda:{tp_rank}",
            "backends": {"CUSTOM": 1}, "specs": {"QuantizedKVSpec": 1},
            "layers": [layer(**over)]}


def test_compression_problems():
    assert compression_problems(rank(), total_kv_heads=4) == []
    assert compression_problems(rank(tp_rank=1), total_kv_heads=4) == []
    (p,) = compression_problems(rank(quantized_backend=False, backend="FlashAttn"))
    assert "not the plugin's" in p
    assert any("KV heads" in p for p in compression_problems(rank(), total_kv_heads=8))
    assert any("nothing written" in p
               for p in compression_problems(rank(cache_nonzero_fraction=0.0)))
    assert any("uint8" in p for p in compression_problems(rank(cache_dtype="bfloat16")))
    assert any("page" in p for p in compression_problems(rank(spec_page_bytes=999)))
    assert any("FullAttentionSpec" in p
               for p in compression_problems(rank(spec="FullAttentionSpec")))
    assert compression_problems({"tp_rank": 0, "layers": []}) != []


def engine_result(tp, tokens, ranks, blocks=100):
    return {"ok": True, "tp": tp, "num_gpu_blocks": blocks, "startup_s": 1.0,
            "executor": "ray" if tp > 1 else "None", "total_kv_heads": 4,
            "sequences": [seq(t) for t in tokens], "ranks": ranks}


def test_summary_and_table_flag_a_rank_without_compression():
    control, int4 = KVConfig.parse("bf16@FLASH_ATTN"), KVConfig.parse("profile:int4-hadamard")
    plain = {**rank(), "layers": [layer(quantized_backend=False, backend="FA")]}
    results = {
        control.label: {1: engine_result(1, [[1, 2, 3]], [{**plain, "tp_size": 1}]),
                        2: engine_result(2, [[1, 2, 4]], [plain, {**plain, "tp_rank": 1}])},
        int4.label: {1: engine_result(1, [[1, 2, 3]], [rank(tp_size=1,
                                                            num_kv_heads=4)], 356),
                     2: engine_result(2, [[1, 2, 3]], [rank(0), rank(1, num_kv_heads=3)])},
    }
    must = {control.label: False, int4.label: True}
    summary = summarize([control, int4], [1, 2], results, must)
    assert summary[control.label]["tp"][2]["problems"] == []
    assert summary[control.label]["consistency"][2]["first_divergence"] == [2]
    assert summary[int4.label]["consistency"][2]["identical_sequences"] == 1
    problems = summary[int4.label]["tp"][2]["problems"]
    assert len(problems) == 1 and "rank 1" in problems[0] and "KV heads" in problems[0]
    assert [r["compressed"] for r in summary[int4.label]["tp"][2]["ranks"]] == [True, False]
    table = build_table([control, int4], [1, 2], summary)
    rows = table.splitlines()
    assert "| bf16@FLASH_ATTN | 100 | 100 | n/a" in rows[2]
    assert "| profile:int4-hadamard | 356 | 100 | NO: rank 1" in rows[3]
    assert "| 1.000 | 1.000 | 1/1 | - / - |" in rows[3]  # int4 TP=1 vs TP=2
    assert rows[3].rstrip(" |").endswith("0.667 | 0 / 0")  # the control's


def test_tiny_model_is_deterministic_and_splits_over_two_ranks():
    spec = TinyLlama(seed=3, **SMALL)
    w1, w2 = spec.weights(), spec.weights()
    assert weights_digest(w1) == weights_digest(w2)
    assert weights_digest(TinyLlama(seed=4, **SMALL).weights()) != weights_digest(w1)
    assert sum(t.numel() for t in w1.values()) == spec.num_parameters()
    assert w1["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 64, 256)
    assert all(t.dtype == torch.bfloat16 for t in w1.values())
    default = TinyLlama()
    assert default.head_size in (64, 128) and default.kv_heads % 2 == 0
    assert default.heads % default.kv_heads == 0
    assert default.num_parameters() * 2 < 120e6  # built on the host, not carried
    with pytest.raises(ValueError):
        TinyLlama(heads=6, kv_heads=4)


def test_tiny_model_loads_with_its_logit_scale(tmp_path):
    """transformers reads the folder; logits have about the chosen standard deviation and
    the plugin's quantized-KV checks accept the shape (head size, recipes)."""
    from transformers import AutoModelForCausalLM

    from vllm_kvplug.profiles import load_profile
    from vllm_kvplug.quant.recipe import KVRecipe

    spec = TinyLlama(seed=0, **SMALL)
    path = build(tmp_path / "tiny", spec)
    assert recipe_of(path)["weights_sha256"] == weights_digest(spec.weights())
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(100, spec.vocab - 100, (1, 64), generator=torch.Generator()
                        .manual_seed(0))
    with torch.inference_mode():
        logits = model(ids).logits[0, -16:]
    assert 0.5 * spec.logit_std < float(logits.std(dim=-1).mean()) < 2.0 * spec.logit_std
    for name in ("int4-hadamard", "int2-hadamard", "k8v4-hadamard"):
        quant = load_profile(name).profile.quantization
        KVRecipe.from_section(quant).check_head_size(spec.head_size)
        KVRecipe.from_section(quant).check_head_size(TinyLlama().head_size)
