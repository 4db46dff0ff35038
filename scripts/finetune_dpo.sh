#!/usr/bin/env bash
# Preference tuning (DPO, or the reference-free SimPO) on chosen/rejected pairs, with any fine-tuning method.
# Usage: [KNOB=value ...] bash scripts/finetune_dpo.sh [extra finetune.preference flags]
# Knobs: METHOD [lora] (lora, qlora, ptuning, freeze or full), PREF_LOSS [dpo] (dpo or simpo), PREF_BETA [0.1],
# INIT_CHECKPOINT (the SFT checkpoint to start from: a whole model, or a LoRA/P-Tuning checkpoint of METHOD; it is then
# the reference), LR, MAX_SEQ_LEN [1024]
# (pairs whose longer side exceeds it are dropped and counted), LORA_RANK [8], LORA_ALPHA, LORA_DROPOUT, LORA_TARGET,
# QUANTIZATION_BIT (qlora: 4), PRE_SEQ_LEN [128], TRAINABLE_LAYERS [2] (freeze), DS_CONFIG (a DeepSpeed config,
# e.g. ds_configs/zero2.json), and the shared ones in _common.sh. DEV_BATCH_SIZE counts pairs (two rows each);
# PACKING does not apply and defaults to 0 here.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

METHOD="${METHOD:-lora}"
PREF_LOSS="${PREF_LOSS:-dpo}"
PREF_BETA="${PREF_BETA:-0.1}"
LR="${LR:-5e-5}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-1024}"
RUN_NAME="${RUN_NAME:-preference_${METHOD}_${PREF_LOSS}}"
DATASET_PATH="${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/preference.jsonl}"
PACKING="${PACKING:-0}"
_LAUNCHER_ENTRY_MODULE=finetune.preference

flags=(--pref_loss "$PREF_LOSS" --pref_beta "$PREF_BETA" --max_seq_length "$MAX_SEQ_LEN")
case "$METHOD" in
    lora | qlora)
        flags+=(--lora_rank "${LORA_RANK:-8}")
        add_optional_flag flags --lora_alpha "${LORA_ALPHA:-}"
        add_optional_flag flags --lora_dropout "${LORA_DROPOUT:-}"
        add_optional_flag flags --lora_target "${LORA_TARGET:-}"
        if [ "$METHOD" = qlora ]; then
            flags+=(--quantization_bit "${QUANTIZATION_BIT:-4}")
        else
            add_optional_flag flags --quantization_bit "${QUANTIZATION_BIT:-}"
        fi
        ;;
    ptuning)
        flags+=(--pre_seq_len "${PRE_SEQ_LEN:-128}")
        add_optional_flag flags --quantization_bit "${QUANTIZATION_BIT:-}"
        ;;
    freeze) flags+=(--trainable_layers "${TRAINABLE_LAYERS:-2}") ;;
    full) ;;
    *) launcher_error "METHOD must be one of lora, qlora, ptuning, freeze or full, got '$METHOD'" ;;
esac
if [ -n "${DS_CONFIG:-}" ]; then
    [ -f "$DS_CONFIG" ] || launcher_error "no DeepSpeed config at DS_CONFIG=$DS_CONFIG; use one of $_LAUNCHER_REPO_ROOT/ds_configs/*.json"
    flags+=(--deepspeed "$DS_CONFIG")
fi
add_optional_flag flags --init_checkpoint "${INIT_CHECKPOINT:-}"
run_finetune "$METHOD-$PREF_LOSS-beta$PREF_BETA-lr$LR" "${flags[@]}" -- "$@"
