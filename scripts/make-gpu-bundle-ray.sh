#!/usr/bin/env bash
# The offline GPU-host bundle (../shared/gpu-host/make-bundle.sh: vLLM 0.26.0 and the
# dependencies the host lacks) plus Ray, for `--distributed-executor-backend ray`
# (bench/tp_consistency.py), in 3 parts of at most 60 MB instead of 4.
#
# vLLM 0.26 lists no Ray requirement of its own (its Ray executor checks for >= 2.43; the
# default RayExecutorV2 uses Ray core only, no compiled graphs, so no cupy). Ray core needs
# click, msgpack and protobuf besides what vLLM already brings; they are added pinned.
# The Ray wheel is trimmed of what a Python-only, dashboard-less local cluster never
# loads: the Java worker jars (ray/jars, 30 MB compressed), the dashboard's web client
# and RLlib. Without the trim the same bundle is 214 MB in 4 parts (set RAY_TRIM=0).
#
# usage: scripts/make-gpu-bundle-ray.sh [OUT_DIR]     (default .gpu-bundle-ray)
set -euo pipefail
OUT=${1:-.gpu-bundle-ray}
RAY_VERSION=${RAY_VERSION:-2.60.0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MAKE_BUNDLE=${MAKE_BUNDLE:-$ROOT/../shared/gpu-host/make-bundle.sh}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    -d "$TMP" "ray==$RAY_VERSION"
whl=$(ls "$TMP"/ray-*.whl)
if [ "${RAY_TRIM:-1}" != 0 ]; then
  zip -q -d "$whl" 'ray/jars/*' 'ray/dashboard/client/build/*' 'ray/rllib/*' >/dev/null
fi
bash "$MAKE_BUNDLE" "$OUT" "$whl" click==8.5.1 msgpack==1.2.4 protobuf==7.36.2
