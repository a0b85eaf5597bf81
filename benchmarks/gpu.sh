#!/usr/bin/env bash
# Whole SVD-XT videos on one GPU (random weights, fp16, 576x1024, 25 frames): seconds per video for
# stock diffusers and the Renderer with VCUT off/exact/full, full + torch.compile, full + compile +
# step cache, + FP8 (quantize=fp8), + the guidance interval (guidance_start/guidance_stop, where the
# Renderer has them); one whole 25-step video of the fastest; PSNR/SSIM of each against stock;
# batched rows at 320x512, 14 frames; peak memory; MFU. One stage per module: benchmarks/gpu/.
# Ends within 8 minutes: the Python part stops starting work it cannot finish by --budget-s
# (default 430 s) and is interrupted at GPU_BENCH_TIMEOUT_S (default 470 s); the JSON and a
# Markdown table are written, and copied to $OUT, after every stage. A compiled stage whose timed
# videos compile anything fails (recompiles are errors there).
#
#   bash benchmarks/gpu.sh                       # on the GPU machine, from a checkout
#   bash benchmarks/gpu.sh --device cpu --tiny   # the same code path on a CPU, tiny model
#   bash benchmarks/gpu.sh --fetch-wheels        # where PyPI is reachable: fetch the wheels it carries
#
# The GPU machine has torch 2.11, transformers, accelerate, safetensors and huggingface-hub but no
# diffusers, no torchao and no network. This script installs the wheels in benchmarks/wheels/
# (fetched beforehand with --fetch-wheels; git-ignored, so carry that folder) into a temporary
# folder when `python3` there lacks them, then checks that they import against its torch and
# prints what it found (torchao is optional: without it FP8 runs on torch._scaled_mm directly).
# Extra arguments go to `python -m benchmarks.gpu` (see --help). The files land in
# benchmarks/results/ and, when $OUT is set, in $OUT too.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels
MAX_WHEELS_MIB=60
# Wheels that the GPU image lacks. diffusers 0.42.1 (pure Python) needs importlib_metadata only
# before Python 3.8, and filelock, huggingface-hub>=1.32 (1.33 there), numpy, regex, requests,
# safetensors>=0.8 (0.8.0 there) and Pillow are in the image. torchao 0.18.0 (3.3 MiB, abi3 with
# CUDA kernels, built for torch >= 2.11; no required dependencies): the FP8 stage's library.
# The Renderer's import path needs nothing else (ffmpeg-python only when a video is encoded).
CARRIED=("diffusers==0.42.1" "torchao==0.18.0")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${CARRIED[@]}"
    ls -l "$WHEELS"
    size_kib=$(du -sk "$WHEELS" | cut -f1)
    echo "gpu.sh: $WHEELS holds $((size_kib / 1024)) MiB (limit $MAX_WHEELS_MIB MiB)"
    if (( size_kib > MAX_WHEELS_MIB * 1024 )); then
        echo "gpu.sh: $WHEELS is over $MAX_WHEELS_MIB MiB: remove stale wheels" >&2
        exit 1
    fi
    exit 0
fi

# Which carried packages are missing (or another version) here: those wheels are installed.
missing=()
for spec in "${CARRIED[@]}"; do
    name=${spec%%==*}
    version=${spec#*==}
    if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$name') != '$version')" \
            >/dev/null 2>&1; then
        missing+=("$name")
    fi
done
if (( ${#missing[@]} )); then
    wheels=()
    for name in "${missing[@]}"; do
        for whl in "$WHEELS/$name"-*.whl; do [[ -e "$whl" ]] && wheels+=("$whl"); done
    done
    if [[ " ${missing[*]} " == *" diffusers "* ]] && ! compgen -G "$WHEELS/diffusers-*.whl" >/dev/null; then
        echo "gpu.sh: $PY cannot import diffusers 0.42 and $WHEELS/ holds no diffusers wheel:" \
             "run 'bash benchmarks/gpu.sh --fetch-wheels' where PyPI is reachable, and carry $WHEELS" >&2
        exit 2
    fi
    if (( ${#wheels[@]} )); then
        SITE=$(mktemp -d /tmp/vcut-bench-site.XXXXXX)
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu.sh: installed ${wheels[*]} into $SITE"
    fi
fi
# They import against this torch (torchao's FP8 API too), or say why not.
"$PY" - <<'PYCHECK' || true
import importlib.metadata as m

import torch

print(f"gpu.sh: torch {torch.__version__} (CUDA {torch.version.cuda})", end="")
for name in ("diffusers", "torchao"):
    try:
        module = __import__(name)
        if name == "torchao":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_  # noqa
        print(f"; {name} {m.version(name)} imports", end="")
    except Exception as exc:
        print(f"; {name} does not import ({type(exc).__name__}: {str(exc)[:200]})", end="")
print()
PYCHECK
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# inductor compiles its kernels in this many worker processes (its default is the core count too)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# SIGINT first: the script saves what it has and exits; KILL 10 s later if it does not.
exec timeout --signal=INT --kill-after=10 "${GPU_BENCH_TIMEOUT_S:-470}" \
    "$PY" -m benchmarks.gpu --budget-s "${GPU_BENCH_BUDGET_S:-430}" --copy-to "${OUT:-}" "$@"
