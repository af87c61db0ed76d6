"""bench/tp_consistency.py end to end on the CPU, at TP=1 (one engine, a tiny seeded model).

The GPU run compares TP=1 with TP=2 through Ray; here the harness is checked on one real
engine: the seeded model loads, the quantized profile serves it, every rank's report
(collective_rpc into the worker) says the plugin's backend, spec and uint8 pages are in
use with bytes written, and the report files are complete.
"""

import json
import sys
from pathlib import Path

import pytest

from tests.e2e.server import run_script

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tiny_model import TinyLlama, build  # noqa: E402

pytestmark = pytest.mark.e2e


def run(args: list[str]):
    return run_script(args, timeout=600)


def test_tp_consistency_harness_tp1(tmp_path):
    model = build(tmp_path / "tiny", TinyLlama(layers=2, hidden=256, heads=2, kv_heads=2,
                                                intermediate=512, vocab=2048))
    run(["bench/tp_consistency.py", "--model", str(model), "--dtype", "float32",
         "--enforce-eager", "--configs", "profile:int4-hadamard", "--tp-sizes", "1",
         "--prompts", "2", "--prompt-len", "64", "--output-len", "8",
         "--out-dir", str(tmp_path), "--tag", "tp"])
    report = json.loads((tmp_path / "tp.json").read_text())
    assert report["failed"] == [] and report["uncompressed"] == []
    assert report["model_recipe"]["spec"]["kv_heads"] == 2
    result = report["results"]["profile:int4-hadamard"]["1"]
    assert result["ok"], result
    assert result["num_gpu_blocks"] > 0 and result["total_kv_heads"] == 2
    assert [len(s["token_ids"]) for s in result["sequences"]] == [8, 8]
    assert all(lp is not None and lp <= 0 for s in result["sequences"]
               for lp in s["logprobs"])
    (rank,) = result["ranks"]
    assert rank["tp_rank"] == 0 and rank["tp_size"] == 1 and rank["num_layers"] == 2
    assert rank["backends"] == {"CUSTOM": 2} and rank["specs"] == {"QuantizedKVSpec": 2}
    layer = rank["layers"][0]
    assert layer["cache_dtype"] == "uint8"
    assert layer["spec_page_bytes"] == layer["expected_page_bytes"]
    assert layer["cache_nonzero_fraction"] > 0
    summary = report["summary"]["profile:int4-hadamard"]["tp"]["1"]
    assert summary["problems"] == [] and summary["ranks"][0]["compressed"]
    assert "yes: TP=1 1/1" in (tmp_path / "tp.md").read_text()
