#!/usr/bin/env bash
# Full UNet fine-tune with the Colossal-AI booster.
#   bash 02_run_trainer_with_colossalai.sh                      # embedded tiny model + emoji data, offline
#   MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 DATASET_NAME=lambdalabs/naruto-blip-captions \
#     NPROC=8 BATCH_SIZE=4 bash 02_run_trainer_with_colossalai.sh --mixed_precision fp16
#   CONFIG=my-run.toml NPROC=2 bash 02_run_trainer_with_colossalai.sh   # flags from a TOML or YAML file
set -euo pipefail
source "$(dirname "$0")/colossal_sd/launch.sh"
# PLUGIN (default auto) stands back for a --plugin that the arguments or the CONFIG file give.
plugin_flags=()
if [ -n "${PLUGIN:-}" ] || ! given --plugin "$@"; then
    PLUGIN="${PLUGIN:-auto}"
    if [ "$PLUGIN" = auto ]; then
        if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            PLUGIN=gemini
        else
            PLUGIN=torch_ddp
        fi
        echo "plugin: auto -> $PLUGIN"
    else
        echo "plugin: $PLUGIN"
    fi
    plugin_flags=(--plugin "$PLUGIN")
fi
# Latents and text embeddings are encoded once and cached (CACHE=0 turns it off; streaming cannot cache).
cache_flags=()
if [ "${CACHE:-1}" = 1 ] && ! on --streaming "$@"; then
    given --cache_latents "$@" || cache_flags+=(--cache_latents)
    given --cache_text_embeddings "$@" || cache_flags+=(--cache_text_embeddings)
fi
launch_trainer ${plugin_flags[@]+"${plugin_flags[@]}"} ${cache_flags[@]+"${cache_flags[@]}"} "$@"
