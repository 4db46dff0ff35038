#!/usr/bin/env bash
# Full fine-tuning with DeepSpeed ZeRO on multi-turn conversations with tools (NUM_GPUS defaults to all visible GPUs).
# Usage: [KNOB=value ...] bash scripts/finetune_ds_multiturn.sh [extra finetune.py flags]
# Knobs: DS_CONFIG (ds_configs/zero2.json; zero3.json, or zero3_offload.json for CPU offload), LR, MAX_SEQ_LEN, and the
# shared ones in _common.sh.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LR="${LR:-1e-5}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-2048}"
RUN_NAME="${RUN_NAME:-tool_alpaca_ft}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/tool_alpaca.jsonl}"
DS_CONFIG="${DS_CONFIG:-$_LAUNCHER_REPO_ROOT/ds_configs/zero2.json}"
NUM_GPUS="${NUM_GPUS:-all}"
[ -f "$DS_CONFIG" ] || launcher_error "no DeepSpeed config at DS_CONFIG=$DS_CONFIG; use one of $_LAUNCHER_REPO_ROOT/ds_configs/*.json"

run_finetune "ft-lr$LR" --deepspeed "$DS_CONFIG" --max_seq_length "$MAX_SEQ_LEN" -- "$@"
