#!/usr/bin/env bash
# LoRA fine-tune of the UNet with the Colossal-AI booster: a small adapter file instead of a whole pipeline.
#   bash 03_run_trainer_with_colossalai_lora.sh                 # embedded tiny model + emoji data, offline
#   MODEL_NAME=stable-diffusion-v1-5/stable-diffusion-v1-5 DATASET_NAME=lambdalabs/naruto-blip-captions \
#     LORA_RANK=16 NPROC=8 bash 03_run_trainer_with_colossalai_lora.sh --lora_export_format kohya
# Same variables as 02, plus LORA_RANK (default 4) and LORA_ALPHA (default: the rank).
set -euo pipefail
DEFAULT_OUTPUT_DIR=outputs/sd-lora
source "$(dirname "$0")/colossal_sd/launch.sh"
# auto: torch_ddp_fp16 with CUDA (Gemini has no LoRA in Colossal-AI 0.5.0), torch_ddp otherwise
lora=(--use_lora)
if [ -n "${PLUGIN:-}" ] || ! given --plugin "$@"; then
    lora+=(--plugin "${PLUGIN:-auto}")
    echo "plugin: ${PLUGIN:-auto} (LoRA)"
fi
{ [ -n "${LORA_RANK:-}" ] || ! given --rank "$@"; } && lora+=(--rank "${LORA_RANK:-4}")
[ -n "${LORA_ALPHA:-}" ] && lora+=(--lora_alpha "$LORA_ALPHA")
launch_trainer "${lora[@]}" "$@"
