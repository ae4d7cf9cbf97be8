# Shared by the top-level run scripts: environment variables -> torchrun -> the trainer.
# Source it, then call `launch_trainer <trainer flags>`; the script's own arguments ("$@") go last and win.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# The original README spelled it `dataset_name`; accept both.
DATASET_NAME="${DATASET_NAME:-${dataset_name:-}}"
OUTPUT_DIR="${OUTPUT_DIR:-outputs/sd-finetuned}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
PLACEMENT="${PLACEMENT:-cpu}"
BATCH_SIZE="${BATCH_SIZE:-8}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS:-300}"
VALIDATION_STEPS="${VALIDATION_STEPS:-50}"
VALIDATION_SPLIT="${VALIDATION_SPLIT:-0.02}"
# Sample grids of these prompts suit the embedded emoji data; with your own data pass --validation_prompts.
EMOJI_PROMPTS=("an emoji of grinning face" "an emoji of red heart" "an emoji of rocket")

# passed FLAG ARGS...: whether the script's own arguments set a trainer flag (`--flag value` or `--flag=value`).
passed() {
    local flag="$1" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0
    done
    return 1
}

launch_trainer() {
    local flags=(--output_dir "$OUTPUT_DIR" --train_batch_size "$BATCH_SIZE" --max_train_steps "$MAX_TRAIN_STEPS")
    local learning_rate="${LEARNING_RATE:-}"
    # The embedded UNet starts from random weights: it needs a training rate, not the fine-tuning 1e-4 the
    # trainer defaults to for a real checkpoint.
    if [ -z "$learning_rate${MODEL_NAME:-}" ] && ! passed --pretrained_model_name_or_path "$@"; then
        learning_rate=1e-3
    fi
    [ -n "${MODEL_NAME:-}" ] && flags+=(--pretrained_model_name_or_path "$MODEL_NAME")
    [ -n "$DATASET_NAME" ] && flags+=(--dataset_name "$DATASET_NAME")
    [ -n "${TRAIN_DATA_DIR:-}" ] && flags+=(--train_data_dir "$TRAIN_DATA_DIR")
    [ -n "${RESOLUTION:-}" ] && flags+=(--resolution "$RESOLUTION")
    [ -n "${MIXED_PRECISION:-}" ] && flags+=(--mixed_precision "$MIXED_PRECISION")
    [ -n "$learning_rate" ] && flags+=(--learning_rate "$learning_rate")
    flags+=(--validation_steps "$VALIDATION_STEPS")
    # a stream has no index to hold images out of
    passed --streaming "$@" || flags+=(--validation_split "$VALIDATION_SPLIT")
    if [ -z "$DATASET_NAME${TRAIN_DATA_DIR:-}" ] && ! passed --dataset_name "$@" && ! passed --train_data_dir "$@"; then
        flags+=(--validation_prompts "${EMOJI_PROMPTS[@]}" --num_validation_images 2 --validation_inference_steps 10)
    fi

    # One node: --standalone finds a free port. Several: c10d rendezvous at MASTER_ADDR:MASTER_PORT.
    local rendezvous=(--standalone)
    if [ "$NNODES" != 1 ]; then
        rendezvous=(--nnodes "$NNODES" --rdzv_backend c10d
                    --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}:${MASTER_PORT:-29500}"
                    --rdzv_id "${RDZV_ID:-sd-colossalai}")
    fi
    # colossal_sd.launch is torchrun with the same arguments, minus its traceback when a worker fails.
    cd "$HERE" && exec "$PYTHON" -m colossal_sd.launch "${rendezvous[@]}" --nproc_per_node "$NPROC" \
        stable_diffusion_colossalai_trainer.py "${flags[@]}" "$@"
}
