#!/usr/bin/env bash
# Evaluate a checkpoint (P-Tuning v2, LoRA, full or base) on a dev set: ROUGE-1/2/L, BLEU-4 and tool-call metrics.
# Usage: CHECKPOINT=output/<run>/checkpoint-1000 [KNOB=value ...] bash scripts/evaluate.sh [extra evaluate flags]
# Knobs (defaults in brackets):
#   CHECKPOINT       checkpoint folder to evaluate (required)
#   DATASET_PATH     dev set, input-output or conversations .jsonl [formatted_data/advertise_gen_dev.jsonl]
#   BASE_MODEL_PATH  base model for LoRA/P-Tuning checkpoints [the one in the checkpoint's training_record.json]
#   OUTPUT_DIR       where generated_predictions.jsonl and metrics.json go
#                    [<repository>/output/evaluation/<run>-<checkpoint>]
#   NUM_GPUS [1]     processes (torchrun) that share the dev set; "all" uses every visible CUDA device
#   BATCH_SIZE       prompts generated together (per process) [finetune.evaluate's --batch_size]
#   MAX_NEW_TOKENS   longest prediction in tokens [finetune.evaluate's --max_new_tokens]
# Arguments go to `python -m finetune.evaluate` last (see its --help), e.g. --max_source_length 64 --device cpu;
# `--help` prints this list.
# A rerun with the same settings continues an interrupted evaluation.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

for argument in "$@"; do
    if [ "$argument" = "--help" ] || [ "$argument" = "-h" ]; then
        sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
        echo
        echo "The flags of the evaluation itself: python -m finetune.evaluate --help"
        exit 0
    fi
done

[ -n "${CHECKPOINT:-}" ] || launcher_error "set CHECKPOINT to the checkpoint folder to evaluate"
NUM_GPUS="${NUM_GPUS:-1}"
[ -z "${BATCH_SIZE:-}" ] || require_positive_integer BATCH_SIZE "$BATCH_SIZE"
[ -z "${MAX_NEW_TOKENS:-}" ] || require_positive_integer MAX_NEW_TOKENS "$MAX_NEW_TOKENS"
if [ "$NUM_GPUS" = "all" ]; then
    NUM_GPUS="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')"
fi
require_positive_integer NUM_GPUS "$NUM_GPUS"

flags=(
    --model "$CHECKPOINT"
    --data "${DATASET_PATH:-$_LAUNCHER_REPO_ROOT/formatted_data/advertise_gen_dev.jsonl}"
    --output_root "$_LAUNCHER_REPO_ROOT/output"
)
add_knob_flags flags BATCH_SIZE=batch_size MAX_NEW_TOKENS=max_new_tokens
add_optional_flag flags --base "${BASE_MODEL_PATH:-}"
add_optional_flag flags --output_dir "${OUTPUT_DIR:-}"

if ((NUM_GPUS > 1)); then
    # Ctrl-C reaches torchrun and its workers (the whole foreground group); the launcher waits for them, then says
    # last, below torchrun's traceback, that the predictions made are kept.
    interrupted=""
    trap 'interrupted=1' INT TERM
    status=0
    python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NUM_GPUS" \
        -m finetune.evaluate "${flags[@]}" "$@" || status=$?
    if [ -n "$interrupted" ] && [ "$status" -ne 0 ]; then
        echo "interrupted: the predictions made so far are kept; rerun the same command to continue" >&2
        exit 130
    fi
    exit "$status"
fi
exec python -m finetune.evaluate "${flags[@]}" "$@"
