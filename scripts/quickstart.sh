#!/usr/bin/env bash
# The whole pipeline in one command: install, (build a tiny model,) convert data, P-Tuning v2, evaluate, answer a prompt.
#
#   bash scripts/quickstart.sh                                          # tiny random model, 1-2 minutes on 2 CPU cores
#   BASE_MODEL_PATH=/path/to/chatglm3-6b bash scripts/quickstart.sh     # the real model (a GPU is strongly advised)
#
# Arguments after the script name go to finetune.py through scripts/finetune_pt.sh, e.g. --gradient_checkpointing.
# Knobs (environment variables; defaults for the tiny model / for BASE_MODEL_PATH in brackets; relative paths are taken
# from the current folder, the defaults from the repository root):
#   BASE_MODEL_PATH     a ChatGLM3 folder; unset = build and use the tiny random model in TINY_MODEL_DIR
#   TINY_MODEL_DIR      [output/tiny-chatglm3] where the tiny model is built (kept and reused when present)
#   QUICKSTART_DIR      [output/quickstart-tiny / output/quickstart-<model folder name>] where everything else goes
#   ADVERTISE_GEN_DIR   [data/advertise_gen_sample] folder with AdvertiseGen-format train.json and dev.json
#   QUICKSTART_INSTALL  [1] 0: use the Python environment as it is instead of installing requirements.txt into .venv
#   PRE_SEQ_LEN [8 / 128]  LR [2e-2]  DEV_BATCH_SIZE [4 / 4]  GRAD_ACCUMULATION_STEPS [1 / 4]  MAX_STEP [20 / 100]
#   SAVE_INTERVAL [MAX_STEP / 50]  MAX_SOURCE_LEN [64 / 128]  MAX_TARGET_LEN [192 / 256]   training (finetune_pt.sh)
#   NUM_GPUS, QUANTIZATION_BIT, REPORT_TO  passed on to finetune_pt.sh (see scripts/_common.sh)
#   EVAL_SAMPLES [all]  EVAL_BATCH_SIZE [8]  MAX_NEW_TOKENS [64 / 256]   evaluation and the answer
#   PROMPT [类型#裙*颜色#红色*风格#简约*图案#条纹]   the message answered at the end
# A second run reuses what is there: the tiny model, and a training run that already reached MAX_STEP (delete
# QUICKSTART_DIR/run to train again); an interrupted training run continues from its newest checkpoint.
set -euo pipefail

if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
fi

CALLER_DIR="$PWD"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
STARTED_AT=$SECONDS

step() {
    echo
    echo "==> [$1/7] $2"
}

fail() {
    echo "quickstart: error: $*" >&2
    exit 1
}

# Usage: absolute_path PATH: PATH as given when absolute, else relative to the folder the script was started from.
absolute_path() {
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$CALLER_DIR/$1" ;;
    esac
}

# ---- settings ---------------------------------------------------------------------------------------------------
if [ -n "${BASE_MODEL_PATH:-}" ]; then
    TINY=0
    BASE_MODEL_PATH="$(absolute_path "$BASE_MODEL_PATH")"
    [ -f "$BASE_MODEL_PATH/config.json" ] || fail "BASE_MODEL_PATH=$BASE_MODEL_PATH has no config.json; point it \
at a ChatGLM3 folder (e.g. a local copy of THUDM/chatglm3-6b), or unset it to use the tiny test model"
    [ -f "$BASE_MODEL_PATH/tokenizer.model" ] || fail "BASE_MODEL_PATH=$BASE_MODEL_PATH has no tokenizer.model; \
the ChatGLM3 folder must hold its SentencePiece tokenizer"
    QUICKSTART_DIR="$(absolute_path "${QUICKSTART_DIR:-$REPO_ROOT/output/quickstart-$(basename "$BASE_MODEL_PATH")}")"
    PRE_SEQ_LEN="${PRE_SEQ_LEN:-128}"
    DEV_BATCH_SIZE="${DEV_BATCH_SIZE:-4}"
    GRAD_ACCUMULATION_STEPS="${GRAD_ACCUMULATION_STEPS:-4}"
    MAX_STEP="${MAX_STEP:-100}"
    SAVE_INTERVAL="${SAVE_INTERVAL:-50}"
    MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-128}"
    MAX_TARGET_LEN="${MAX_TARGET_LEN:-256}"
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
else
    TINY=1
    TINY_MODEL_DIR="$(absolute_path "${TINY_MODEL_DIR:-$REPO_ROOT/output/tiny-chatglm3}")"
    BASE_MODEL_PATH="$TINY_MODEL_DIR"
    QUICKSTART_DIR="$(absolute_path "${QUICKSTART_DIR:-$REPO_ROOT/output/quickstart-tiny}")"
    PRE_SEQ_LEN="${PRE_SEQ_LEN:-8}"
    DEV_BATCH_SIZE="${DEV_BATCH_SIZE:-4}"
    GRAD_ACCUMULATION_STEPS="${GRAD_ACCUMULATION_STEPS:-1}"
    MAX_STEP="${MAX_STEP:-20}"
    SAVE_INTERVAL="${SAVE_INTERVAL:-$MAX_STEP}"
    MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-64}"
    MAX_TARGET_LEN="${MAX_TARGET_LEN:-192}"
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-64}"
fi
LR="${LR:-2e-2}"
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-8}"
PROMPT="${PROMPT:-类型#裙*颜色#红色*风格#简约*图案#条纹}"
ADVERTISE_GEN_DIR="$(absolute_path "${ADVERTISE_GEN_DIR:-$REPO_ROOT/data/advertise_gen_sample}")"
for name in PRE_SEQ_LEN DEV_BATCH_SIZE GRAD_ACCUMULATION_STEPS MAX_STEP SAVE_INTERVAL MAX_SOURCE_LEN MAX_TARGET_LEN \
    MAX_NEW_TOKENS EVAL_BATCH_SIZE ${EVAL_SAMPLES:+EVAL_SAMPLES}; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name must be a positive integer, got '${!name}'"
done
for split in train dev; do
    [ -f "$ADVERTISE_GEN_DIR/$split.json" ] || fail "no $ADVERTISE_GEN_DIR/$split.json; ADVERTISE_GEN_DIR must be \
a folder with AdvertiseGen's train.json and dev.json (JSON lines of {\"content\", \"summary\"})"
done

DATA_DIR="$QUICKSTART_DIR/data"
TRAIN_FILE="$DATA_DIR/advertise_gen.jsonl"
DEV_FILE="$DATA_DIR/advertise_gen_dev.jsonl"
RUN_DIR="$QUICKSTART_DIR/run"
EVAL_DIR="$QUICKSTART_DIR/evaluation"
ANSWER_FILE="$QUICKSTART_DIR/answer.txt"
mkdir -p "$QUICKSTART_DIR"

# ---- 1. Python environment --------------------------------------------------------------------------------------
step 1 "Python environment"
case "${QUICKSTART_INSTALL:-1}" in
    1 | true | yes)
        # shellcheck source=scripts/_python_env.sh
        source scripts/_python_env.sh
        ensure_python_env requirements.txt
        ;;
    0 | false | no)
        if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
            # shellcheck disable=SC1091
            source .venv/bin/activate
        fi
        ;;
    *) fail "QUICKSTART_INSTALL must be 1 or 0, got '$QUICKSTART_INSTALL'" ;;
esac
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
python -c "import platform, finetune, peft, torch, transformers
print(f'Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, '
      f'peft {peft.__version__}; CUDA devices: {torch.cuda.device_count()}')" \
    || fail "the Python environment ($(command -v python)) cannot import the project's dependencies; run with \
QUICKSTART_INSTALL=1 (the default) to install requirements.txt into .venv"

# ---- 2. base model ----------------------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
    step 2 "Tiny ChatGLM3-shaped model (random weights) in $TINY_MODEL_DIR"
    if [ -f "$TINY_MODEL_DIR/config.json" ] && [ -f "$TINY_MODEL_DIR/tokenizer.model" ]; then
        echo "already built; reusing it (delete the folder to rebuild)"
    else
        python -m finetune.tiny_model --output_dir "$TINY_MODEL_DIR"
    fi
else
    step 2 "Base model $BASE_MODEL_PATH"
    echo "using it as given (no tiny model is built)"
fi

# ---- 3. data ----------------------------------------------------------------------------------------------------
step 3 "Convert AdvertiseGen-format data from $ADVERTISE_GEN_DIR"
python -m data_tools.format_advertise_gen \
    --train_file "$ADVERTISE_GEN_DIR/train.json" --dev_file "$ADVERTISE_GEN_DIR/dev.json" \
    --output "$TRAIN_FILE" --dev_output "$DEV_FILE"

# ---- 4. training ------------------------------------------------------------------------------------------------
step 4 "P-Tuning v2: $MAX_STEP steps, pre_seq_len $PRE_SEQ_LEN, batch $DEV_BATCH_SIZE x $GRAD_ACCUMULATION_STEPS, into $RUN_DIR"
finished_step=0
if [ -f "$RUN_DIR/training_record.json" ]; then
    finished_step="$(python -c 'import json, sys
print(json.load(open(sys.argv[1], encoding="utf-8"))["global_step"])' "$RUN_DIR/training_record.json")"
fi
if ((finished_step >= MAX_STEP)); then
    echo "already trained to step $finished_step (MAX_STEP=$MAX_STEP); skipping training (delete $RUN_DIR to train again)"
else
    env BASE_MODEL_PATH="$BASE_MODEL_PATH" DATASET_PATH="$TRAIN_FILE" OUTPUT_DIR="$RUN_DIR" RUN_NAME=quickstart_pt \
        AUTORESUME_FROM_CHECKPOINT=1 PRE_SEQ_LEN="$PRE_SEQ_LEN" LR="$LR" DEV_BATCH_SIZE="$DEV_BATCH_SIZE" \
        GRAD_ACCUMULATION_STEPS="$GRAD_ACCUMULATION_STEPS" GRAD_ACCUMULARION_STEPS= MAX_STEP="$MAX_STEP" \
        SAVE_INTERVAL="$SAVE_INTERVAL" MAX_SOURCE_LEN="$MAX_SOURCE_LEN" MAX_TARGET_LEN="$MAX_TARGET_LEN" \
        bash scripts/finetune_pt.sh --data_cache_dir "$DATA_DIR/cache" --print_first_example False \
        --disable_tqdm True "$@"
fi
newest="$(find "$RUN_DIR" -mindepth 1 -maxdepth 1 -type d -name 'checkpoint-*' -printf '%f\n' | sort -t- -k2,2n | tail -n 1)"
CHECKPOINT="$RUN_DIR/$newest"
[ -n "$newest" ] || fail "training finished but $RUN_DIR holds no checkpoint-N folder; see $RUN_DIR/train.log"

# ---- 5. evaluation ----------------------------------------------------------------------------------------------
step 5 "ROUGE/BLEU of $CHECKPOINT on $DEV_FILE"
eval_flags=(--max_source_length "$MAX_SOURCE_LEN")
[ -n "${EVAL_SAMPLES:-}" ] && eval_flags+=(--max_samples "$EVAL_SAMPLES")
env CHECKPOINT="$CHECKPOINT" DATASET_PATH="$DEV_FILE" OUTPUT_DIR="$EVAL_DIR" BATCH_SIZE="$EVAL_BATCH_SIZE" \
    MAX_NEW_TOKENS="$MAX_NEW_TOKENS" BASE_MODEL_PATH="$BASE_MODEL_PATH" bash scripts/evaluate.sh "${eval_flags[@]}"

# ---- 6. inference -----------------------------------------------------------------------------------------------
step 6 "Answer a prompt with $CHECKPOINT"
echo "User: $PROMPT"
answer_staging="$(mktemp "$QUICKSTART_DIR/.answer.XXXXXX")"
if ! python inference/inference.py --model "$CHECKPOINT" --prompt "$PROMPT" --max_new_tokens "$MAX_NEW_TOKENS" \
    >"$answer_staging"; then
    rm -f "$answer_staging"
    fail "inference/inference.py could not answer; see the messages above"
fi
mv "$answer_staging" "$ANSWER_FILE"
echo "ChatGLM: $(cat "$ANSWER_FILE")"
[ "$TINY" = 1 ] && echo "(the tiny model has random weights, so its answer is gibberish; the pipeline is what is shown)"

# ---- 7. summary -------------------------------------------------------------------------------------------------
step 7 "Done in $((SECONDS - STARTED_AT)) s. Where everything went:"
echo "  base model:      $BASE_MODEL_PATH"
echo "  training data:   $TRAIN_FILE"
echo "  dev data:        $DEV_FILE"
echo "  checkpoint:      $CHECKPOINT"
echo "  final model:     $RUN_DIR"
echo "  training log:    $RUN_DIR/train.log"
echo "  loss curve:      $RUN_DIR/loss_curve.png"
echo "  metrics:         $EVAL_DIR/metrics.json"
echo "  predictions:     $EVAL_DIR/generated_predictions.jsonl"
echo "  answer:          $ANSWER_FILE"
echo
echo "Chat with the trained model:  python inference/inference.py --model $CHECKPOINT"
