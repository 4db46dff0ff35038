# shellcheck shell=bash
# Sourced by the finetune_*.sh launchers: reads the shared environment-variable knobs, checks the inputs and starts
# python -m finetune.train CONFIG (through torchrun for several processes), teeing its output into OUTPUT_DIR/train.log.
#
# Each launcher runs a recipe, configs/<name>.yaml: a knob left unset takes the recipe's value (`--help` lists them),
# a knob set in the environment overrides it. Knobs every launcher reads (launcher-only defaults in brackets):
#   NUM_GPUS [1; "all" = every visible GPU]  processes per node (CUDA devices; without CUDA, CPU processes on gloo)
#   DEV_BATCH_SIZE          per-device micro-batch size
#   GRAD_ACCUMULATION_STEPS (the official misspelling GRAD_ACCUMULARION_STEPS is accepted too)
#   MAX_STEP  SAVE_INTERVAL  LR
#   MAX_SOURCE_LEN  MAX_TARGET_LEN  MAX_SEQ_LEN   length bounds (input-output data / whole multi-turn rows)
#   BASE_MODEL_PATH (required)  a ChatGLM3 model folder (the quickstart and the tests set it to the tiny test model)
#   DATASET_PATH  RUN_NAME
#   OUTPUT_DIR [output/RUN_NAME-DATE-TAG, or output/RUN_NAME-TAG with AUTORESUME_FROM_CHECKPOINT]
#   AUTORESUME_FROM_CHECKPOINT [0]  1/true: continue from the newest checkpoint in OUTPUT_DIR if there is one
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]   multi-node rendezvous
#   REPORT_TO [tensorboard when installed, else none]  where the Trainer reports metrics (none, tensorboard, wandb...)
#   PACKING                 1: several examples per training row (segment masks; much faster on short examples; each
#                           optimizer step then sees more examples, which the log states); 0: one example per row
#   STOP_TIMEOUT [600]      seconds training gets, after Ctrl-C / SIGTERM / SIGHUP to the launcher (or to its process
#                           group, as timeout, Slurm and Kubernetes send), to save a checkpoint and exit; the launcher
#                           waits that long, prints the `stopped:` line last, then kills what is left
# Arguments after the launcher's name go to finetune.py last, so they override the recipe and the knobs; `--help`
# prints this list, `--dry-run` prints the training command that the recipe and the knobs make, without running it.
# An environment variable whose name is close to a knob's (MAX_STEPS for MAX_STEP) or another tool's name for one
# (LEARNING_RATE for LR, BATCH_SIZE for DEV_BATCH_SIZE, SAVE_STEPS for SAVE_INTERVAL, AUTO_RESUME, OUTPUT_PATH, DATASET)
# gets a warning, since the launcher ignores it. One process on one node runs finetune.py directly; several processes
# (or DeepSpeed) run it under torchrun.

_LAUNCHER_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$_LAUNCHER_REPO_ROOT/.venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$_LAUNCHER_REPO_ROOT/.venv/bin/activate"
fi
export PYTHONPATH="$_LAUNCHER_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

launcher_error() {
    echo "error: $*" >&2
    exit 2
}

# Usage: is_true NAME VALUE. Succeeds for 1/true/yes/on, fails for 0/false/no/off/none/empty (any case).
is_true() {
    case "${2,,}" in
        1 | true | yes | on) return 0 ;;
        0 | false | no | off | none | "") return 1 ;;
        *) launcher_error "$1 must be 1/true/yes or 0/false/no, got '$2'" ;;
    esac
}

require_positive_integer() {
    local name="$1" value="$2"
    [[ "$value" =~ ^[1-9][0-9]*$ ]] || launcher_error "$name must be a positive integer, got '$value'"
}

# Every environment variable the launchers read (scripts/evaluate.sh and scripts/quickstart.sh included).
LAUNCHER_KNOBS=(
    NUM_GPUS DEV_BATCH_SIZE GRAD_ACCUMULATION_STEPS GRAD_ACCUMULARION_STEPS MAX_STEP SAVE_INTERVAL LR MAX_SOURCE_LEN
    MAX_TARGET_LEN MAX_SEQ_LEN BASE_MODEL_PATH DATASET_PATH RUN_NAME OUTPUT_DIR AUTORESUME_FROM_CHECKPOINT NNODES
    NODE_RANK MASTER_ADDR MASTER_PORT REPORT_TO PACKING STOP_TIMEOUT PRE_SEQ_LEN QUANTIZATION_BIT LORA_RANK LORA_ALPHA
    LORA_DROPOUT LORA_TARGET DS_CONFIG CHECKPOINT BATCH_SIZE MAX_NEW_TOKENS EVAL_SAMPLES EVAL_BATCH_SIZE PROMPT
    TINY_MODEL_DIR QUICKSTART_DIR QUICKSTART_INSTALL ADVERTISE_GEN_DIR METHOD PREF_LOSS PREF_BETA INIT_CHECKPOINT
    TRAINABLE_LAYERS QUICKSTART_SEED PRETRAIN_MAX_STEP PRETRAIN_LR PRETRAIN_BATCH_SIZE GENERAL_TEXT_SIZE LORA_LR
    FULL_MAX_STEP FULL_LR FULL_BATCH_SIZE
)

# The knobs a recipe (configs/*.yaml) gives their defaults, as KNOB=argument name.
RECIPE_KNOBS=(
    LR=learning_rate DEV_BATCH_SIZE=per_device_train_batch_size GRAD_ACCUMULATION_STEPS=gradient_accumulation_steps
    MAX_STEP=max_steps SAVE_INTERVAL=save_steps PACKING=packing RUN_NAME=run_name DATASET_PATH=train_file
    DS_CONFIG=deepspeed MAX_SOURCE_LEN=max_source_length MAX_TARGET_LEN=max_target_length MAX_SEQ_LEN=max_seq_length
    PRE_SEQ_LEN=pre_seq_len LORA_RANK=lora_rank LORA_ALPHA=lora_alpha LORA_DROPOUT=lora_dropout
    LORA_TARGET=lora_target QUANTIZATION_BIT=quantization_bit TRAINABLE_LAYERS=trainable_layers PREF_LOSS=pref_loss
    PREF_BETA=pref_beta
)
RECIPE_CONFIG=""
RECIPE_DEFAULTS=()

# Usage: use_recipe CONFIG [KNOB ...]. Every knob of RECIPE_KNOBS (or only the KNOBs named) that the environment
# leaves empty takes CONFIG's value; the first CONFIG given is the file training starts from (RECIPE_CONFIG).
use_recipe() {
    local config="$1" knob value lines
    shift
    [ -n "$RECIPE_CONFIG" ] || RECIPE_CONFIG="$config"
    GRAD_ACCUMULATION_STEPS="${GRAD_ACCUMULATION_STEPS:-${GRAD_ACCUMULARION_STEPS:-}}"
    lines="$(python "$_LAUNCHER_REPO_ROOT/scripts/_recipe.py" defaults "$config" "${RECIPE_KNOBS[@]}")" || exit 2
    while IFS=$'\t' read -r knob value; do
        [ -n "$knob" ] || continue
        if [ "$#" -gt 0 ] && [[ " $* " != *" $knob "* ]]; then
            continue
        fi
        [ -n "${!knob:-}" ] || printf -v "$knob" '%s' "$value"
        RECIPE_DEFAULTS+=("$knob=${value#"$_LAUNCHER_REPO_ROOT/"}")
    done <<<"$lines"
}

# Names other tools use for a training launcher's knobs: set, they are ignored, so they are warned about.
TRAINING_KNOB_ALIASES=(
    LEARNING_RATE=LR BATCH_SIZE=DEV_BATCH_SIZE PER_DEVICE_TRAIN_BATCH_SIZE=DEV_BATCH_SIZE SAVE_STEPS=SAVE_INTERVAL
    MAX_STEPS=MAX_STEP AUTO_RESUME=AUTORESUME_FROM_CHECKPOINT AUTORESUME=AUTORESUME_FROM_CHECKPOINT
    OUTPUT_PATH=OUTPUT_DIR DATASET=DATASET_PATH DATA_PATH=DATASET_PATH TRAIN_FILE=DATASET_PATH
    MODEL_PATH=BASE_MODEL_PATH GRADIENT_ACCUMULATION_STEPS=GRAD_ACCUMULATION_STEPS
)

# Usage: warn_misspelled_knobs [ALIAS=KNOB ...]. Warns on stderr about environment variables that are another
# tool's name for a knob (an ALIAS) or whose names are close to a knob's but not one (e.g. MAX_STEPS for MAX_STEP).
warn_misspelled_knobs() {
    python - "$@" -- "${LAUNCHER_KNOBS[@]}" <<'PY'
import difflib
import os
import sys

separator = sys.argv.index("--")
aliases = dict(pair.split("=", 1) for pair in sys.argv[1:separator])
knobs = sys.argv[separator + 1 :]
for name in sorted(os.environ):
    meant = aliases.get(name)
    if meant is None and name not in knobs:
        close = difflib.get_close_matches(name, knobs, n=1, cutoff=0.8)
        meant = close[0] if close else None
    if meant is not None:
        what = "is not read by this launcher" if name in knobs else "is not a launcher knob"
        print(f"warning: {name} {what} and is ignored; did you mean {meant}?", file=sys.stderr)
PY
}

# Prints the launcher's header comment (its knobs) and the shared knobs.
print_launcher_help() {
    sed -n '2,/^set -euo pipefail/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    echo
    sed -n '2,/^_LAUNCHER_REPO_ROOT=/p' "$_LAUNCHER_REPO_ROOT/scripts/_common.sh" | grep '^#' | sed 's/^# \{0,1\}//'
    echo
    if [ -n "$RECIPE_CONFIG" ]; then
        echo "Defaults from the recipe ${RECIPE_CONFIG#"$_LAUNCHER_REPO_ROOT/"} (a knob set in the environment overrides its line):"
        printf '  %s\n' "${RECIPE_DEFAULTS[@]}"
        echo
    fi
    echo "The flags finetune.py takes after the launcher's name: python -m finetune.train --help"
}

# Prints "cpu", "bf16" or "fp16" (the mixed precision the first GPU supports), then the number of CUDA devices.
detect_accelerator() {
    python -c 'import torch
if not torch.cuda.is_available():
    print("cpu 0")
else:
    print("bf16" if torch.cuda.is_bf16_supported() else "fp16", torch.cuda.device_count())'
}

# Usage: run_finetune OUTPUT_TAG [method flags ...] -- [pass-through flags ...]
# Needs the launcher's recipe (use_recipe), which sets LR, RUN_NAME and DATASET_PATH unless the environment does.
# RECIPE_DROP_KEYS: argument names to leave out of the recipe (its copy OUTPUT_DIR/recipe.yaml is used then).
run_finetune() {
    local output_tag="$1"
    shift
    local method_flags=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
        method_flags+=("$1")
        shift
    done
    [ "$#" -gt 0 ] && shift
    local argument passthrough=() dry_run=0
    for argument in "$@"; do
        case "$argument" in
            --help | -h)
                print_launcher_help
                exit 0
                ;;
            --dry-run) dry_run=1 ;;
            *) passthrough+=("$argument") ;;
        esac
    done
    set -- "${passthrough[@]}"
    warn_misspelled_knobs "${TRAINING_KNOB_ALIASES[@]}"
    [[ "${LR,,}" =~ ^[0-9]*\.?[0-9]+(e[-+]?[0-9]+)?$ ]] || launcher_error "LR must be a number such as 2e-4, got '$LR'"

    if [ -n "${GRAD_ACCUMULARION_STEPS:-}" ] && [ -n "${GRAD_ACCUMULATION_STEPS:-}" ] \
        && [ "$GRAD_ACCUMULARION_STEPS" != "$GRAD_ACCUMULATION_STEPS" ]; then
        launcher_error "GRAD_ACCUMULARION_STEPS=$GRAD_ACCUMULARION_STEPS and GRAD_ACCUMULATION_STEPS=$GRAD_ACCUMULATION_STEPS disagree; set one of them"
    fi
    local nnodes="${NNODES:-1}"
    local node_rank="${NODE_RANK:-0}"
    local knob_flags=() knob flag
    for knob in DEV_BATCH_SIZE=per_device_train_batch_size GRAD_ACCUMULATION_STEPS=gradient_accumulation_steps \
        MAX_STEP=max_steps SAVE_INTERVAL=save_steps; do
        flag="${knob#*=}"
        knob="${knob%%=*}"
        if [ -n "${!knob:-}" ]; then
            require_positive_integer "$knob" "${!knob}"
            knob_flags+=("--$flag" "${!knob}")
        fi
    done
    require_positive_integer NNODES "$nnodes"
    [[ "$node_rank" =~ ^[0-9]+$ ]] || launcher_error "NODE_RANK must be a non-negative integer, got '$node_rank'"
    local autoresume=0
    is_true AUTORESUME_FROM_CHECKPOINT "${AUTORESUME_FROM_CHECKPOINT:-0}" && autoresume=1
    local packing_flags=()
    if [ -n "${PACKING:-}" ]; then
        packing_flags=(--packing false)
        is_true PACKING "$PACKING" && packing_flags=(--packing)
    fi

    local accelerator gpu_count
    read -r accelerator gpu_count < <(detect_accelerator) || true
    [ -n "${accelerator:-}" ] || launcher_error "could not import torch with $(command -v python); activate the \
project's virtual environment (bash scripts/test.sh creates .venv)"
    local num_gpus="${NUM_GPUS:-1}"
    [ "$num_gpus" = "all" ] && num_gpus=$((gpu_count > 0 ? gpu_count : 1))
    require_positive_integer NUM_GPUS "$num_gpus"
    local precision_flags=() device_note
    case "$accelerator" in
        cpu)
            device_note="No CUDA device: training on CPU (fp32, gloo backend) with $num_gpus process(es) per node."
            precision_flags=(--use_cpu --bf16 false)
            local cores
            cores="$(nproc)"
            if ((num_gpus > cores)); then
                echo "warning: NUM_GPUS=$num_gpus but there is no CUDA device and only $cores CPU core(s): $num_gpus \
CPU processes will share them and run slower than one; set NUM_GPUS=1 (or at most $cores)" >&2
            fi
            ;;
        *)
            ((num_gpus <= gpu_count)) || launcher_error "NUM_GPUS=$num_gpus but only $gpu_count CUDA device(s) are visible"
            device_note="Training on $num_gpus of $gpu_count CUDA device(s) per node with $accelerator mixed precision."
            precision_flags=("--$accelerator")
            [ "$accelerator" = bf16 ] || precision_flags+=(--bf16 false)
            ;;
    esac

    local base_model="${BASE_MODEL_PATH:-}"
    if [ -z "$base_model" ]; then
        launcher_error "BASE_MODEL_PATH is not set: set it to your ChatGLM3 model folder, e.g. \
BASE_MODEL_PATH=/path/to/chatglm3-6b bash $0 (to try the pipeline without a download: bash scripts/quickstart.sh)"
    fi
    if [ ! -f "$base_model/config.json" ]; then
        launcher_error "no model at BASE_MODEL_PATH=$base_model (config.json missing). Set BASE_MODEL_PATH to a \
ChatGLM3 folder (e.g. a local copy of chatglm3-6b), or build the tiny test model first: \
python -m finetune.tiny_model --output_dir $_LAUNCHER_REPO_ROOT/output/tiny-chatglm3"
    fi
    if [ ! -f "$DATASET_PATH" ]; then
        launcher_error "no training data at DATASET_PATH=$DATASET_PATH. Convert a data set first (python -m \
data_tools.format_advertise_gen / python -m data_tools.format_tool_alpaca) or set DATASET_PATH to a JSONL file"
    fi

    # TensorBoard logs (OUTPUT_DIR/runs) whenever tensorboard is installed; REPORT_TO overrides (e.g. none, wandb).
    local report_to="${REPORT_TO:-}"
    if [ -z "$report_to" ]; then
        report_to=none
        python -c "import tensorboard" 2>/dev/null && report_to=tensorboard
    fi

    local resume_flags=()
    local output_dir
    if [ "$autoresume" = 1 ]; then
        output_dir="${OUTPUT_DIR:-$_LAUNCHER_REPO_ROOT/output/$RUN_NAME-$output_tag}"
        resume_flags=(--resume_from_checkpoint auto)
    else
        output_dir="${OUTPUT_DIR:-$_LAUNCHER_REPO_ROOT/output/$RUN_NAME-$(date +%Y%m%d-%H%M%S)-$output_tag}"
    fi
    mkdir -p "$output_dir"

    local stop_timeout="${STOP_TIMEOUT:-600}"
    require_positive_integer STOP_TIMEOUT "$stop_timeout"
    local rendezvous
    if ((nnodes > 1)) || [ -n "${MASTER_PORT:-}" ] || [ -n "${MASTER_ADDR:-}" ]; then
        rendezvous=(--nnodes "$nnodes" --node_rank "$node_rank"
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
    else
        rendezvous=(--standalone --nnodes 1)
    fi
    local starter=(env "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$stop_timeout"
        python -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node "$num_gpus")
    if ((num_gpus == 1 && nnodes == 1)) && [[ " ${method_flags[*]} $* " != *" --deepspeed "* ]]; then
        starter=(python)
    fi

    local recipe="$RECIPE_CONFIG"
    if [ -n "${RECIPE_DROP_KEYS:-}" ]; then
        recipe="$output_dir/recipe.yaml"
        # shellcheck disable=SC2086 # RECIPE_DROP_KEYS is a list of argument names
        python "$_LAUNCHER_REPO_ROOT/scripts/_recipe.py" without "$RECIPE_CONFIG" "$recipe" $RECIPE_DROP_KEYS || exit 2
    fi
    local command=("${starter[@]}" -m "${_LAUNCHER_ENTRY_MODULE:-finetune.train}" "$recipe"
        --model_name_or_path "$base_model"
        --train_file "$DATASET_PATH"
        --output_dir "$output_dir"
        --run_name "$RUN_NAME"
        "${knob_flags[@]}"
        --learning_rate "$LR"
        --report_to "$report_to"
        "${precision_flags[@]}"
        "${packing_flags[@]}"
        "${resume_flags[@]}"
        "${method_flags[@]}"
        "$@")
    if ((dry_run)); then
        printf '%q ' "${command[@]}"
        echo
        return 0
    fi
    local log_file="$output_dir/train.log"
    {
        echo "===== $(date '+%Y-%m-%d %H:%M:%S') $(basename "$0") on $(hostname)"
        echo "$device_note"
        printf '%q ' "${command[@]}"
        echo
    } | tee -a "$log_file"
    local log_start
    log_start=$(($(wc -l <"$log_file") + 1))
    local status=0
    run_and_forward_signals "$stop_timeout" "$log_file" "${command[@]}" || status=$?
    if ((status != 0)); then
        # The one useful line can sit above torchrun's report of the failed process: repeat it last.
        local reason
        reason="$(tail -n "+$log_start" "$log_file" | grep -m 1 -E '^(\[rank [0-9]+\] )?(error|stopped): ' || true)"
        echo "training exited with status $status; full log: $log_file" >&2
        [ -n "$reason" ] && echo "$reason" >&2
        exit "$status"
    fi
}

# Usage: run_and_forward_signals STOP_TIMEOUT LOG_FILE COMMAND... Runs COMMAND in its own process group, its output
# teed into LOG_FILE, and returns its exit status. SIGINT/SIGTERM/SIGHUP to the launcher, or to the launcher's whole
# process group (Ctrl-C, timeout, Slurm, Kubernetes), reach the command's group once, from here; the launcher then
# waits for the checkpoint save and the command's last line, and kills the group after STOP_TIMEOUT seconds.
run_and_forward_signals() {
    local stop_timeout="$1" log_file="$2"
    shift 2
    local log_fd tee_pid child stop_signal="" deadline=0
    # tee ignores SIGINT/SIGTERM, so that it keeps logging while training saves its checkpoint.
    exec {log_fd}> >(trap '' INT TERM HUP && exec tee -a "$log_file")
    tee_pid=$!
    set -m # the command gets a process group of its own, which signals to the launcher's group do not reach
    "$@" </dev/null >&"$log_fd" 2>&1 &
    child=$!
    set +m
    exec {log_fd}>&-
    local forwarded_at=0
    forward_stop() {
        # One request can arrive twice (timeout signals the launcher, then its group): forward it once; a signal
        # repeated later is forwarded too (training then quits at once, without saving).
        if [ -n "$stop_signal" ] && ((SECONDS - forwarded_at < 2)); then
            return
        fi
        [ -n "$stop_signal" ] || deadline=$((SECONDS + stop_timeout))
        stop_signal="$1"
        forwarded_at=$SECONDS
        kill "-$1" -- "-$child" 2>/dev/null || true
    }
    trap 'forward_stop INT' INT
    trap 'forward_stop TERM' TERM HUP
    while kill -0 "$child" 2>/dev/null; do
        if [ -z "$stop_signal" ]; then
            wait "$child" 2>/dev/null || true # returns when the command ends or a trapped signal arrives
        else
            ((SECONDS < deadline)) || kill -KILL -- "-$child" 2>/dev/null || true
            sleep 1 || true # a signal to the whole group ends the sleep too
        fi
    done
    trap - INT TERM HUP
    local status=0
    wait "$child" || status=$?
    wait "$tee_pid" 2>/dev/null || true
    if [ -n "$stop_signal" ] && ((status == 137)); then
        echo "stopped: training did not finish saving within STOP_TIMEOUT=${stop_timeout}s after SIG$stop_signal and \
was killed; the newest complete checkpoint-N in its output_dir is where --resume_from_checkpoint auto continues" \
            >>"$log_file"
    fi
    return "$status"
}

# Appends "--FLAG VALUE" to the array named $1 when VALUE is not empty.
add_optional_flag() {
    local -n _optional_flag_target="$1"
    [ -n "$3" ] && _optional_flag_target+=("$2" "$3")
    return 0
}

# Usage: add_knob_flags ARRAY KNOB=argument ... Appends "--argument VALUE" to the array named ARRAY for every KNOB
# that has a value (set in the environment or by the recipe).
add_knob_flags() {
    local -n _knob_flags_target="$1"
    shift
    local pair knob
    for pair in "$@"; do
        knob="${pair%%=*}"
        [ -n "${!knob:-}" ] && _knob_flags_target+=("--${pair#*=}" "${!knob}")
    done
    return 0
}
