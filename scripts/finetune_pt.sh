#!/usr/bin/env bash
# P-Tuning v2 on input-output data (AdvertiseGen converted by python -m data_tools.format_advertise_gen).
# Usage: [KNOB=value ...] bash scripts/finetune_pt.sh [extra finetune.py flags, e.g. --gradient_checkpointing]
# Knobs: PRE_SEQ_LEN, LR, MAX_SOURCE_LEN, MAX_TARGET_LEN, QUANTIZATION_BIT (4 or 8), and the shared ones in _common.sh.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PRE_SEQ_LEN="${PRE_SEQ_LEN:-128}"
LR="${LR:-2e-2}"
MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-1024}"
MAX_TARGET_LEN="${MAX_TARGET_LEN:-128}"
RUN_NAME="${RUN_NAME:-advertise_gen_pt}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/advertise_gen.jsonl}"

flags=(--pre_seq_len "$PRE_SEQ_LEN" --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN")
add_optional_flag flags --max_seq_length "${MAX_SEQ_LEN:-}"
add_optional_flag flags --quantization_bit "${QUANTIZATION_BIT:-}"
run_finetune "pt$PRE_SEQ_LEN-lr$LR" "${flags[@]}" -- "$@"
