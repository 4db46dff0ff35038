#!/usr/bin/env bash
# Full fine-tuning of every weight on input-output data with DeepSpeed ZeRO (NUM_GPUS defaults to all visible GPUs).
# Usage: [KNOB=value ...] bash scripts/finetune_ds.sh [extra finetune.py flags]
# Knobs: DS_CONFIG (ds_configs/zero2.json; zero3.json, or zero3_offload.json for CPU offload), LR, MAX_SOURCE_LEN,
# MAX_TARGET_LEN, MAX_SEQ_LEN, and the shared ones in _common.sh.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LR="${LR:-1e-5}"
MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-1024}"
MAX_TARGET_LEN="${MAX_TARGET_LEN:-128}"
RUN_NAME="${RUN_NAME:-advertise_gen_ft}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/advertise_gen.jsonl}"
DS_CONFIG="${DS_CONFIG:-$_LAUNCHER_REPO_ROOT/ds_configs/zero2.json}"
NUM_GPUS="${NUM_GPUS:-all}"
[ -f "$DS_CONFIG" ] || launcher_error "no DeepSpeed config at DS_CONFIG=$DS_CONFIG; use one of $_LAUNCHER_REPO_ROOT/ds_configs/*.json"

flags=(--deepspeed "$DS_CONFIG" --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN")
add_optional_flag flags --max_seq_length "${MAX_SEQ_LEN:-}"
run_finetune "ft-lr$LR" "${flags[@]}" -- "$@"
