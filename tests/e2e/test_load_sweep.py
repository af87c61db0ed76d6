"""bench/load.py end to end on the CPU: a server per profile, a shifting trace, per phase."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.server import cpu_env

pytestmark = pytest.mark.e2e

LOAD_PY = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def test_load_sweep_starts_a_server_per_profile_and_reports_every_phase(smollm2_path,
                                                                       tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(LOAD_PY), "sweep", "--model-path", str(smollm2_path),
         "--model", "smollm2", "--tokenizer", str(smollm2_path), "--profiles", "none",
         "--server-args", "--dtype float32 --enforce-eager --max-model-len 2048",
         "--phases", "quiet:3:1:48:4", "chats:2:3:16:4", "--slo-ttft-ms", "60000",
         "--slo-tpot-ms", "60000", "--out", str(out), "--timeout-s", "300",
         "--ready-timeout-s", "600"],
        capture_output=True, text=True, timeout=1000, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["label"] == "none"
    phases = {p["phase"]: p for p in result["phases"]}
    assert set(phases) == {"quiet", "chats", "all"}
    assert phases["all"]["requests"] == phases["quiet"]["requests"] + phases["chats"]["requests"]
    assert phases["all"]["requests"] > 0 and phases["all"]["failed"] == 0
    # generous SLOs: every request meets them; its latencies are real measurements
    assert phases["all"]["slo_attainment"] == 1.0
    assert 0 < phases["all"]["mean_ttft_ms"] < 60000 and phases["all"]["mean_tpot_ms"] > 0
    # the server ran with the plugin and the profile (its log is kept beside the result)
    log = (tmp_path / "server-none.log").read_text()
    assert "vllm-kvplug" in log, log[-2000:]
    compare = subprocess.run([sys.executable, str(LOAD_PY), "compare", str(out)],
                             capture_output=True, text=True, timeout=60)
    assert compare.returncode == 0 and "| none | chats |" in compare.stdout, compare.stdout
