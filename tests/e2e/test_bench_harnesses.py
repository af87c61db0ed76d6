"""bench/quality.py and bench/throughput.py run end to end on the CPU (tiny settings).

Numbers are not checked against thresholds (timings never are); the tests check that the
harnesses produce complete, self-consistent reports from a real engine.
"""

import json
import math
from pathlib import Path

import pytest

from tests.e2e.server import run_script

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str]):
    return run_script(args, timeout=900)


def test_quality_harness(smollm2_path, tmp_path):
    corpus = tmp_path / "corpus.txt"  # real English: this project's own documentation
    corpus.write_text("\n\n".join(p.read_text() for p in sorted(ROOT.glob("docs/*.md"))
                                  + [ROOT / "README.md"]))
    run(["bench/quality.py", "--model", str(smollm2_path), "--dtype", "float32",
         "--corpus-file", str(corpus), "--configs", "profile:none", "profile:int4-hadamard",
         "--lengths", "256", "--depths", "0.5", "--trials", "2",
         "--ppl-windows", "2", "--ppl-window-tokens", "256",
         "--out-dir", str(tmp_path), "--tag", "q"])
    report = json.loads((tmp_path / "q.json").read_text())
    result = report["results"]["profile:none"]
    assert result["ok"], result
    ppl = result["perplexity"]
    assert ppl["tokens"] == 2 * 255 and math.isfinite(ppl["ppl"]) and ppl["ppl"] > 1
    trials = result["passkey"]["trials"]
    assert len(trials) == 2 and all(t["length"] == 256 for t in trials)
    assert result["passkey"]["accuracy"] == sum(t["correct"] for t in trials) / 2
    assert "| profile:none |" in (tmp_path / "q.md").read_text()
    # INT4 pages served through vLLM: perplexity close to the unquantized cache (the
    # format costs a few percent on this model; a broken write or read path costs x10)
    int4 = report["results"]["profile:int4-hadamard"]
    assert int4["ok"], int4
    assert int4["perplexity"]["tokens"] == ppl["tokens"]
    assert 0.9 < int4["perplexity"]["ppl"] / ppl["ppl"] < 1.25


def test_throughput_harness(smollm2_path, tmp_path):
    run(["bench/throughput.py", "--model", str(smollm2_path), "--dtype", "float32",
         "--enforce-eager", "--workloads", "3x32+4", "--configs", "profile:none",
         "--latency-stats", "--out-dir", str(tmp_path), "--tag", "t"])
    report = json.loads((tmp_path / "t.json").read_text())
    result = report["results"]["profile:none"]
    assert result["ok"], result
    (workload,) = result["workloads"]
    assert workload["workload"] == "3x32+4" and workload["output_tokens"] == 12
    assert workload["output_tok_per_s"] > 0 and workload["mean_tpot_ms"] > 0
    assert result["num_gpu_blocks"] > 0
    assert "| profile:none | 3x32+4 |" in (tmp_path / "t.md").read_text()
