#!/usr/bin/env bash
# P-Tuning v2 on multi-turn conversations with tools (ToolAlpaca converted by python -m data_tools.format_tool_alpaca).
# Usage: [KNOB=value ...] bash scripts/finetune_pt_multiturn.sh [extra finetune.py flags]
# Knobs: PRE_SEQ_LEN, LR, MAX_SEQ_LEN, QUANTIZATION_BIT (4 or 8), and the shared ones in _common.sh.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PRE_SEQ_LEN="${PRE_SEQ_LEN:-128}"
LR="${LR:-2e-2}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-2048}"
RUN_NAME="${RUN_NAME:-tool_alpaca_pt}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/tool_alpaca.jsonl}"

flags=(--pre_seq_len "$PRE_SEQ_LEN" --max_seq_length "$MAX_SEQ_LEN")
add_optional_flag flags --quantization_bit "${QUANTIZATION_BIT:-}"
run_finetune "pt$PRE_SEQ_LEN-lr$LR" "${flags[@]}" -- "$@"
