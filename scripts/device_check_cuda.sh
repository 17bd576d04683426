#!/usr/bin/env bash
# The CUDA device check of prefill graphs and graph trees (issue #17): about 5 minutes on one H200.
#   bash scripts/device_check_cuda.sh [OUT_DIR]      (from the repository root; default: $OUT, else results/device-cuda)
# Needs torch with CUDA, transformers, pytest, hypothesis and pytest-benchmark; the project need not be installed.
# Writes check.json, check-prefill.json and the logs into OUT_DIR; exits 1 if any step failed.
set -uo pipefail
out=${1:-${OUT:-results/device-cuda}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NPUGRAPH_CACHE=${NPUGRAPH_CACHE:-/tmp/npugraph-cache}
python -c "import torch, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(), 'transformers', transformers.__version__)"
status=0
step() {  # step NAME COMMAND...: run it with its output in OUT_DIR/NAME.log; a failure fails the check, the rest still runs
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log" || { echo "== $name FAILED"; status=1; }
}
step check python -m harness check --device cuda --modes eager,graph,compile,tree --model llama,qwen2_moe \
    --json "$out/check.json"
step check-prefill python -m harness check --device cuda --modes graph,tree --prefill-graphs --model llama,qwen2_moe \
    --json "$out/check-prefill.json"
step suites python -m pytest -q -p no:cacheprovider --device cuda suites/test_graph_families.py suites/test_graph_memory.py \
    suites/test_faults.py -k "families or prefill or family or lazy or all_sizes or random_order"
echo "== device check: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
