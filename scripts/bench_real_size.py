#!/usr/bin/env python
"""The whole toolkit on a chatglm3-6b-shaped folder on the CPU in bf16, with the peak RSS of every stage.

    python scripts/benchmark.py --real_size [--layers N] [--format safetensors|bin] [--model_dir DIR] [--work_dir DIR]

Each stage runs as its own process (the project's command-line tools where there is one), so its peak resident
memory is its own: the parent reads it from os.wait4's resource usage. One JSON line per stage: stage, seconds,
peak_gib, the memory preflight's estimate (estimated_gib: the training estimate for training stages, the bf16
weights for loading and inference), what was loaded and from which layout. Stages: build (unless --model_dir),
load_train, lora, ptuning, qlora (where bitsandbytes' CPU path allows), resume, export_merged, infer_lora,
infer_ptuning, infer_qlora, infer_merged, server.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import torch
from transformers import TrainerCallback

from finetune.arguments import ModelArguments
from finetune.memory_preflight import GIB, run_preflight
from finetune.methods.base import load_base_model
from finetune.model.configuration import ChatGLMConfig
from finetune.real_size_model import CHATGLM3_6B_LAYERS, weight_bytes
from finetune.tiny_model import default_corpus
from finetune.train import configure_logging, parse_arguments, run

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENS_PER_ROW = 256  # the default row length (--tokens)


def row_lengths(tokens: int) -> tuple[int, int]:
    """(max_source_length, max_target_length) that truncate every training row to exactly `tokens` tokens: the
    source ([gMASK] sop + prompt) + response + eos (256 tokens: 130 + 125 + 1)."""
    source = tokens // 2 + 2
    return source, tokens - source - 1


PRE_SEQ_LEN = 128
LORA_RANK = 8
NEW_TOKENS = 16
STAGE_TIMEOUT_S = 3 * 3600
STAGES = (
    "load_train",
    "lora",
    "ptuning",
    "qlora",
    "resume",
    "export_merged",
    "infer_base",
    "infer_lora",
    "infer_ptuning",
    "infer_qlora",
    "infer_merged",
    "server",
)
DEFAULT_STAGES = tuple(stage for stage in STAGES if stage != "infer_base")
# Loading may peak at most this many times the bf16 weight bytes (point 3 of the real-size issue).
LOAD_BOUNDS = {"safetensors": 1.15, "bin": 1.3}


@dataclass
class StageResult:
    """One stage's measurements, printed as a JSON line."""

    stage: str
    seconds: float
    peak_gib: float
    estimated_gib: float | None
    loaded: str
    layout: str
    extra: dict = field(default_factory=dict)

    def as_json(self) -> str:
        """The JSON line."""
        fields = {
            "stage": self.stage,
            "seconds": round(self.seconds, 1),
            "peak_gib": round(self.peak_gib, 3),
            "estimated_gib": None if self.estimated_gib is None else round(self.estimated_gib, 3),
            "loaded": self.loaded,
            "layout": self.layout,
        }
        return json.dumps({**fields, **self.extra})


class StageFailed(RuntimeError):
    """A stage's process ended with an error."""


class MeasuredProcess:
    """A stage's process; `finished()` reaps it (once) with its resource usage, without Popen.poll (which would
    reap it and lose the usage)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.status: int | None = None
        self.usage = None

    def finished(self, block: bool = False) -> bool:
        """True once the process has ended (waiting for it with `block`)."""
        if self.status is None:
            pid, status, usage = os.wait4(self.process.pid, 0 if block else os.WNOHANG)
            if pid:
                self.status, self.usage = os.waitstatus_to_exitcode(status), usage
                self.process.returncode = self.status
        return self.status is not None


def run_measured(command: list[str], log: Path, during=None) -> tuple[float, float]:
    """Run `command` (output to `log`), optionally calling `during(measured)` while it runs and then stopping it;
    (seconds, peak RSS GiB). StageFailed when a stage without `during` exits with an error."""
    start = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w", encoding="utf-8") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, env=environment)
    measured = MeasuredProcess(process)
    watchdog = threading.Timer(STAGE_TIMEOUT_S, process.kill)
    watchdog.daemon = True  # an error in this process must not wait hours for the timer
    watchdog.start()
    try:
        if during is not None:
            during(measured)
    finally:
        if during is not None and not measured.finished():
            process.terminate()
        measured.finished(block=True)
        watchdog.cancel()
    seconds = time.perf_counter() - start
    if measured.status != 0 and during is None:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise StageFailed(f"{' '.join(command[:4])} ... exited with {measured.status}; {log}:\n" + "\n".join(tail))
    return seconds, measured.usage.ru_maxrss * 1024 / GIB


def layout_of(folder: Path) -> str:
    """'7 safetensors shards', '1 bin file', ... for a model folder (or 'adapter only' for an adapter folder)."""
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not shards:
        return "no weights"
    kind = "safetensors" if shards[0].suffix == ".safetensors" else "bin"
    size = sum(path.stat().st_size for path in shards) / GIB
    return f"{len(shards)} {kind} file(s), {size:.2f} GiB"


def write_training_rows(path: Path, count: int) -> None:
    """Prompt/response records long enough that every encoded row is truncated to the row length (256 tokens or
    fewer, as --tokens says)."""
    lines = default_corpus(num_products=40)
    records = []
    for index in range(count):
        prompt = " ".join(lines[(index * 7) % len(lines) :][:80])
        response = " ".join(lines[(index * 11 + 3) % len(lines) :][:80])
        records.append({"prompt": prompt, "response": response})
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def training_argv(
    model: Path, data: Path, output: Path, cache: Path, budget_gib: float, tokens: int, **flags
) -> list[str]:
    """finetune.train arguments: bf16 on the CPU, batch 1 x `tokens`-token rows, --recompute auto within the budget."""
    max_source_length, max_target_length = row_lengths(tokens)
    settings = {
        "model_name_or_path": model,
        "train_file": data,
        "data_format": "input_output",
        "output_dir": output,
        "data_cache_dir": cache,
        "do_train": True,
        "use_cpu": True,
        "bf16": True,
        "per_device_train_batch_size": 1,
        "max_source_length": max_source_length,
        "max_target_length": max_target_length,
        "memory_budget_gib": budget_gib,
        "logging_steps": 1,
        "learning_rate": 1e-4,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "report_to": "none",
        "print_first_example": False,
        **flags,
    }
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    return argv


def training_estimate(argv: list[str], tokens: int) -> tuple[float, float, str]:
    """The memory preflight's estimate for these training arguments, as finetune.train makes it on the CPU:
    (total GiB, weights GiB, recompute plan)."""
    model_args, data_args, training_args = parse_arguments(argv)
    config = ChatGLMConfig.from_pretrained(
        model_args.model_name_or_path,
        pre_seq_len=model_args.pre_seq_len,
        prefix_projection=model_args.prefix_projection,
    )
    estimate = run_preflight(config, model_args, data_args, training_args, seq_length=tokens)
    return estimate.total / GIB, estimate.weights / GIB, estimate.setup.recompute.describe(config.num_layers)


def load_stage(model: str) -> None:
    """The load_train stage's process: load the base for training and touch every weight; print a JSON line."""
    model_args = ModelArguments(model_name_or_path=model)
    loaded = load_base_model(model_args, torch.bfloat16)
    checksum = 0.0
    with torch.no_grad():
        for parameter in loaded.parameters():
            checksum += (
                float(parameter.float().sum())
                if parameter.numel() < 2**24
                else float(parameter.view(-1)[:: 4096 // parameter.element_size()].float().sum())
            )
    size = sum(parameter.numel() * parameter.element_size() for parameter in loaded.parameters())
    dtypes = sorted({str(parameter.dtype) for parameter in loaded.parameters()})
    print(json.dumps({"parameter_bytes": size, "dtypes": dtypes, "checksum": checksum}), flush=True)


def memory_status() -> dict[str, int]:
    """This process's resident memory in bytes: anonymous (allocations) and file-backed (mmap'ed weights)."""
    fields = {}
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class MemoryProbe(TrainerCallback):
    """Samples this process's anonymous RSS from the start of training to its end, and times every step.

    The frozen bf16 base stays mapped from its files (file-backed RSS); what training adds (adapters, gradients,
    optimizer states, activations, logits) is anonymous memory, so its growth is training's extra memory.
    """

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.at_start: dict[str, int] = {}
        self.peak_anon = 0
        self.step_seconds: list[float] = []
        self._step_start = 0.0
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while self._running.is_set():
            self.peak_anon = max(self.peak_anon, memory_status()["RssAnon"])
            time.sleep(self.interval_s)

    def on_train_begin(self, args, state, control, **kwargs):
        """Record the memory after loading and start sampling."""
        self.at_start = memory_status()
        self.peak_anon = self.at_start["RssAnon"]
        self._running.set()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        """Start the step's clock."""
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        """Stop the step's clock."""
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_end(self, args, state, control, **kwargs):
        """Stop sampling."""
        self._running.clear()
        if self._thread is not None:
            self._thread.join()


def train_stage(argv: list[str]) -> None:
    """A training stage's process: finetune.train's run with a MemoryProbe; print its figures as a JSON line."""
    model_args, data_args, training_args = parse_arguments(argv)
    configure_logging(training_args)
    probe = MemoryProbe()
    run(model_args, data_args, training_args, extra_callbacks=(probe,))
    figures = {
        "anon_at_start_gib": probe.at_start["RssAnon"] / GIB,
        "file_at_start_gib": probe.at_start["RssFile"] / GIB,
        "peak_anon_gib": probe.peak_anon / GIB,
        "step_seconds": probe.step_seconds,
    }
    print(json.dumps(figures), flush=True)


def ask_server(port: int, measured: MeasuredProcess, answers: list) -> None:
    """Wait for the server's /health, ask one chat completion of 16 tokens, keep the reply in `answers`."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if measured.finished():
            raise StageFailed(f"the API server exited with {measured.status} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    body = {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "你好"}], "max_tokens": NEW_TOKENS}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=STAGE_TIMEOUT_S)
    if reply.status_code != 200:
        raise StageFailed(f"the API server answered {reply.status_code}: {reply.text[:300]}")
    answers.append(reply.json())


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_budget_gib() -> float:
    """90 percent of this machine's memory: what --recompute auto plans for on the CPU here."""
    return round(0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)


def run_stages(args: argparse.Namespace) -> list[StageResult]:
    """The selected stages in order, each printed as it finishes; stops at the first failure (raised)."""
    stages = set(args.stages.split(","))
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"error: --stages: unknown stage(s) {', '.join(sorted(unknown))}; use {', '.join(STAGES)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    python = sys.executable
    results: list[StageResult] = []

    def report(result: StageResult) -> None:
        results.append(result)
        print(result.as_json(), flush=True)

    model = Path(args.model_dir) if args.model_dir else work / "model"
    if not args.model_dir:
        command = [
            python,
            "-m",
            "finetune.tiny_model",
            "--preset",
            "chatglm3-6b",
            "--layers",
            str(args.layers),
            "--format",
            args.format,
            "--output_dir",
            str(model),
            "--overwrite",
        ]
        seconds, peak = run_measured(command, logs / "build.log")
        report(StageResult("build", seconds, peak, None, "random bf16 weights written", layout_of(model)))
    config = ChatGLMConfig.from_pretrained(model)
    weights_gib = weight_bytes(model) / GIB
    layout = layout_of(model)
    shape = f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {config.padded_vocab_size}"

    if "load_train" in stages:
        log = logs / "load_train.log"
        seconds, peak = run_measured([python, str(Path(__file__).resolve()), "--load", str(model)], log)
        loaded = json.loads(log.read_text(encoding="utf-8").strip().splitlines()[-1])
        baseline = import_baseline_gib(python, logs)
        weight_format = "safetensors" if "safetensors" in layout else "bin"
        report(
            StageResult(
                "load_train",
                seconds,
                peak,
                weights_gib,
                f"base model for training ({shape}), {', '.join(loaded['dtypes'])}",
                layout,
                {
                    "weight_gib": round(weights_gib, 3),
                    "peak_over_weights": round(peak / weights_gib, 3),
                    "imports_gib": round(baseline, 3),
                    "peak_less_imports_over_weights": round((peak - baseline) / weights_gib, 3),
                    "bound": LOAD_BOUNDS[weight_format],
                },
            )
        )

    data = work / "train.jsonl"
    write_training_rows(data, 8)
    cache = work / "cache"
    budget = args.memory_budget_gib or default_budget_gib()

    def train(stage: str, output: Path, loaded_what: str, steps: int, trained_steps: int, **flags) -> None:
        argv = training_argv(
            model, data, output, cache, budget, args.tokens, max_steps=steps, save_steps=steps, **flags
        )
        estimate, estimate_weights, plan = training_estimate(argv, args.tokens)
        log = logs / f"{stage}.log"
        seconds, peak = run_measured([python, str(Path(__file__).resolve()), "--train", *argv], log)
        probe = json.loads(log.read_text(encoding="utf-8").strip().splitlines()[-1])
        steps_run = probe["step_seconds"]
        if len(steps_run) != trained_steps:
            raise StageFailed(f"{stage}: expected {trained_steps} optimizer steps, the run made {len(steps_run)}")
        measured_extra = probe["peak_anon_gib"] - probe["anon_at_start_gib"]
        estimated_extra = estimate - estimate_weights
        report(
            StageResult(
                stage,
                seconds,
                peak,
                estimate,
                loaded_what,
                layout,
                {
                    "recompute": plan,
                    "steps": trained_steps,
                    "step_s": [round(value, 1) for value in steps_run],
                    "tokens_per_s": round(args.tokens / steps_run[-1], 2),
                    "estimated_weights_gib": round(estimate_weights, 3),
                    "estimated_extra_gib": round(estimated_extra, 3),
                    "measured_extra_gib": round(measured_extra, 3),
                    "extra_ratio": round(measured_extra / estimated_extra, 3),
                    "anon_at_start_gib": round(probe["anon_at_start_gib"], 3),
                    "file_at_start_gib": round(probe["file_at_start_gib"], 3),
                    "checkpoint": layout_of(output / f"checkpoint-{steps}"),
                },
            )
        )

    lora, ptuning, qlora, merged = work / "lora", work / "ptuning", work / "qlora", work / "merged"
    if "lora" in stages:
        train("lora", lora, f"base bf16 + LoRA r{LORA_RANK}, batch 1 x {args.tokens}", 2, 2, lora_rank=LORA_RANK)
    if "ptuning" in stages:
        train("ptuning", ptuning, f"base bf16 + prefix pre_seq_len {PRE_SEQ_LEN}", 1, 1, pre_seq_len=PRE_SEQ_LEN)
    if "qlora" in stages:
        try:
            train(
                "qlora",
                qlora,
                f"base 4-bit (bitsandbytes nf4) + LoRA r{LORA_RANK}",
                1,
                1,
                lora_rank=LORA_RANK,
                quantization_bit=4,
            )
        except StageFailed as error:
            report(
                StageResult(
                    "qlora",
                    0.0,
                    0.0,
                    None,
                    "not run: bitsandbytes' CPU path failed",
                    layout,
                    {"error": str(error).splitlines()[-1][:300]},
                )
            )
    if "resume" in stages:
        train(
            "resume",
            lora,
            "LoRA checkpoint-2 resumed for one more step",
            3,
            1,
            lora_rank=LORA_RANK,
            resume_from_checkpoint=lora / "checkpoint-2",
        )
    lora_checkpoint = lora / "checkpoint-3" if "resume" in stages else lora / "checkpoint-2"

    if "export_merged" in stages:
        seconds, peak = run_measured(
            [
                python,
                "inference/export.py",
                "--model",
                str(lora_checkpoint),
                "--output_dir",
                str(merged),
                "--overwrite",
            ],
            logs / "export_merged.log",
        )
        report(
            StageResult(
                "export_merged",
                seconds,
                peak,
                weights_gib,
                f"LoRA {lora_checkpoint.name} merged",
                layout,
                {"written": layout_of(merged)},
            )
        )

    for stage, folder in (
        ("infer_base", model),
        ("infer_lora", lora_checkpoint),
        ("infer_ptuning", ptuning / "checkpoint-1"),
        ("infer_qlora", qlora / "checkpoint-1"),
        ("infer_merged", merged),
    ):
        if stage not in stages or (stage == "infer_qlora" and not folder.is_dir()):
            continue
        log = logs / f"{stage}.log"
        seconds, peak = run_measured(
            [
                python,
                "inference.py",
                "--model",
                str(folder),
                "--prompt",
                "你好",
                "--max_new_tokens",
                str(NEW_TOKENS),
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
            ],
            log,
        )
        report(
            StageResult(
                stage,
                seconds,
                peak,
                weights_gib,
                f"{folder.name} for inference, {NEW_TOKENS} new tokens",
                layout_of(folder) if folder in (model, merged) else layout,
            )
        )

    if "server" in stages:
        served = lora_checkpoint if lora_checkpoint.is_dir() else model
        port = free_port()
        answers: list = []
        seconds, peak = run_measured(
            [
                python,
                "inference/api_server.py",
                "--model",
                f"chatglm3-6b={served}",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
                "--log_level",
                "warning",
            ],
            logs / "server.log",
            during=lambda measured: ask_server(port, measured, answers),
        )
        report(
            StageResult(
                "server",
                seconds,
                peak,
                weights_gib,
                f"{served.name} served, one chat completion",
                layout,
                {"completion_tokens": answers[0]["usage"]["completion_tokens"]},
            )
        )
    if not args.keep:
        shutil.rmtree(work if args.work_dir is None else merged, ignore_errors=True)
        if args.work_dir is not None and not args.model_dir:
            shutil.rmtree(model, ignore_errors=True)
    return results


def import_baseline_gib(python: str, logs: Path) -> float:
    """Peak RSS of a process that only imports what loading imports (the interpreter, torch, transformers)."""
    command = [python, "-c", "import finetune.methods.base, finetune.model"]
    return run_measured(command, logs / "imports.log")[1]


def main(argv: list[str] | None = None) -> list[StageResult]:
    """Command line: run the stages (or be the process of the load or a training stage)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--train", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=CHATGLM3_6B_LAYERS)
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    parser.add_argument("--model_dir", default=None, help="an existing chatglm3-6b-shaped folder (else one is built)")
    parser.add_argument("--work_dir", default=None, help="where checkpoints and logs go (default: a temp folder)")
    parser.add_argument(
        "--memory_budget_gib",
        type=float,
        default=None,
        help="what --recompute auto plans for (default: 90 percent of this machine's RAM)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the built model and the merged export")
    parser.add_argument("--tokens", type=int, default=TOKENS_PER_ROW, help="tokens per training row (batch 1)")
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated, from {', '.join(STAGES)} (default: all but infer_base)",
    )
    args = parser.parse_args(argv)
    if args.load:
        load_stage(args.load)
        return []
    if args.train:
        train_stage(args.train)
        return []
    return run_stages(args)


if __name__ == "__main__":
    main()
