#!/usr/bin/env bash
# The whole pipeline in one command, showing that fine-tuning works: install, (build a tiny model,) convert data, score
# the base model, fine-tune, score again, print the before/after table, answer a prompt.
#
#   bash scripts/quickstart.sh                                          # tiny model, about 3 minutes on 2 CPU cores
#   BASE_MODEL_PATH=/path/to/chatglm3-6b bash scripts/quickstart.sh     # the real model (a GPU is strongly advised)
#
# With the tiny model it first makes a stand-in for the pretrained chatglm3-6b: a random ChatGLM3-shaped model, fully
# trained for a short while on general Chinese text that `python -m data_tools.make_general_text` writes (plain
# requests for product descriptions, product copy from selling points named in plain words, texts to continue,
# questions about them, copying, small talk; never AdvertiseGen's keyword prompts nor its dev answers). Then, as on the real model, P-Tuning v2 and LoRA teach that base the
# AdvertiseGen task; full fine-tuning of all its weights is the reference row.
# With BASE_MODEL_PATH it runs P-Tuning v2 only.
# Arguments after the script name go to python -m finetune.train through scripts/finetune_pt.sh, e.g.
# --gradient_checkpointing.
# Knobs (environment variables; defaults for the tiny model / for BASE_MODEL_PATH in brackets; relative paths are taken
# from the current folder, the defaults from the repository root):
#   BASE_MODEL_PATH     a ChatGLM3 folder; unset = build, pre-train and use the tiny model in TINY_MODEL_DIR
#   TINY_MODEL_DIR      [output/tiny-chatglm3-quickstart] the pre-trained tiny model (kept and reused when present)
#   QUICKSTART_DIR      [output/quickstart-tiny / output/quickstart-<model folder name>] where everything else goes
#   ADVERTISE_GEN_DIR   [data/advertise_gen_sample] folder with AdvertiseGen-format train.json and dev.json
#   QUICKSTART_INSTALL  [1] 0: use the Python environment as it is instead of installing requirements.txt into .venv
#   QUICKSTART_SEED     [0] seed of the general text, the tiny model's random weights and every training run
#   PRE_SEQ_LEN [16 / 128]  LR [5e-2 / 2e-2]  DEV_BATCH_SIZE [4 / 4]  GRAD_ACCUMULATION_STEPS [1 / 4]  MAX_STEP [60 / 100]
#   SAVE_INTERVAL [MAX_STEP / 50]  MAX_SOURCE_LEN [64 / 128]  MAX_TARGET_LEN [192 / 256]   P-Tuning v2 (finetune_pt.sh)
#   NUM_GPUS, QUANTIZATION_BIT, REPORT_TO  passed on to finetune_pt.sh (see scripts/_common.sh)
#   PRETRAIN_MAX_STEP [300]  PRETRAIN_LR [5e-3]  PRETRAIN_BATCH_SIZE [8]  GENERAL_TEXT_SIZE [2000]   pre-training the tiny model
#   LORA_RANK [8]  LORA_LR [1e-2]   LoRA of the tiny model (finetune_lora.sh; MAX_STEP, DEV_BATCH_SIZE as P-Tuning v2)
#   FULL_MAX_STEP [20]  FULL_LR [5e-3]  FULL_BATCH_SIZE [8]   full fine-tuning of the tiny model (packed rows)
#   EVAL_SAMPLES [all]  EVAL_BATCH_SIZE [8]  MAX_NEW_TOKENS [64 / 256]   evaluation and the answer
#   OMP_NUM_THREADS [1 / torch's default]   CPU threads of every step
#   PROMPT [类型#裙*颜色#红色*风格#简约*图案#条纹]   the message answered at the end
# A second run reuses what is there: the pre-trained tiny model, training runs that already reached their last step
# (delete TINY_MODEL_DIR, QUICKSTART_DIR/run, QUICKSTART_DIR/run-lora or QUICKSTART_DIR/run-full to train again), and
# scores made with the same settings after their checkpoint (delete QUICKSTART_DIR/evaluation to score again); an
# interrupted run continues from its newest checkpoint.
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
    echo "==> [$1/$STEPS] $2"
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
    LR="${LR:-2e-2}"
    SAVE_INTERVAL="${SAVE_INTERVAL:-50}"
    MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-128}"
    MAX_TARGET_LEN="${MAX_TARGET_LEN:-256}"
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
else
    TINY=1
    # One CPU thread: the tiny model gains nothing from more, and its training then sums in the same order on every
    # machine, so the table matches the README's whatever the number of cores (and no thread spins on a busy machine).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    TINY_MODEL_DIR="$(absolute_path "${TINY_MODEL_DIR:-$REPO_ROOT/output/tiny-chatglm3-quickstart}")"
    BASE_MODEL_PATH="$TINY_MODEL_DIR"
    QUICKSTART_DIR="$(absolute_path "${QUICKSTART_DIR:-$REPO_ROOT/output/quickstart-tiny}")"
    PRE_SEQ_LEN="${PRE_SEQ_LEN:-16}"
    DEV_BATCH_SIZE="${DEV_BATCH_SIZE:-4}"
    GRAD_ACCUMULATION_STEPS="${GRAD_ACCUMULATION_STEPS:-1}"
    MAX_STEP="${MAX_STEP:-60}"
    LR="${LR:-5e-2}"
    SAVE_INTERVAL="${SAVE_INTERVAL:-$MAX_STEP}"
    MAX_SOURCE_LEN="${MAX_SOURCE_LEN:-64}"
    MAX_TARGET_LEN="${MAX_TARGET_LEN:-192}"
    MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-64}"
fi
QUICKSTART_SEED="${QUICKSTART_SEED:-0}"
PRETRAIN_MAX_STEP="${PRETRAIN_MAX_STEP:-300}"
PRETRAIN_LR="${PRETRAIN_LR:-5e-3}"
PRETRAIN_BATCH_SIZE="${PRETRAIN_BATCH_SIZE:-8}"
GENERAL_TEXT_SIZE="${GENERAL_TEXT_SIZE:-2000}"
LORA_RANK="${LORA_RANK:-8}"
LORA_LR="${LORA_LR:-1e-2}"
FULL_MAX_STEP="${FULL_MAX_STEP:-20}"
FULL_LR="${FULL_LR:-5e-3}"
FULL_BATCH_SIZE="${FULL_BATCH_SIZE:-8}"
STEPS=$((TINY == 1 ? 10 : 8))
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-8}"
PROMPT="${PROMPT:-类型#裙*颜色#红色*风格#简约*图案#条纹}"
ADVERTISE_GEN_DIR="$(absolute_path "${ADVERTISE_GEN_DIR:-$REPO_ROOT/data/advertise_gen_sample}")"
for name in PRE_SEQ_LEN DEV_BATCH_SIZE GRAD_ACCUMULATION_STEPS MAX_STEP SAVE_INTERVAL MAX_SOURCE_LEN MAX_TARGET_LEN \
    MAX_NEW_TOKENS EVAL_BATCH_SIZE PRETRAIN_MAX_STEP PRETRAIN_BATCH_SIZE GENERAL_TEXT_SIZE LORA_RANK FULL_MAX_STEP \
    FULL_BATCH_SIZE ${EVAL_SAMPLES:+EVAL_SAMPLES}; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name must be a positive integer, got '${!name}'"
done
[[ "$QUICKSTART_SEED" =~ ^[0-9]+$ ]] || fail "QUICKSTART_SEED must be a non-negative integer, got '$QUICKSTART_SEED'"
for split in train dev; do
    [ -f "$ADVERTISE_GEN_DIR/$split.json" ] || fail "no $ADVERTISE_GEN_DIR/$split.json; ADVERTISE_GEN_DIR must be \
a folder with AdvertiseGen's train.json and dev.json (JSON lines of {\"content\", \"summary\"})"
done

DATA_DIR="$QUICKSTART_DIR/data"
TRAIN_FILE="$DATA_DIR/advertise_gen.jsonl"
DEV_FILE="$DATA_DIR/advertise_gen_dev.jsonl"
RUN_DIR="$QUICKSTART_DIR/run"
LORA_RUN_DIR="$QUICKSTART_DIR/run-lora"
FULL_RUN_DIR="$QUICKSTART_DIR/run-full"
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

# Usage: trained_step RUN_DIR: the global_step of the run's final save (0 when there is none).
trained_step() {
    if [ -f "$1/training_record.json" ]; then
        python -c 'import json, sys
print(json.load(open(sys.argv[1], encoding="utf-8"))["global_step"])' "$1/training_record.json"
    else
        echo 0
    fi
}

# Usage: newest_checkpoint RUN_DIR: the checkpoint-N folder with the highest N.
newest_checkpoint() {
    local newest
    newest="$(find "$1" -mindepth 1 -maxdepth 1 -type d -name 'checkpoint-*' -printf '%f\n' | sort -t- -k2,2n | tail -n 1)"
    [ -n "$newest" ] || fail "training finished but $1 holds no checkpoint-N folder; see $1/train.log"
    echo "$1/$newest"
}

# Usage: full_finetune MODEL TRAIN_FILE RUN_DIR MAX_STEP LR BATCH_SIZE: train every weight of MODEL on packed rows.
full_finetune() {
    mkdir -p "$3"
    python -m finetune.train --model_name_or_path "$1" --train_file "$2" \
        --output_dir "$3" --resume_from_checkpoint auto --max_steps "$4" \
        --save_steps "$4" --learning_rate "$5" --per_device_train_batch_size "$6" --seed "$QUICKSTART_SEED" \
        --packing True --max_source_length "$MAX_SOURCE_LEN" --max_target_length "$MAX_TARGET_LEN" \
        --logging_steps 5 --report_to none --data_cache_dir "$DATA_DIR/cache" --print_first_example False \
        --disable_tqdm True 2>&1 | (trap '' INT TERM && exec tee -a "$3/train.log")
}

# ---- 2. base model ----------------------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
    step 2 "Tiny stand-in for the pretrained chatglm3-6b in $TINY_MODEL_DIR: a random ChatGLM3-shaped model \
pre-trained for $PRETRAIN_MAX_STEP steps on general text (not the AdvertiseGen task)"
    GENERAL_TEXT="$TINY_MODEL_DIR/general_text.jsonl"
    RANDOM_MODEL_DIR="$TINY_MODEL_DIR/random-init"
    finished_step="$(trained_step "$TINY_MODEL_DIR")"
    if ((finished_step >= PRETRAIN_MAX_STEP)); then
        echo "already pre-trained to step $finished_step (PRETRAIN_MAX_STEP=$PRETRAIN_MAX_STEP); reusing it (delete \
the folder to build it again)"
    else
        mkdir -p "$TINY_MODEL_DIR"
        python -m data_tools.make_general_text --output "$GENERAL_TEXT" --size "$GENERAL_TEXT_SIZE" \
            --seed "$QUICKSTART_SEED" --exclude "$ADVERTISE_GEN_DIR/dev.json"
        if [ ! -f "$RANDOM_MODEL_DIR/model.safetensors" ]; then
            python -m finetune.tiny_model --output_dir "$RANDOM_MODEL_DIR" --seed "$QUICKSTART_SEED" --overwrite \
                --text_file "$GENERAL_TEXT" "$ADVERTISE_GEN_DIR/train.json"
        fi
        full_finetune "$RANDOM_MODEL_DIR" "$GENERAL_TEXT" "$TINY_MODEL_DIR" "$PRETRAIN_MAX_STEP" "$PRETRAIN_LR" \
            "$PRETRAIN_BATCH_SIZE"
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

# Usage: score NAME CHECKPOINT: ROUGE/BLEU of CHECKPOINT on the dev data into EVAL_DIR/NAME. Scores made earlier are
# reused when they were made with the same settings and are newer than the checkpoint's files and the dev data.
eval_flags=(--max_source_length "$MAX_SOURCE_LEN")
[ -n "${EVAL_SAMPLES:-}" ] && eval_flags+=(--max_samples "$EVAL_SAMPLES")
score() {
    local out="$EVAL_DIR/$1" settings
    settings="checkpoint=$(cd "$2" && pwd) base=$BASE_MODEL_PATH dev=$ADVERTISE_GEN_DIR/dev.json \
max_new_tokens=$MAX_NEW_TOKENS ${eval_flags[*]}"
    if [ -f "$out/metrics.json" ] && [ "$(cat "$out/scored_with.txt" 2>/dev/null)" = "$settings" ] \
        && [ -z "$(find "$2" "$ADVERTISE_GEN_DIR/dev.json" -maxdepth 1 -type f -newer "$out/metrics.json" | head -n 1)" ]; then
        echo "already scored with these settings; reusing $out/metrics.json (delete $out to score again)"
        return
    fi
    rm -f "$out/scored_with.txt"
    env CHECKPOINT="$2" DATASET_PATH="$DEV_FILE" OUTPUT_DIR="$out" BATCH_SIZE="$EVAL_BATCH_SIZE" \
        MAX_NEW_TOKENS="$MAX_NEW_TOKENS" BASE_MODEL_PATH="$BASE_MODEL_PATH" bash scripts/evaluate.sh "${eval_flags[@]}"
    printf '%s\n' "$settings" >"$out/.scored_with.txt.tmp" && mv "$out/.scored_with.txt.tmp" "$out/scored_with.txt"
}

# Usage: skip_if_trained RUN_DIR MAX_STEP KNOB: succeeds (and says so) when RUN_DIR already reached MAX_STEP.
skip_if_trained() {
    local finished_step
    finished_step="$(trained_step "$1")"
    ((finished_step >= $2)) || return 1
    echo "already trained to step $finished_step ($3=$2); skipping training (delete $1 to train again)"
}

# ---- 4. the base model ------------------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
    step 4 "ROUGE/BLEU of the pre-trained tiny base (never tuned on this task) on $DEV_FILE"
else
    step 4 "ROUGE/BLEU of the base model on $DEV_FILE"
fi
score base "$BASE_MODEL_PATH"

# ---- 5. P-Tuning v2 ---------------------------------------------------------------------------------------------
step 5 "P-Tuning v2: $MAX_STEP steps, pre_seq_len $PRE_SEQ_LEN, batch $DEV_BATCH_SIZE x $GRAD_ACCUMULATION_STEPS, into $RUN_DIR"
if ! skip_if_trained "$RUN_DIR" "$MAX_STEP" MAX_STEP; then
    env BASE_MODEL_PATH="$BASE_MODEL_PATH" DATASET_PATH="$TRAIN_FILE" OUTPUT_DIR="$RUN_DIR" RUN_NAME=quickstart_pt \
        AUTORESUME_FROM_CHECKPOINT=1 PRE_SEQ_LEN="$PRE_SEQ_LEN" LR="$LR" DEV_BATCH_SIZE="$DEV_BATCH_SIZE" \
        GRAD_ACCUMULATION_STEPS="$GRAD_ACCUMULATION_STEPS" GRAD_ACCUMULARION_STEPS= MAX_STEP="$MAX_STEP" \
        SAVE_INTERVAL="$SAVE_INTERVAL" MAX_SOURCE_LEN="$MAX_SOURCE_LEN" MAX_TARGET_LEN="$MAX_TARGET_LEN" \
        bash scripts/finetune_pt.sh --data_cache_dir "$DATA_DIR/cache" --print_first_example False \
        --disable_tqdm True --seed "$QUICKSTART_SEED" "$@"
fi
CHECKPOINT="$(newest_checkpoint "$RUN_DIR")"
runs=(base ptuning)
run_dirs=("" "$RUN_DIR")
ANSWER_CHECKPOINT="$CHECKPOINT"

if [ "$TINY" = 1 ]; then
    # ---- 6. LoRA ------------------------------------------------------------------------------------------------
    step 6 "LoRA of the tiny model: $MAX_STEP steps, rank $LORA_RANK, lr $LORA_LR, batch $DEV_BATCH_SIZE x $GRAD_ACCUMULATION_STEPS, into $LORA_RUN_DIR"
    if ! skip_if_trained "$LORA_RUN_DIR" "$MAX_STEP" MAX_STEP; then
        env BASE_MODEL_PATH="$BASE_MODEL_PATH" DATASET_PATH="$TRAIN_FILE" OUTPUT_DIR="$LORA_RUN_DIR" \
            RUN_NAME=quickstart_lora AUTORESUME_FROM_CHECKPOINT=1 LORA_RANK="$LORA_RANK" LR="$LORA_LR" \
            DEV_BATCH_SIZE="$DEV_BATCH_SIZE" GRAD_ACCUMULATION_STEPS="$GRAD_ACCUMULATION_STEPS" \
            GRAD_ACCUMULARION_STEPS= MAX_STEP="$MAX_STEP" SAVE_INTERVAL="$SAVE_INTERVAL" \
            MAX_SOURCE_LEN="$MAX_SOURCE_LEN" MAX_TARGET_LEN="$MAX_TARGET_LEN" QUANTIZATION_BIT= \
            bash scripts/finetune_lora.sh --data_cache_dir "$DATA_DIR/cache" --print_first_example False \
            --disable_tqdm True --seed "$QUICKSTART_SEED" "$@"
    fi
    LORA_CHECKPOINT="$(newest_checkpoint "$LORA_RUN_DIR")"
    runs+=(lora)
    run_dirs+=("$LORA_RUN_DIR")

    # ---- 7. full fine-tuning ------------------------------------------------------------------------------------
    step 7 "Full fine-tuning of the tiny model (reference): $FULL_MAX_STEP steps of $FULL_BATCH_SIZE packed rows, lr $FULL_LR, into $FULL_RUN_DIR"
    if ! skip_if_trained "$FULL_RUN_DIR" "$FULL_MAX_STEP" FULL_MAX_STEP; then
        full_finetune "$BASE_MODEL_PATH" "$TRAIN_FILE" "$FULL_RUN_DIR" "$FULL_MAX_STEP" "$FULL_LR" "$FULL_BATCH_SIZE"
    fi
    FULL_CHECKPOINT="$(newest_checkpoint "$FULL_RUN_DIR")"
    runs+=(full)
    run_dirs+=("$FULL_RUN_DIR")
fi

# ---- 8. the trained models --------------------------------------------------------------------------------------
step $((STEPS - 2)) "ROUGE/BLEU of the trained checkpoints on $DEV_FILE"
score ptuning "$CHECKPOINT"
if [ "$TINY" = 1 ]; then
    score lora "$LORA_CHECKPOINT"
    score full "$FULL_CHECKPOINT"
fi
echo
echo "Before and after fine-tuning (dev set, $EVAL_DIR/*/metrics.json; loss: first and last logged training loss):"
python - "$EVAL_DIR" "$TINY" "${runs[@]}" -- "${run_dirs[@]}" <<'PY'
import json
import sys
from pathlib import Path

eval_dir, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
separator = sys.argv.index("--")
names, run_dirs = sys.argv[3:separator], sys.argv[separator + 1 :]
labels = {
    "base": "pretrained tiny base" if tiny else "base model",
    "ptuning": "P-Tuning v2",
    "lora": "LoRA",
    "full": "full fine-tuning",
}
metric_names = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
print(f"  {'model':<22}" + "".join(f"{name:>9}" for name in metric_names) + f"{'loss':>16}")
for name, run_dir in zip(names, run_dirs):
    metrics = json.loads((eval_dir / name / "metrics.json").read_text(encoding="utf-8"))
    loss = ""
    if run_dir:
        state_files = sorted(Path(run_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
        history = json.loads(state_files[-1].read_text(encoding="utf-8"))["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        loss = f"{losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
    print(f"  {labels[name]:<22}" + "".join(f"{metrics[key]:>9.2f}" for key in metric_names) + f"{loss:>16}")
PY

# ---- 9. inference -----------------------------------------------------------------------------------------------
step $((STEPS - 1)) "Answer a prompt with $ANSWER_CHECKPOINT"
echo "User: $PROMPT"
answer_staging="$(mktemp "$QUICKSTART_DIR/.answer.XXXXXX")"
if ! python inference.py --model "$ANSWER_CHECKPOINT" --prompt "$PROMPT" --max_new_tokens "$MAX_NEW_TOKENS" \
    >"$answer_staging"; then
    rm -f "$answer_staging"
    fail "inference.py could not answer; see the messages above"
fi
mv "$answer_staging" "$ANSWER_FILE"
echo "ChatGLM: $(cat "$ANSWER_FILE")"

# ---- 10. summary ------------------------------------------------------------------------------------------------
step "$STEPS" "Done in $((SECONDS - STARTED_AT)) s. Where everything went:"
echo "  base model:      $BASE_MODEL_PATH"
if [ "$TINY" = 1 ]; then
    echo "  general text:    $GENERAL_TEXT"
    echo "  pretrain log:    $TINY_MODEL_DIR/train.log"
fi
echo "  training data:   $TRAIN_FILE"
echo "  dev data:        $DEV_FILE"
echo "  checkpoint:      $CHECKPOINT"
echo "  final model:     $RUN_DIR"
echo "  training log:    $RUN_DIR/train.log"
echo "  loss curve:      $RUN_DIR/loss_curve.png"
if [ "$TINY" = 1 ]; then
    echo "  lora checkpoint: $LORA_CHECKPOINT"
    echo "  lora metrics:    $EVAL_DIR/lora/metrics.json"
    echo "  full checkpoint: $FULL_CHECKPOINT"
    echo "  full loss curve: $FULL_RUN_DIR/loss_curve.png"
    echo "  full metrics:    $EVAL_DIR/full/metrics.json"
fi
echo "  metrics:         $EVAL_DIR/ptuning/metrics.json"
echo "  predictions:     $EVAL_DIR/ptuning/generated_predictions.jsonl"
echo "  base metrics:    $EVAL_DIR/base/metrics.json"
echo "  answer:          $ANSWER_FILE"
echo
echo "Chat with the trained model:  python inference.py --model $ANSWER_CHECKPOINT"
