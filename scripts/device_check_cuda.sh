#!/usr/bin/env bash
# The CUDA device check: every mode judged (graph trees and prefill graphs included), the graph-family suites,
# and the decode step's speed-ups against eager (the device graph must beat eager); about 6 minutes on one H200.
#   bash scripts/device_check_cuda.sh [OUT_DIR]      (from the repository root; default: $OUT, else results/device-cuda)
# Needs torch with CUDA, transformers, pytest, hypothesis, pytest-benchmark and matplotlib; the project need not be
# installed. Writes device.log, check.json, check-prefill.json, bench.json, check-twin.json (compile against its
# twin, the compiled step without CUDA graphs: last, never yet run on a GPU) and the report (summary.md, bench.png)
# into OUT_DIR. Without a CUDA device it refuses in one line (exit 2); otherwise it stops at the first step that
# fails and ends with a summary of every step (exit 1), or exits 0 when all passed.
set -uo pipefail
STEPS=(check check-prefill suites bench check-twin report)
if ! probe=$(python -c "import torch, transformers
assert torch.cuda.is_available(), f'torch {torch.__version__}: torch.cuda.is_available() is False'
print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)" 2>&1); then
    echo "device_check_cuda.sh: no CUDA device to check (${probe##*$'\n'}): nothing run" >&2
    exit 2
fi
out=${1:-${OUT:-results/device-cuda}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NPUGRAPH_CACHE=${NPUGRAPH_CACHE:-/tmp/npugraph-cache}
log="$out/device.log"
echo "$probe" | tee "$log"
passed=()

summary() {  # summary FAILED_STEP CODE: every step's outcome, then the verdict
    local name verdict=PASSED
    for name in "${STEPS[@]}"; do
        if [[ " ${passed[*]} " == *" $name "* ]]; then echo "== $name: passed"
        elif [ "$name" = "${1:-}" ]; then echo "== $name: FAILED (exit $2)"; verdict="FAILED at $name (see $log)"
        else echo "== $name: not run"; fi
    done
    echo "== device check: $verdict"
}

step() {  # step NAME COMMAND...: run it, its output appended to device.log; the first failure ends the check
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    if [ "$code" != 0 ]; then
        summary "$name" "$code" | tee -a "$log"
        exit 1
    fi
    passed+=("$name")
}

step check python -m harness check --device cuda --modes eager,graph,compile,tree --model llama,qwen2_moe \
    --json "$out/check.json"
step check-prefill python -m harness check --device cuda --modes graph,tree --prefill-graphs --model llama,qwen2_moe \
    --json "$out/check-prefill.json"
step suites python -m pytest -q -p no:cacheprovider --nightly --device cuda suites/test_graph_families.py suites/test_graph_memory.py \
    suites/test_faults.py -k "families or prefill or family or lazy or all_sizes or random_order or late"
step bench python -m pytest -q -p no:cacheprovider --device cuda suites/bench/test_decode_throughput.py \
    -k "test_decode_step and llama" --benchmark-json "$out/bench.json"
step check-twin python -m harness check --device cuda --dtype bfloat16 --modes compile,compile_nograph \
    --model llama,qwen2_moe --json "$out/check-twin.json"
step report python -m harness report "$out/bench.json" --out "$out"
summary | tee -a "$log"
