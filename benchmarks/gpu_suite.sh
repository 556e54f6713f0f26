#!/usr/bin/env bash
# The prepared GPU suite (one command, under 8 minutes on an H200; see issue 11):
#   1. the engine tests on CUDA (models built on the GPU; CUDA graphs of the decode step on)
#   2. decode at batch 64 and 256 with 1,024-token contexts, bf16, adaptive vs max-depth:
#      the paper preset (router biases for a mean depth near 2) and the dense iso-FLOP
#      preset, each (layer, step) form recorded, every bucket replay under
#      torch.cuda.set_sync_debug_mode("error")
#   3. the same dense model in loopserve and in transformers' generate
#   3b. the paper preset at batch 256 and 64 again, decodes through the Triton paged kernel
#      (--attention-backend triton, engine/triton_paged.py) with CUDA graphs: each row reads
#      its blocks in place, and a halted row of the masked form one key
#   4. one decode attention call at batch 64 and 256, 1,024-token contexts: the block
#      gather + SDPA the engine runs against FlexAttention reading the pool in place
#      (benchmarks/paged_gather.py --flex: the data to choose the CUDA paged kernel by)
#   5. the paper preset at batch 256 again, decodes through FlexAttention in place
#      (--attention-backend flex) with CUDA graphs
#   6. the same with the elementwise chains fused by torch.compile (--compile-chains;
#      last, as it compiles for about a minute)
# Expect in step 2: the decode buckets replay every loop step in the masked form, so on
# CUDA adaptive does max-depth work (adaptive/max-depth near 1): the gather path reads
# every row's context. Step 3b is the fix to measure: its attention skips the halted rows
# on the device (never run on a GPU yet; its tests in step 1 hold it to the gather path). Expect step 5 to be refused at start-up: FlexAttention's
# Triton kernels want query blocks of >= 16 rows, the engine's are one decode row
# (engine/flex_paged.py).
# Steps 3b-6 are optional: each runs only if it can end (its timeout) within SUITE_BUDGET
# seconds of the start (default 540, under the device tool's 600 s a command), so a slow
# early step costs the later figures, never the whole run's JSON.
# JSON goes to $OUT (the device tool's folder) when set, else benchmarks/results/<date>-gpu.
# Runs with the device's own python3 (torch with CUDA, transformers, pytest); it needs none
# of the server's packages. Usage: bash benchmarks/gpu_suite.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/$(date +%F)-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
    > "$OUT/gpu.csv" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/torch.txt"

step() {  # step NAME TIMEOUT COMMAND...: run, keep its log, print its last line
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "$name: rc=$rc in $((SECONDS - start)) s"
}

optional() {  # optional NAME TIMEOUT COMMAND...: step, if it fits the budget
    if (( SECONDS + $2 > ${SUITE_BUDGET:-540} )); then
        echo "{\"skipped\": \"$1: no time left in the suite's budget\"}" > "$OUT/$1.json"
        echo "$1: skipped (budget)"
        return
    fi
    step "$@"
}

step tests 160 env LOOPSERVE_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_engine.py tests/test_loop_forms.py tests/test_engine_liveness.py \
    tests/test_prompt_logprobs.py tests/test_sampler.py tests/test_triton_paged.py \
    tests/test_decode_backends.py -k "not flex" --junitxml "$OUT/tests.xml"
tail -n 3 "$OUT/tests.log"
for preset in paper-loop3-mem paper-iso-flop-baseline; do
    for batch in 64 256; do
        step "decode-$preset-$batch" 65 "$PY" -m benchmarks.decode_bench --preset "$preset" \
            --device cuda --dtype bf16 --batch "$batch" --context 1024 --steps 16 \
            --router-bias 0.4 --sync-debug
    done
done
step peer 60 "$PY" -m benchmarks.peer_transformers --device cuda --dtype bf16 \
    --batch-sizes 1 8 32 64
for batch in 256 64; do
    optional "decode-triton-paper-loop3-mem-$batch" 65 "$PY" -m benchmarks.decode_bench \
        --preset paper-loop3-mem --device cuda --dtype bf16 --batch "$batch" --context 1024 \
        --steps 16 --router-bias 0.4 --sync-debug --attention-backend triton
done
optional paged-attention 50 "$PY" -m benchmarks.paged_gather --device cuda --dtype bf16 \
    --batches 64,256 --contexts 1024 --rounds 3 --flex --triton
optional decode-flex-paper-loop3-mem-256 75 "$PY" -m benchmarks.decode_bench \
    --preset paper-loop3-mem --device cuda --dtype bf16 --batch 256 --context 1024 --steps 16 \
    --router-bias 0.4 --sync-debug --attention-backend flex
optional decode-compiled-paper-loop3-mem-256 90 "$PY" -m benchmarks.decode_bench \
    --preset paper-loop3-mem --device cuda --dtype bf16 --batch 256 --context 1024 --steps 16 \
    --router-bias 0.4 --sync-debug --compile-chains
"$PY" -m benchmarks.gpu_summary "$OUT"
