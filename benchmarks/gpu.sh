#!/usr/bin/env bash
# Full-size SVD-XT on one NVIDIA H100 (random weights, bf16, 576x1024, 25 frames): seconds per
# UNet step for VCUT off/exact/full, eager and torch.compile; VAE decode; peak GPU memory; MFU.
# Finishes within 8 minutes: the Python part stops starting new work after --budget-s (default
# 400 s) and is killed at GPU_BENCH_TIMEOUT_S (default 450 s); results are saved after each stage.
#
#   bash benchmarks/gpu.sh                       # on the GPU machine, from a checkout
#   bash benchmarks/gpu.sh --device cpu --tiny   # the same code path on a CPU, tiny model (seconds)
#   bash benchmarks/gpu.sh --fetch-wheels        # where PyPI is reachable: fetch the wheels it carries
#
# The GPU machine has torch but no diffusers and no network. When `python3` there cannot import
# diffusers 0.42, this script installs the wheels in benchmarks/wheels/ (fetched beforehand with
# --fetch-wheels; they are git-ignored, so carry that folder) into a temporary folder. Extra
# arguments go to `python -m benchmarks.gpu_bench` (see --help). The JSON lands in
# benchmarks/results/ and, when $OUT is set, is copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels
# Pure-Python wheels that the GPU image lacks (it has torch, transformers, huggingface-hub,
# safetensors, numpy, pillow, regex, requests, filelock).
CARRIED=("diffusers==0.42.1")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${CARRIED[@]}"
    ls -l "$WHEELS"
    exit 0
fi

if ! "$PY" -c 'import sys, diffusers; sys.exit(0 if diffusers.__version__.startswith("0.42") else 1)' \
        >/dev/null 2>&1; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu.sh: $PY cannot import diffusers 0.42 and $WHEELS/ holds no wheels:" \
             "run 'bash benchmarks/gpu.sh --fetch-wheels' where PyPI is reachable, and carry $WHEELS" >&2
        exit 2
    fi
    SITE=$(mktemp -d /tmp/vcut-bench-site.XXXXXX)
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu.sh: installed $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')into $SITE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
exec timeout --signal=INT --kill-after=10 "${GPU_BENCH_TIMEOUT_S:-450}" \
    "$PY" -m benchmarks.gpu_bench --copy-to "${OUT:-}" "$@"
