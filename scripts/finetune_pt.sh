#!/usr/bin/env bash
# P-Tuning v2 on input-output data (AdvertiseGen converted by python -m data_tools.format_advertise_gen).
# Usage: [KNOB=value ...] bash scripts/finetune_pt.sh [extra finetune.py flags, e.g. --gradient_checkpointing]
# Knobs: PRE_SEQ_LEN, LR, MAX_SOURCE_LEN, MAX_TARGET_LEN, QUANTIZATION_BIT (4 or 8), and the shared ones in _common.sh.
# Recipe: configs/ptuning_v2.yaml (the knobs' defaults).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
use_recipe "$_LAUNCHER_REPO_ROOT/configs/ptuning_v2.yaml"

flags=()
add_knob_flags flags PRE_SEQ_LEN=pre_seq_len MAX_SOURCE_LEN=max_source_length MAX_TARGET_LEN=max_target_length \
    MAX_SEQ_LEN=max_seq_length QUANTIZATION_BIT=quantization_bit
run_finetune "pt$PRE_SEQ_LEN-lr$LR" "${flags[@]}" -- "$@"
