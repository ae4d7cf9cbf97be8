# Shared by the top-level run scripts: environment variables -> torchrun -> the trainer.
# Source it, then call `launch_trainer <trainer flags>`; the script's own arguments ("$@") go last and win.

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# The original README spelled it `dataset_name`; accept both.
DATASET_NAME="${DATASET_NAME:-${dataset_name:-}}"
NPROC="${NPROC:-1}"
NNODES="${NNODES:-1}"
PLACEMENT="${PLACEMENT:-}"
# CONFIG=FILE: a TOML or YAML file of trainer flags (--config). What wins: the script's arguments, then the
# variables you set, then the file, then the script's defaults below (each only for a flag the file leaves out).
CONFIG="${CONFIG:-}"
[ -f "$CONFIG" ] && CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"  # the trainer runs in $HERE
config_flags=()  # the flags CONFIG sets: `--flag`, switches `--flag=true` or `--flag=false`
if [ -n "$CONFIG" ]; then
    # A file the trainer cannot read lists nothing here: the trainer then says what is wrong with it, in one line.
    while IFS= read -r line; do
        config_flags+=("$line")
    done < <(cd "$HERE" && "$PYTHON" -m colossal_sd.config_file "$CONFIG" || true)
fi
# The demo's sample grids; with your own data pass --validation_prompts or --validation_prompts_file.
EMOJI_PROMPTS=("an emoji of red heart" "an emoji of green heart" "an emoji of blue heart" "an emoji of yellow circle")

# passed FLAG ARGS...: whether the script's own arguments set a trainer flag (`--flag value` or `--flag=value`).
passed() {
    local flag="$1" arg
    shift
    for arg in "$@"; do
        [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0
    done
    return 1
}

# given FLAG ARGS...: the script's arguments or the CONFIG file set FLAG, so the script's default stands back.
given() {
    local flag="$1"
    shift
    passed "$flag" "$@" || passed "$flag" ${config_flags[@]+"${config_flags[@]}"}
}

# on SWITCH ARGS...: the script's arguments or the CONFIG file turn SWITCH on.
on() {
    local flag="$1" arg
    shift
    passed "$flag" "$@" && return 0
    for arg in ${config_flags[@]+"${config_flags[@]}"}; do
        [ "$arg" = "$flag=true" ] && return 0
    done
    return 1
}

launch_trainer() {
    local flags=()
    [ -n "$CONFIG" ] && flags+=(--config "$CONFIG")
    # setting FLAG VARIABLE DEFAULT: the variable's value when you set it, else the default unless the
    # arguments or the CONFIG file set FLAG.
    setting() {
        if [ -n "$2" ]; then
            flags+=("$1" "$2")
        elif [ -n "$3" ] && ! given "$1" "${@:4}"; then
            flags+=("$1" "$3")
        fi
    }
    setting --output_dir "${OUTPUT_DIR:-}" "${DEFAULT_OUTPUT_DIR:-outputs/sd-finetuned}" "$@"
    setting --train_batch_size "${BATCH_SIZE:-}" 8 "$@"
    # The demo: no model given trains the embedded tiny model from its random UNet; no data given, on the
    # emoji named by their colour, with grids of coloured hearts.
    local demo_model=1 demo_data=1
    if [ -n "${MODEL_NAME:-}" ] || given --pretrained_model_name_or_path "$@"; then
        demo_model=""
    fi
    if [ -n "$DATASET_NAME${TRAIN_DATA_DIR:-}" ] || given --dataset_name "$@" || given --train_data_dir "$@" \
            || given --dataset_config "$@" || given --instance_data_dir "$@"; then
        demo_data=""
    fi
    setting --max_train_steps "${MAX_TRAIN_STEPS:-}" "$([ -n "$demo_data" ] && echo 2500 || echo 300)" "$@"
    setting --pretrained_model_name_or_path "${MODEL_NAME:-}" "" "$@"
    setting --dataset_name "$DATASET_NAME" "${demo_data:+embedded:emoji-colours}" "$@"
    setting --train_data_dir "${TRAIN_DATA_DIR:-}" "" "$@"
    setting --resolution "${RESOLUTION:-}" "" "$@"
    setting --mixed_precision "${MIXED_PRECISION:-}" "" "$@"
    setting --placement "$PLACEMENT" cpu "$@"
    # A random UNet needs a training rate, not the fine-tuning 1e-4 the trainer defaults to for a real
    # checkpoint. It also needs zero terminal SNR (v-prediction): SD's betas leave a trace of the image at the
    # last timestep, and a model trained on flat-coloured emoji reads the colour from that trace instead of
    # from the caption, so its samples, which start from pure noise, all come out the same colour.
    setting --learning_rate "${LEARNING_RATE:-}" "${demo_model:+1e-3}" "$@"
    if [ -n "$demo_model" ] && ! given --prediction_type "$@" && ! given --rescale_betas_zero_snr "$@"; then
        flags+=(--prediction_type v_prediction --rescale_betas_zero_snr)
    fi
    setting --validation_steps "${VALIDATION_STEPS:-}" "$([ -n "$demo_data" ] && echo 250 || echo 50)" "$@"
    # a stream has no index to hold images out of, a DreamBooth subject's handful of photos none to spare, and
    # the demo draws the very emoji it learns
    on --streaming "$@" || given --instance_data_dir "$@" \
        || setting --validation_split "${VALIDATION_SPLIT:-}" "$([ -n "$demo_data" ] && echo 0 || echo 0.02)" "$@"
    if [ -n "$demo_data" ]; then
        setting --seed "" 0 "$@"  # the grid in the README is the one you get
        # a falling rate ends on clean shapes and flat colours instead of the texture a constant 1e-3 leaves
        setting --lr_scheduler "" cosine "$@"
        setting --lr_warmup_steps "" 100 "$@"
        setting --caption_dropout "" 0.1 "$@"  # the unconditional prediction that guidance needs
        setting --validation_epochs "" 0 "$@"  # 60 images make an epoch of 8 steps: grids by steps only
        setting --num_validation_images "" 2 "$@"
        given --validation_prompts "$@" || given --validation_prompts_file "$@" \
            || flags+=(--validation_prompts "${EMOJI_PROMPTS[@]}")
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
