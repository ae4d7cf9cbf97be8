#!/usr/bin/env bash
# Every GPU check and benchmark in one call, within BUDGET_S seconds (default 570: one H200, about 10 minutes):
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# 1. SDXL: peak memory / speed / loss of each plugin and placement on SDXL base's UNet (random init) at 1024 px,
#    bf16, batch 1 and 4, gradient checkpointing on and off (benchmarks/plugin_memory.py --unet_shape sdxl);
# 2. the same on an SD-1.5-shaped UNet at 512 px, batch 1 and 8;
# 3. the other GPU checks that sit next to this script (resume under sharded plugins, MFU), when present.
# The rows run most telling first; a row that cannot finish within the budget is listed as skipped, not run.
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # on CPU: the tiny SDXL and SD UNets under torch_ddp, a few steps
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-570}"
RESULTS="$(mktemp)"

run() {  # run <seconds> <plugin_memory.py flags...>: one configuration, one fresh process
    local limit="$1"; shift
    if [ $((SECONDS + limit)) -gt "$BUDGET_S" ]; then
        echo "RESULT {\"failed\": \"skipped (time budget): $*\"}" >> "$RESULTS"; return
    fi
    echo ">> $*" >&2
    timeout "$limit" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
        benchmarks/plugin_memory.py "$@" 2>&1 | tee /dev/stderr | grep '^RESULT ' >> "$RESULTS" \
        || echo "RESULT {\"failed\": \"$*\"}" >> "$RESULTS"
}

if [ "${DRY_RUN:-0}" = 1 ]; then
    for shape in tiny-sdxl tiny-sd; do
        run 300 --unet_shape "$shape" --plugin torch_ddp --train_batch_size 2 --warmup_steps 1 --timed_steps 2
    done
    run 300 --unet_shape tiny-sdxl --plugin torch_ddp --gradient_checkpointing --train_batch_size 2 \
        --warmup_steps 1 --timed_steps 2
    "$PYTHON" benchmarks/results_table.py "$RESULTS"
    exit 0
fi

# SDXL base at 1024 px, bf16. 1 warm-up and 3 timed steps: a step of the offloaded placements takes seconds.
xl() { run "${XL_TIMEOUT:-180}" --unet_shape sdxl --mixed_precision bf16 --warmup_steps 1 --timed_steps 3 "$@"; }
xl --plugin gemini --placement cpu --gradient_checkpointing --train_batch_size 1   # the <= 12 GB target
xl --plugin gemini --placement cpu --offload_param_frac 1.0 --gradient_checkpointing --train_batch_size 1
xl --plugin low_level_zero --cpu_offload --gradient_checkpointing --train_batch_size 1
xl --plugin gemini --placement cuda --gradient_checkpointing --train_batch_size 1
xl --plugin torch_ddp --gradient_checkpointing --train_batch_size 1
xl --plugin gemini --placement cpu --train_batch_size 1
xl --plugin gemini --placement cpu --gradient_checkpointing --train_batch_size 4
xl --plugin torch_ddp --train_batch_size 1

# SD 1.5 at 512 px
sd() { run "${CONFIG_TIMEOUT:-150}" --unet_shape sd15 "$@"; }
sd --plugin gemini --placement cpu --train_batch_size 1
sd --plugin torch_ddp --mixed_precision fp16 --train_batch_size 1

for check in benchmarks/gpu_resume_check.py benchmarks/gpu_mfu.py; do
    limit=$([ "$check" = benchmarks/gpu_mfu.py ] && echo 120 || echo 300)
    if [ -f "$check" ] && [ $((SECONDS + limit)) -le "$BUDGET_S" ]; then
        echo ">> $check"; timeout "$limit" "$PYTHON" "$check"
    elif [ -f "$check" ]; then
        echo ">> $check: skipped (time budget; BUDGET_S=$BUDGET_S)"
    fi
done

# the remaining rows, while the budget lasts
xl --plugin gemini --placement cuda --train_batch_size 4
xl --plugin low_level_zero --cpu_offload --train_batch_size 4
xl --plugin gemini --placement cpu --offload_param_frac 1.0 --train_batch_size 4
xl --plugin torch_ddp --gradient_checkpointing --train_batch_size 4
for batch in 1 8; do
    sd --plugin torch_ddp_fp16 --train_batch_size "$batch"
    sd --plugin low_level_zero --mixed_precision fp16 --train_batch_size "$batch"
    sd --plugin gemini --placement cuda --train_batch_size "$batch"
done
sd --plugin gemini --placement cpu --train_batch_size 8
sd --plugin torch_ddp --mixed_precision fp16 --train_batch_size 8
sd --plugin gemini --placement auto --train_batch_size 1
sd --plugin gemini --placement cpu --offload_param_frac 1.0 --train_batch_size 1
sd --plugin low_level_zero --mixed_precision bf16 --cpu_offload --train_batch_size 1
sd --plugin gemini --placement cpu --gradient_checkpointing --train_batch_size 1
sd --plugin torch_ddp --mixed_precision fp16 --gradient_checkpointing --train_batch_size 1
sd --plugin torch_ddp --mixed_precision bf16 --use_8bit_adam --train_batch_size 1

"$PYTHON" benchmarks/results_table.py "$RESULTS"
echo "gpu_check: ${SECONDS} s of a ${BUDGET_S} s budget"
exit 0
