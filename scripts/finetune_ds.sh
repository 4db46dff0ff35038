#!/usr/bin/env bash
# Full fine-tuning of every weight on input-output data with DeepSpeed ZeRO (NUM_GPUS defaults to all visible GPUs).
# Usage: [KNOB=value ...] bash scripts/finetune_ds.sh [extra finetune.py flags]
# Knobs: DS_CONFIG (a file of ds_configs/: zero3.json, or zero3_offload.json for CPU offload), LR, MAX_SOURCE_LEN,
# MAX_TARGET_LEN, MAX_SEQ_LEN, and the shared ones in _common.sh.
# Recipe: configs/sft.yaml (the knobs' defaults).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
use_recipe "$_LAUNCHER_REPO_ROOT/configs/sft.yaml"

NUM_GPUS="${NUM_GPUS:-all}"
[ -f "$DS_CONFIG" ] || launcher_error "no DeepSpeed config at DS_CONFIG=$DS_CONFIG; use one of $_LAUNCHER_REPO_ROOT/ds_configs/*.json"

flags=()
add_knob_flags flags DS_CONFIG=deepspeed MAX_SOURCE_LEN=max_source_length MAX_TARGET_LEN=max_target_length \
    MAX_SEQ_LEN=max_seq_length
run_finetune "ft-lr$LR" "${flags[@]}" -- "$@"
