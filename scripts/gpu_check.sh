#!/usr/bin/env bash
# Every GPU path of fastguide on one CUDA machine (an H100/H200), in one command, in under 8 minutes:
#   1. build the C++/CUDA extension in place against the machine's torch;
#   2. run every CUDA test (extension, Triton kernels, compiled and graph-captured step, bf16, golden parity
#      on the GPU);
#   3. run the op benchmarks and the end-to-end benchmarks against ADM's loop;
#   4. print a Markdown block (device, date, commit, command) ready for benchmarks/RESULTS.md.
# Logs and the benchmark JSON go to $OUT (default ./gpu-check-out). Wheels of packages the machine lacks
# (guided-diffusion-sdk, mlxtend: `pip wheel --no-deps -w .wheels guided-diffusion-sdk mlxtend` here, then
# carry .wheels) are installed from ./.wheels when that folder exists.
#
# Without a CUDA device it says so and exits 0 (nothing to check on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here; the GPU checks are skipped"
    exit 0
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if ! timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "gpu_check: $name FAILED (see $OUT/$name.log)"
        status=1
    fi
}

if [ -d .wheels ]; then
    "$PY" -m pip install --quiet --no-deps --no-index .wheels/*.whl
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. the extension with CUDA (setup.py builds CUDA when torch has it and nvcc is found)
step build 240 "$PY" setup.py build_ext --inplace
step ext-cuda 30 "$PY" -c "import fastguide._C as C; assert C.WITH_CUDA, 'fastguide._C was built without CUDA'; print('fastguide._C with CUDA')"

# 2. every CUDA test
step tests 240 "$PY" -m pytest -q -p no:cacheprovider -x \
    tests/test_ext.py tests/test_kernels_triton.py tests/test_compile.py tests/test_gpu.py \
    -k "cuda or gpu or triton or compile or bfloat16"

# 3. benchmarks: the fused ops (copy-bandwidth goal) and end to end against ADM's loop
step bench-ops 60 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py -k gpu --benchmark-only \
    --benchmark-json "$OUT/bench_ops.json"
step bench-e2e 150 "$PY" benchmarks/e2e.py --device cuda --cases adm64,adm256 --batches 1,16 --rounds 2 \
    --contenders adm,eager,fast

# 4. the block for benchmarks/RESULTS.md
{
    echo "## GPU — $("$PY" -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)'); command: \`bash scripts/gpu_check.sh\`"
    echo
    grep -E '^\|' "$OUT/bench-e2e.log" | tail -n +1
} | tee "$OUT/RESULTS-block.md"
exit $status
