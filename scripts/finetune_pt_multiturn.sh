#!/usr/bin/env bash
# P-Tuning v2 on multi-turn conversations with tools (ToolAlpaca converted by python -m data_tools.format_tool_alpaca).
# Usage: [KNOB=value ...] bash scripts/finetune_pt_multiturn.sh [extra finetune.py flags]
# Knobs: PRE_SEQ_LEN, LR, MAX_SEQ_LEN, QUANTIZATION_BIT (4 or 8), and the shared ones in _common.sh.
# Recipe: configs/ptuning_v2_multiturn.yaml (the knobs' defaults).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
use_recipe "$_LAUNCHER_REPO_ROOT/configs/ptuning_v2_multiturn.yaml"

flags=()
add_knob_flags flags PRE_SEQ_LEN=pre_seq_len MAX_SEQ_LEN=max_seq_length QUANTIZATION_BIT=quantization_bit
run_finetune "pt$PRE_SEQ_LEN-lr$LR" "${flags[@]}" -- "$@"
