#!/usr/bin/env bash
# Preference tuning (DPO, or the reference-free SimPO) on chosen/rejected pairs, with any fine-tuning method.
# Usage: [KNOB=value ...] bash scripts/finetune_dpo.sh [extra finetune.preference flags]
# Knobs: METHOD (lora, qlora, ptuning, freeze or full), PREF_LOSS (dpo or simpo), PREF_BETA,
# INIT_CHECKPOINT (the SFT checkpoint to start from: a whole model, or a LoRA/P-Tuning checkpoint of METHOD; it is then
# the reference), LR, MAX_SEQ_LEN (pairs whose longer side exceeds it are dropped and counted), LORA_RANK, LORA_ALPHA,
# LORA_DROPOUT, LORA_TARGET, QUANTIZATION_BIT [qlora: 4], PRE_SEQ_LEN [configs/ptuning_v2.yaml's],
# TRAINABLE_LAYERS [freeze: 2], DS_CONFIG (a DeepSpeed config, e.g. ds_configs/zero2.json), and the shared ones in
# _common.sh. DEV_BATCH_SIZE counts pairs (two rows each); PACKING does not apply (the recipe turns it off).
# Recipe: configs/dpo.yaml (the knobs' defaults; without its lora_rank for the methods other than LoRA).
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
RECIPE_KNOBS+=(METHOD=method)
use_recipe "$_LAUNCHER_REPO_ROOT/configs/dpo.yaml"
RUN_NAME="${RUN_NAME:-preference_${METHOD}_${PREF_LOSS}}"
_LAUNCHER_ENTRY_MODULE=finetune.preference

flags=(--method "$METHOD")
add_knob_flags flags PREF_LOSS=pref_loss PREF_BETA=pref_beta MAX_SEQ_LEN=max_seq_length
case "$METHOD" in
    lora | qlora)
        [ "$METHOD" = lora ] || QUANTIZATION_BIT="${QUANTIZATION_BIT:-4}"
        add_knob_flags flags LORA_RANK=lora_rank LORA_ALPHA=lora_alpha LORA_DROPOUT=lora_dropout \
            LORA_TARGET=lora_target QUANTIZATION_BIT=quantization_bit
        ;;
    ptuning)
        RECIPE_DROP_KEYS=lora_rank
        use_recipe "$_LAUNCHER_REPO_ROOT/configs/ptuning_v2.yaml" PRE_SEQ_LEN
        add_knob_flags flags PRE_SEQ_LEN=pre_seq_len QUANTIZATION_BIT=quantization_bit
        ;;
    freeze)
        RECIPE_DROP_KEYS=lora_rank
        flags+=(--trainable_layers "${TRAINABLE_LAYERS:-2}")
        ;;
    full) RECIPE_DROP_KEYS=lora_rank ;;
    *) launcher_error "METHOD must be one of lora, qlora, ptuning, freeze or full, got '$METHOD'" ;;
esac
if [ -n "${DS_CONFIG:-}" ]; then
    [ -f "$DS_CONFIG" ] || launcher_error "no DeepSpeed config at DS_CONFIG=$DS_CONFIG; use one of $_LAUNCHER_REPO_ROOT/ds_configs/*.json"
    flags+=(--deepspeed "$DS_CONFIG")
fi
add_knob_flags flags INIT_CHECKPOINT=init_checkpoint
run_finetune "$METHOD-$PREF_LOSS-beta$PREF_BETA-lr$LR" "${flags[@]}" -- "$@"
