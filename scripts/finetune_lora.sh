#!/usr/bin/env bash
# LoRA on input-output data; with QUANTIZATION_BIT=4 (or 8) the frozen base model is loaded quantized (QLoRA).
# Usage: [KNOB=value ...] bash scripts/finetune_lora.sh [extra finetune.py flags]
# Knobs: LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGET (comma-separated module names), QUANTIZATION_BIT, LR,
# MAX_SOURCE_LEN, MAX_TARGET_LEN, MAX_SEQ_LEN, and the shared ones in _common.sh.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LORA_RANK="${LORA_RANK:-8}"
LR="${LR:-2e-4}"
MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-1024}"
MAX_TARGET_LEN="${MAX_TARGET_LEN:-128}"
RUN_NAME="${RUN_NAME:-advertise_gen_lora}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/advertise_gen.jsonl}"

flags=(--lora_rank "$LORA_RANK" --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN")
add_optional_flag flags --lora_alpha "${LORA_ALPHA:-}"
add_optional_flag flags --lora_dropout "${LORA_DROPOUT:-}"
add_optional_flag flags --lora_target "${LORA_TARGET:-}"
add_optional_flag flags --max_seq_length "${MAX_SEQ_LEN:-}"
add_optional_flag flags --quantization_bit "${QUANTIZATION_BIT:-}"
run_finetune "lora$LORA_RANK${QUANTIZATION_BIT:+-int$QUANTIZATION_BIT}-lr$LR" "${flags[@]}" -- "$@"
