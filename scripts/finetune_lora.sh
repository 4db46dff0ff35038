#!/usr/bin/env bash
# LoRA on input-output data; with QUANTIZATION_BIT=4 (or 8) the frozen base model is loaded quantized (QLoRA).
# Usage: [KNOB=value ...] bash scripts/finetune_lora.sh [extra finetune.py flags]
# Knobs: LORA_RANK, LORA_ALPHA, LORA_DROPOUT, LORA_TARGET (comma-separated module names), QUANTIZATION_BIT, LR,
# MAX_SOURCE_LEN, MAX_TARGET_LEN, MAX_SEQ_LEN, and the shared ones in _common.sh.
# Recipe: configs/lora.yaml (the knobs' defaults).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
use_recipe "$_LAUNCHER_REPO_ROOT/configs/lora.yaml"

flags=()
add_knob_flags flags LORA_RANK=lora_rank MAX_SOURCE_LEN=max_source_length MAX_TARGET_LEN=max_target_length \
    LORA_ALPHA=lora_alpha LORA_DROPOUT=lora_dropout LORA_TARGET=lora_target MAX_SEQ_LEN=max_seq_length \
    QUANTIZATION_BIT=quantization_bit
run_finetune "lora$LORA_RANK${QUANTIZATION_BIT:+-int$QUANTIZATION_BIT}-lr$LR" "${flags[@]}" -- "$@"
