#!/usr/bin/env bash
# The CUDA device check: every mode judged (graph trees and prefill graphs included), the graph-family suites,
# and the decode step's speed-ups against eager (the device graph must beat eager); about 6 minutes on one H200.
#   bash scripts/device_check_cuda.sh [OUT_DIR]      (from the repository root; default: $OUT, else results/device-cuda)
# Needs torch with CUDA, transformers, pytest, hypothesis, pytest-benchmark and matplotlib; the project need not be
# installed. Writes device.log, check.json, check-prefill.json, bench.json and the report (summary.md, bench.png)
# into OUT_DIR; exits 1 if any step failed.
set -uo pipefail
out=${1:-${OUT:-results/device-cuda}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NPUGRAPH_CACHE=${NPUGRAPH_CACHE:-/tmp/npugraph-cache}
log="$out/device.log"
python -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)" | tee "$log"
status=0
step() {  # step NAME COMMAND...: run it, its output appended to device.log; a failure fails the check, the rest still runs
    local name=$1; shift
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log" || { echo "== $name FAILED" | tee -a "$log"; status=1; }
}
step check python -m harness check --device cuda --modes eager,graph,compile,tree --model llama,qwen2_moe \
    --json "$out/check.json"
step check-prefill python -m harness check --device cuda --modes graph,tree --prefill-graphs --model llama,qwen2_moe \
    --json "$out/check-prefill.json"
step suites python -m pytest -q -p no:cacheprovider --nightly --device cuda suites/test_graph_families.py suites/test_graph_memory.py \
    suites/test_faults.py -k "families or prefill or family or lazy or all_sizes or random_order or late"
step bench python -m pytest -q -p no:cacheprovider --device cuda suites/bench/test_decode_throughput.py \
    -k "test_decode_step and llama" --benchmark-json "$out/bench.json"
step report python -m harness report "$out/bench.json" --out "$out"
echo "== device check: $([ $status = 0 ] && echo PASSED || echo FAILED)" | tee -a "$log"
exit $status
