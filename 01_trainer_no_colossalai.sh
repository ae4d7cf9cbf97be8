#!/usr/bin/env bash
# Baseline: the same trainer and loop on plain PyTorch DistributedDataParallel, no Colossal-AI.
#   NPROC=2 bash 01_trainer_no_colossalai.sh [extra trainer flags]
set -euo pipefail
source "$(dirname "$0")/colossal_sd/launch.sh"
echo "plugin: none (plain PyTorch DDP)"
launch_trainer --plugin none "$@"
