#!/usr/bin/env bash
# `make gpu-check`: the gpu-marked tests, then benchmarks/gpu/, then one summary table.
# Installs nothing (the GPU machine has no network). Every part has a time limit so the whole stays
# under 10 minutes (9 1/3 with one language-model seed); a part that fails or times out is reported
# and the others still run.
# Exit status: that of the gpu tests.
set -u
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=benchmarks/gpu/results
missing=$($PYTHON - <<'PY'
import importlib.util as u
print(" ".join(n for n in ("torch", "numpy", "tqdm", "pytest") if u.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu-check: missing Python packages: $missing (nothing is installed here; install them first)" >&2
    exit 2
fi
# GPU_CHECK_SMOKE=1: run the same steps on the CPU with tiny workloads (checks the script, measures nothing).
SMOKE=()
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    SMOKE=(--device cpu --tiny)
elif ! $PYTHON -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device visible to torch $($PYTHON -c 'import torch; print(torch.__version__)')" >&2
    exit 2
fi
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.jsonl "$RESULTS"/*.log
start=$(date +%s)

echo "== pytest -m gpu (limit 140 s)"
timeout 140 $PYTHON -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$RESULTS/pytest-gpu.log" | tail -15
tests_status=${PIPESTATUS[0]}

run() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit $limit s)"
    if timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then
        tail -12 "$RESULTS/$name.log"
    else
        echo "$name FAILED or timed out (status $?); see $RESULTS/$name.log"
        tail -5 "$RESULTS/$name.log"
    fi
}
if [ -f benchmarks/gpu/compress.py ] && [ ${#SMOKE[@]} = 0 ]; then
    run compress 150 $PYTHON benchmarks/gpu/compress.py --out "$RESULTS/compress.jsonl"
else
    echo "== compress: skipped in smoke mode (run python benchmarks/gpu/compress.py --device cpu --tiny to check it)"
fi
run transformer 60 $PYTHON benchmarks/gpu/transformer.py "${SMOKE[@]}" --out "$RESULTS/transformer.jsonl"
run methods 120 $PYTHON benchmarks/gpu/methods.py "${SMOKE[@]}" --out "$RESULTS/methods.jsonl"
# Issue 14's targets on the GPU: gpt at the issue's batch shape (6 runs of 300 steps, about 50 s a
# seed on an H200), seeds from GPU_CHECK_LM_SEEDS (default 0; e.g. "0 1 2"). Needs the text data:
# data/ag_news_small in the checkout, carried to the GPU machine.
LM_SEEDS=${GPU_CHECK_LM_SEEDS:-0}
if [ ${#SMOKE[@]} = 0 ]; then
    # GRADKIT_DATA: the checkout's data/ is searched first (../shared is not on the GPU machine).
    run language-model $(( 90 * $(wc -w <<<"$LM_SEEDS") )) env GRADKIT_DATA="$PWD/data" bash -c "for seed in $LM_SEEDS; do \
        $PYTHON benchmarks/language-model/run.py --device cuda --batch-size 32 --context 64 \
        --groups methods,activations --only bp,fr-k2,fr-k2-paper,dni-k2,int4,int2 \
        --seed \$seed --out $RESULTS/language-model.jsonl || exit 1; done"
else
    run language-model 120 $PYTHON benchmarks/language-model/run.py --quick --groups methods --only dni-k2
fi

echo
$PYTHON benchmarks/gpu/summary.py "$RESULTS"
echo "gpu tests: $([ "$tests_status" = 0 ] && echo passed || echo "FAILED (status $tests_status)"); total $(( $(date +%s) - start )) s"
exit "$tests_status"
