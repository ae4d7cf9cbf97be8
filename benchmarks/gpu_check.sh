#!/usr/bin/env bash
# Every GPU check and benchmark in one call (about 8-10 minutes on one H200):
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# 1. peak memory / speed / loss of each plugin and placement on an SD-1.5-shaped UNet at 512 px, batch 1 and 8;
# 2. the other GPU checks that sit next to this script (resume under sharded plugins, MFU), when present.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RESULTS="$(mktemp)"

run() {  # run <trainer flags...>: one configuration, one fresh process
    echo ">> $*" >&2
    timeout "${CONFIG_TIMEOUT:-150}" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
        benchmarks/plugin_memory.py "$@" 2>&1 | tee /dev/stderr | grep '^RESULT ' >> "$RESULTS" \
        || echo "RESULT {\"failed\": \"$*\"}" >> "$RESULTS"
}

for batch in 1 8; do
    run --plugin torch_ddp --mixed_precision fp16 --train_batch_size "$batch"
    run --plugin torch_ddp_fp16 --train_batch_size "$batch"
    run --plugin low_level_zero --mixed_precision fp16 --train_batch_size "$batch"
    run --plugin gemini --placement cuda --train_batch_size "$batch"
    run --plugin gemini --placement cpu --train_batch_size "$batch"
done
run --plugin gemini --placement auto --train_batch_size 1
run --plugin gemini --placement cpu --offload_param_frac 1.0 --train_batch_size 1
run --plugin low_level_zero --mixed_precision bf16 --cpu_offload --train_batch_size 1
run --plugin gemini --placement cpu --gradient_checkpointing --train_batch_size 1
run --plugin torch_ddp --mixed_precision fp16 --gradient_checkpointing --train_batch_size 1
run --plugin torch_ddp --mixed_precision bf16 --use_8bit_adam --train_batch_size 1

"$PYTHON" benchmarks/results_table.py "$RESULTS"

for check in benchmarks/gpu_resume_check.py benchmarks/gpu_mfu.py; do
    [ -f "$check" ] && { echo ">> $check"; timeout 300 "$PYTHON" "$check"; }
done
exit 0
