#!/bin/bash
# Every GPU measurement in one call, in order of importance, each step capped so that the whole
# fits a time budget (default 540 s):
#
#   bash bench/gpu_wheels.sh          # once, here: pydantic for the GPU image, in .whl/ (carry it)
#   OUT=folder [STEPS="env precompile ..."] bash bench/gpu_session.sh [budget_s]
#
#   1. env: the card, driver, torch and Triton versions
#   1a. step_gpu_check: no synchronizing CUDA call inside a step; the captured step trains as the
#      eager one (exit 1 on a mismatch)
#   1b. train_throughput: imnet.train itself (the CLI, ResNet-50 bf16, data resident on the GPU) at 2,
#      32 and 256 images, BN and imnet GN, eager and run.cuda_graph, against rn50_throughput's loop
#   1c. microbatch_step: steps/s at 1, 2, 4 images, the old synchronous step against the default one
#      and its CUDA graph
#   2. precompile, precompile_256: the kernel specializations of the check (2 and 32 images, all
#      dtypes) and of the benchmarks (256 images, bf16) compiled in parallel into Triton's cache
#      (otherwise the steps below compile hundreds of them one by one); after each step the log says
#      how many kernels the cache holds (a step that adds many missed it)
#   3. gn_gpu_check: the kernels against float64 on the GPU (exit 1 on a mismatch);
#      loader_gpu_check: the DataLoader path's batches, copied one ahead on a side stream, are the
#      DataLoader's (exit 1 on a mismatch)
#   4. rn50_throughput: ResNet-50 training img/s at 256 and 32 images, BN vs native GN vs imnet GN
#   5. precompile_local, gn_gpu_check_local: the same for the local kernels (IMNET_GN_TUNE=local=16
#      and local=16,tile=16384), at 256 images, where every layer takes them
#   6. norm_kernels_graph: bench/norm_kernels.py --cuda-graph --batches 256 32 2 --tune local=16
#      local=16,tile=16384 --write, the GPU time of each norm layer (BN, native GN, imnet GN with the
#      default and the local plans) and imnet's share of copy bandwidth
#   7. rn50_local: 4 with IMNET_GN_TUNE=local=16
#   8. rn50_cuda_graph: 4 at 32 images with each step replayed as a CUDA graph (no host overhead)
#   9. norm_kernels_graph_residual: 6 with the residual-add + ReLU epilogue
#  10. gn_tune: bench/gn_tune.py, the launch-plan knobs against the defaults (IMNET_GN_TUNE)
#  11. norm_kernels_compile: eager steps with torch.compile'd GN too, if time is left
#
# STEPS (names above, space-separated) runs only those. Every step's output is appended to
# $OUT/session.log; BENCHMARKS.md with the new rows is copied to $OUT/BENCHMARKS.md at the end (the
# rows are under the markers). A step that would start with under 20 s left is skipped and says so.
# Exit status: that of the correctness checks (the first that failed; 2 without a GPU).
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
export PY=${PYTHON:-python3}  # the GPU machine's image has python3 (with torch and Triton), maybe no `python`
budget=${1:-540}
start=$(date +%s)
if [ -d .whl ] && ! $PY -c "import pydantic" 2>/dev/null; then  # imnet.config's needs, carried as wheels
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
check_rc=""   # the first correctness check's exit status, or the first failing one's after it

step() {  # step NAME CAP_S COMMAND...
    local name=$1 cap=$2 left
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: SKIPPED, ${left} s of the budget left" | tee -a "$OUT/session.log"
        return 99
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (at most ${cap} s): $*" | tee -a "$OUT/session.log"
    timeout "$cap" "$@" >"$OUT/step.log" 2>&1
    local rc=$?
    cat "$OUT/step.log" >>"$OUT/session.log"
    tail -n 30 "$OUT/step.log"
    rm -f "$OUT/step.log"
    local kernels
    kernels=$(find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l)
    echo "== $name: exit $rc after $(($(date +%s) - start)) s; Triton's cache holds $kernels kernels" | tee -a "$OUT/session.log"
    return $rc
}

check() {  # check NAME CAP_S COMMAND...: a correctness step, folded into check_rc (a skipped one, 99, only if first)
    step "$@"
    local rc=$?
    if [ -z "$check_rc" ]; then
        check_rc=$rc
    elif [ "$check_rc" -eq 0 ] && [ "$rc" -ne 99 ]; then
        check_rc=$rc
    fi
    return 0
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
$PY -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")"'
check step_gpu_check 60 $PY bench/step_gpu_check.py
step train_throughput 380 $PY bench/train_throughput.py --write
step microbatch_step 80 $PY bench/microbatch_step.py --device cuda --arch resnet50 --steps 30 --rounds 3 --write
step precompile 100 $PY -m imnet.kernels.precompile --batches 2 32 --jobs "$(nproc)"
step precompile_256 60 $PY -m imnet.kernels.precompile --batches 256 --dtypes bf16 --jobs "$(nproc)"
check gn_gpu_check 120 $PY bench/gn_gpu_check.py --batches 2 32
check loader_gpu_check 60 $PY bench/loader_gpu_check.py
step rn50_throughput 170 $PY bench/rn50_throughput.py --batches 256 32 --write
LOCALS=(local=16 local=16,tile=16384)   # the local plans timed below (imnet/kernels/gn/kernels.py's docstring)
LOCAL=(env IMNET_GN_TUNE="${LOCALS[0]}")
# `bash -c "$EACH_LOCAL" _ COMMAND...`: COMMAND under each of them; exit status: the first failure's
export LOCAL_PLANS="${LOCALS[*]}"
EACH_LOCAL='rc=0; for t in $LOCAL_PLANS; do IMNET_GN_TUNE=$t "$@" || { r=$?; [ $rc -eq 0 ] && rc=$r; }; done; exit $rc'
step precompile_local 90 bash -c "$EACH_LOCAL" _ $PY -m imnet.kernels.precompile --batches 32 256 --dtypes bf16 --jobs "$(nproc)"
check gn_gpu_check_local 150 bash -c "$EACH_LOCAL" _ $PY bench/gn_gpu_check.py --batches 256 --dtypes bf16
step norm_kernels_graph 180 $PY bench/norm_kernels.py --cuda-graph --batches 256 32 2 --methods bn gn imnet --tune "${LOCALS[@]}" --write
step rn50_local 120 "${LOCAL[@]}" $PY bench/rn50_throughput.py --batches 256 32 --write
step rn50_cuda_graph 90 $PY bench/rn50_throughput.py --batches 32 --cuda-graph --write
step norm_kernels_graph_residual 90 $PY bench/norm_kernels.py --cuda-graph --batches 256 32 2 --methods bn gn imnet --epilogue residual --tune "${LOCALS[@]}" --write
step gn_tune 150 $PY bench/gn_tune.py --batches 32 256 --budget 100 --jobs "$(nproc)" --write
step norm_kernels_compile 300 $PY bench/norm_kernels.py --batches 32 --write
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
echo "== done after $(($(date +%s) - start)) s; correctness check exit ${check_rc:-3}"
exit "${check_rc:-3}"
