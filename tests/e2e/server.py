"""Start and stop vLLM's OpenAI server on the CPU for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from server_process import ServerProcess, free_port  # noqa: E402,F401
from server_process import server_command as bench_server_command  # noqa: E402

READY_TIMEOUT_S = 600


def answer(reply: dict) -> str:
    """The assistant text of a chat-completion reply (fails with the reply if absent)."""
    assert "choices" in reply, reply
    return reply["choices"][0]["message"]["content"]


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cores = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    return env


def run_script(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python ARGS` from the repository root with the CPU environment; fail the test
    with the script's output tails unless it exits 0."""
    proc = subprocess.run([sys.executable, *args], cwd=Path(__file__).resolve().parents[2],
                          env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def model_args(model: Path, extra: list[str]) -> list[str]:
    # float32: this Q4_1-derived model answers nonsense in bf16 on the CPU backend.
    return ["--model", str(model), "--served-model-name", "smollm2", "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "2048", *extra]


def server_command(model: Path, port: int, extra: list[str]) -> list[str]:
    return bench_server_command(port, model_args(model, extra))


class Server(ServerProcess):
    """The small real model served on the CPU, ready when constructed."""

    def __init__(self, model: Path, extra: list[str], log_path: Path):
        super().__init__(model_args(model, extra), log_path, env=cpu_env())
        self.wait_ready(READY_TIMEOUT_S)

    def chat(self, content: str, max_tokens: int = 30, **extra) -> dict:
        body = {"model": "smollm2", "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": content}], **extra}
        return requests.post(self.url + "/v1/chat/completions", json=body, timeout=120).json()

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=10).text
