#!/usr/bin/env python
"""Training-throughput benchmark on a ChatGLM3-shaped model with random weights (nothing is downloaded).

It uses the project's own code path: our model, `finetune.methods.apply_method` (freezing, PEFT LoRA, fp32 trainables,
bitsandbytes for QLoRA through `load_base_model`), the memory preflight's recompute plan (`--recompute auto`, as
training does), bf16 autocast (what the Trainer's --bf16 runs under), our collator and packing. Each run prints one
JSON line with tokens/s, samples/s, step time, measured peak memory, the estimate and the recompute plan.

--method is any method of finetune/methods/; the benchmark asks it (never its name) for its size option (--lora_rank,
--pre_seq_len, --trainable_layers), whether its base loads quantized, the prefix tokens it adds and its preference
reference.

Fixed-shape mode (the recipe of the official finetune demo: frozen bf16 base, fp32 trainables, AdamW; each row
batch x seq tokens with the first third of its labels masked):
    python scripts/benchmark.py --method lora --batch 4 --seq 768 --memory_budget_gib 15
    python scripts/benchmark.py --method ptuning --pre_seq_len 128 --batch 1 --seq 2048 --memory_budget_gib 13
    python scripts/benchmark.py --method qlora --batch 1 --seq 1024 --memory_budget_gib 6
    python scripts/benchmark.py --method lora --recompute full      # every layer recomputed (the official recipe)
Realistic mode (AdvertiseGen-shaped examples: prompts of 20-60 tokens, responses of 60-200; reports samples/s):
    python scripts/benchmark.py --method lora --realistic packed
    python scripts/benchmark.py --method lora --realistic dynamic     # official v2: dynamic padding, batch 4
    python scripts/benchmark.py --method lora --realistic fixed       # official v1: every row padded to 1153
CPU mode (a small shape, for regression tracking without a GPU):
    python scripts/benchmark.py --cpu --method lora
Preference (DPO) mode: each step trains --batch pairs, two rows of --seq tokens each, with the reference pass (the
method's reference context: LoRA adapter / P-Tuning prefix disabled; full and freeze tuning compare with the starting
model's log-probabilities, computed once as training caches them); reports pairs/s. SFT at the same shape is the
fixed-shape mode with twice the batch:
    python scripts/benchmark.py --cpu --method lora --preference --batch 1 --seq 512
    python scripts/benchmark.py --cpu --method lora --batch 2 --seq 512
Every target of the performance issue, with the official-recipe anchor at the same shapes, in one command (a JSON
line per run, then a Markdown table):
    python scripts/benchmark.py --suite [--anchor ../shared/bench/anchor_native_glm.py]
    python scripts/benchmark.py --suite --cpu --steps 1 --warmup 0     # the suite's plumbing on the CPU shape
Evaluation speed (batched generation vs one example at a time, tiny model on the CPU; scripts/bench_evaluation.py):
    python scripts/benchmark.py --evaluation
Serving (an OpenAI-compatible server with continuous batching vs one request at a time; options: bench_serving.py):
    python scripts/benchmark.py --serving
The whole toolkit on a chatglm3-6b-shaped folder on the CPU, a JSON line with peak RSS per stage (bench_real_size.py):
    python scripts/benchmark.py --real_size [--layers 2] [--format bin] [--model_dir DIR] [--work_dir DIR]
"""

import argparse
import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

from finetune.arguments import ModelArguments
from finetune.data.collator import RightPaddingCollator, pack_examples, packed_attention_stretch
from finetune.memory_preflight import (
    GIB,
    TrainingSetup,
    estimate_training_memory,
    free_device_memory,
    plan_recompute,
    recompute_budget,
)
from finetune.methods import METHODS, apply_method, method_named, method_options
from finetune.methods.base import load_base_model
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.model.configuration import CHATGLM3_6B_FIELDS
from finetune.preference_loss import dpo_loss
from finetune.recompute import RECOMPUTE_AUTO, RECOMPUTE_CHOICES, RecomputePlan, apply_recompute_plan

OFFICIAL_V1_ROW_LENGTH = 1024 + 128 + 1
CPU_SHAPE = dict(multi_query_attention=True, num_layers=2, hidden_size=256, num_attention_heads=8, kv_channels=32,
                 multi_query_group_num=2, ffn_hidden_size=688, padded_vocab_size=8192)
# The benchmark's default for each method's size option (FinetuneMethod.selecting_option); an option not listed here
# has no default and must be given.
SIZE_DEFAULTS = {"pre_seq_len": 128, "lora_rank": 8, "trainable_layers": 2}


def size_options() -> dict[str, list[str]]:
    """Every method's size option (its selecting_option, a field of its options dataclass) and the methods it sizes."""
    options: dict[str, list[str]] = {}
    for method in METHODS.values():
        if method.selecting_option:
            options.setdefault(method.selecting_option, []).append(method.name)
    return options


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=tuple(METHODS), default="lora",
                        help="a fine-tuning method of finetune/methods/ (its size option below)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES, default=RECOMPUTE_AUTO,
                        help="activation recomputation; auto plans for --memory_budget_gib (default: 90%% of free GPU "
                        "memory; on CPU: none)")
    parser.add_argument("--memory_budget_gib", type=float, default=None)
    for option, names in size_options().items():
        default = SIZE_DEFAULTS.get(option)
        parser.add_argument(f"--{option}", type=int, default=default,
                            help=f"the size option of --method {', '.join(names)} (default: {default})")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cpu", action="store_true", help="small shape on the CPU, fp32")
    parser.add_argument("--realistic", choices=["packed", "dynamic", "fixed"], default=None)
    parser.add_argument("--examples", type=int, default=256, help="realistic mode: number of synthetic examples")
    parser.add_argument("--pack_length", type=int, default=2048, help="realistic packed mode: tokens per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suite", action="store_true", help="run every performance target and the anchor")
    parser.add_argument("--evaluation", action="store_true",
                        help="instead: batched evaluation vs one example at a time (scripts/bench_evaluation.py)")
    parser.add_argument("--anchor", default=None, help="the anchor script (default: $CHATGLM_SHARED_DIR or ../shared)")
    parser.add_argument("--serving", action="store_true", help="run the serving benchmark (scripts/bench_serving.py)")
    parser.add_argument("--preference", action="store_true",
                        help="DPO steps on --batch pairs of two --seq-token rows, reference pass included")
    parser.add_argument("--real_size", action="store_true",
                        help="instead: every stage on a chatglm3-6b-shaped folder on the CPU with its peak RSS "
                        "(scripts/bench_real_size.py; with --layers, --format, --model_dir, --work_dir, --stages, "
                        "--keep)")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors",
                        help="--real_size: weight files of the built folder")
    parser.add_argument("--model_dir", default=None, help="--real_size: use this chatglm3-6b-shaped folder")
    parser.add_argument("--work_dir", default=None, help="--real_size: checkpoints and logs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="--real_size: keep the built model and merged export")
    parser.add_argument("--stages", default=None, help="--real_size: comma-separated stages (default: all)")
    parser.add_argument("--tokens", type=int, default=None, help="--real_size: tokens per training row (default 256)")
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> ChatGLMConfig:
    """ChatGLM3-6B shape (with --layers), or the small CPU shape."""
    shape = dict(CPU_SHAPE) if args.cpu else {**CHATGLM3_6B_FIELDS, "num_layers": args.layers}
    return ChatGLMConfig(**shape, use_cache=False)


def random_base(config: ChatGLMConfig, dtype: torch.dtype, device: str) -> ChatGLMForConditionalGeneration:
    """A model of `config` with random weights (std 0.02, norms 1), built directly on `device`."""
    with torch.device(device):
        model = ChatGLMForConditionalGeneration(config).to(dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return model


def method_arguments(args: argparse.Namespace) -> dict:
    """The size option of the benchmarked method (its selecting_option: rank, prefix length, trained layers)."""
    option = method_named(args.method).selecting_option
    return {option: getattr(args, option)} if option else {}


def build_model(args: argparse.Namespace, config: ChatGLMConfig, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model to train, prepared by the project's method code (a base quantized to 4 bits when the method trains
    on one; with the prefix the method adds)."""
    method = method_named(args.method)
    method_args = method_arguments(args)
    if method.needs_quantized_base:
        with tempfile.TemporaryDirectory() as folder:
            random_base(config, torch.bfloat16, "cpu").save_pretrained(folder)
            model_args = ModelArguments(
                model_name_or_path=folder, method=method.name, quantization_bit=4, **method_args
            )
            model = load_base_model(model_args, torch.bfloat16)
    else:
        model_args = ModelArguments(model_name_or_path="random-weights", method=method.name, **method_args)
        config.pre_seq_len = method.prefix_tokens(model_args) or None
        model = random_base(config, dtype, device)
    return apply_method(model, model_args).train()


def training_setup(
    args: argparse.Namespace, dtype: torch.dtype, packed_rows: datasets.Dataset | None
) -> TrainingSetup:
    """The memory preflight's view of this run (rows of the longest realistic/packed length in realistic mode)."""
    seq_length = {"packed": args.pack_length, "fixed": OFFICIAL_V1_ROW_LENGTH, "dynamic": 2 + 60 + 200 + 1}
    method = method_named(args.method)
    options = method_options(method.name, **method_arguments(args))
    stretch = None
    if packed_rows is not None:
        stretch = packed_attention_stretch(packed_rows, method.prefix_tokens(options))
    return TrainingSetup(
        method=method.name,
        batch_size=args.batch,
        seq_length=seq_length[args.realistic] if args.realistic else args.seq,
        weight_dtype=dtype,
        options=options,
        quantization_bit=4 if method.needs_quantized_base else None,
        attention_stretch=stretch,
        sequences_per_example=2 if args.preference else 1,
        reference_pass=args.preference,
    )


def recompute_plan(args: argparse.Namespace, config: ChatGLMConfig, setup: TrainingSetup, device: str) -> RecomputePlan:
    """--recompute as a plan; auto asks the memory preflight for the least recomputation that fits the budget."""
    if args.recompute != RECOMPUTE_AUTO:
        return RecomputePlan.uniform(args.recompute, config.num_layers)
    budget = recompute_budget(args.memory_budget_gib, free_device_memory() if device == "cuda" else None)
    return plan_recompute(config, setup, budget) if budget is not None else RecomputePlan()


def fixed_batches(args: argparse.Namespace, vocab: int, device: str):
    """The same batch x seq batch every step, first third of each row's labels masked (preference mode: 2 x batch
    rows, the chosen sides then the rejected sides)."""
    rows = 2 * args.batch if args.preference else args.batch
    input_ids = torch.randint(10, vocab - 100, (rows, args.seq), device=device)
    labels = input_ids.clone()
    labels[:, : args.seq // 3] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    while True:
        yield batch, args.batch


def realistic_examples(count: int, vocab: int, seed: int) -> list[dict]:
    """AdvertiseGen-shaped encoded examples: [gMASK] sop + 20-60 prompt tokens + 60-200 response tokens + eos."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        prompt = [rng.randrange(10, vocab - 100) for _ in range(rng.randint(20, 60))]
        response = [rng.randrange(10, vocab - 100) for _ in range(rng.randint(60, 200))] + [2]
        input_ids = [1, 3] + prompt + response
        examples.append({"input_ids": input_ids, "labels": [-100] * (2 + len(prompt)) + response})
    return examples


def packed_realistic_rows(args: argparse.Namespace, vocab: int) -> datasets.Dataset:
    """The synthetic AdvertiseGen-shaped examples packed into rows of --pack_length tokens."""
    examples = datasets.Dataset.from_list(realistic_examples(args.examples, vocab, args.seed))
    return pack_examples(examples, args.pack_length)


def realistic_batches(args: argparse.Namespace, vocab: int, device: str, packed_rows: datasets.Dataset | None):
    """Batches of synthetic AdvertiseGen-shaped examples in the chosen layout (packed: from `packed_rows`), forever."""
    examples = realistic_examples(args.examples, vocab, args.seed)
    collator = RightPaddingCollator(pad_token_id=0)
    if packed_rows is not None:
        counts = packed_rows["segments"]
        rows = [dict(row) for row in packed_rows.remove_columns(["length", "segments", "longest"])]
        groups = [(rows[i : i + args.batch], sum(counts[i : i + args.batch])) for i in range(0, len(rows), args.batch)]
    else:
        collator.max_length = OFFICIAL_V1_ROW_LENGTH if args.realistic == "fixed" else None
        groups = [(examples[i : i + args.batch], len(examples[i : i + args.batch]))
                  for i in range(0, len(examples), args.batch)]
    batches = [({k: v.to(device) for k, v in collator(group).items()}, count) for group, count in groups]
    while True:
        yield from batches


@dataclasses.dataclass(frozen=True)
class SuiteRow:
    """One target of the performance issue: our run, the anchor at the same shape (if any), and the target."""

    name: str
    ours: tuple[str, ...]
    anchor: tuple[str, ...] | None
    min_tokens_per_s: float | None = None
    max_peak_gib: float | None = None


SUITE = (
    SuiteRow("lora-4x768", ("--method", "lora", "--batch", "4", "--seq", "768", "--memory_budget_gib", "15"),
             ("--batch", "4", "--seq", "768", "--gc", "1"), 21000, 15),
    SuiteRow("ptuning-4x768",
             ("--method", "ptuning", "--batch", "4", "--seq", "768", "--memory_budget_gib", "15"), None, 21000, 15),
    SuiteRow("lora-4x192", ("--method", "lora", "--batch", "4", "--seq", "192"),
             ("--batch", "4", "--seq", "192", "--gc", "1"), 15000),
    SuiteRow("lora-4x1152", ("--method", "lora", "--batch", "4", "--seq", "1152", "--memory_budget_gib", "17"),
             ("--batch", "4", "--seq", "1152", "--gc", "1")),
    SuiteRow("ptuning-1x2048",
             ("--method", "ptuning", "--batch", "1", "--seq", "2048", "--memory_budget_gib", "13"), None, 18000, 13),
    SuiteRow("realistic-packed", ("--method", "lora", "--realistic", "packed"), None),
    SuiteRow("realistic-dynamic", ("--method", "lora", "--realistic", "dynamic"), None),
    SuiteRow("realistic-fixed1153", ("--method", "lora", "--realistic", "fixed"), None),
    SuiteRow("qlora-1x1024", ("--method", "qlora", "--batch", "1", "--seq", "1024", "--memory_budget_gib", "6"),
             None, None, 6),
)


def run_json(command: list[str]) -> dict:
    """Run one benchmark process and return its JSON line (or the error it ended with)."""
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        return {"error": (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def run_suite(args: argparse.Namespace) -> None:
    """Every target row (ours, then the anchor at the same shape), each a JSON line, then a Markdown table."""
    shared = Path(os.environ.get("CHATGLM_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
    anchor = Path(args.anchor) if args.anchor else shared / "bench" / "anchor_native_glm.py"
    table = []
    for row in SUITE:
        cpu = ["--cpu"] if args.cpu else []
        steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        ours = run_json([sys.executable, __file__, *row.ours, *steps, *cpu])
        print(json.dumps({"row": row.name, **ours}), flush=True)
        reference = None
        if row.anchor and anchor.is_file() and not args.cpu:
            reference = run_json([sys.executable, str(anchor), *row.anchor, *steps])
            print(json.dumps({"row": row.name, **reference}), flush=True)
        table.append((row, ours, reference))
    packed, dynamic, fixed = (next(r[1] for r in table if r[0].name == name)
                              for name in ("realistic-packed", "realistic-dynamic", "realistic-fixed1153"))
    columns = ("run", "ours tokens/s", "ours peak GiB", "estimated GiB", "recompute", "anchor tokens/s",
               "anchor peak GiB", "target", "met")
    print("\n| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, ours, reference in table:
        target = " ".join(filter(None, (row.min_tokens_per_s and f">= {row.min_tokens_per_s:,.0f} tok/s",
                                        row.max_peak_gib and f"<= {row.max_peak_gib} GiB")))
        if "error" in ours:
            met = "error"
        elif row.max_peak_gib is not None and ours["peak_gib"] is None:
            met = "peak not measured (no CUDA)"
        else:
            met = all((
                row.min_tokens_per_s is None or ours["tokens_per_s"] >= row.min_tokens_per_s,
                row.max_peak_gib is None or ours["peak_gib"] <= row.max_peak_gib,
            ))
        reference = reference or {}
        cells = (row.name, ours.get("tokens_per_s", ours.get("error")), ours.get("peak_gib", ""),
                 ours.get("estimated_gib", ""), ours.get("recompute", ""), reference.get("tokens_per_s", ""),
                 reference.get("peak_gib", ""), target, met)
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    if all("samples_per_s" in result for result in (packed, dynamic, fixed)):
        print(f"\nrealistic samples/s: packed {packed['samples_per_s']}, dynamic {dynamic['samples_per_s']} "
              f"({packed['samples_per_s'] / dynamic['samples_per_s']:.2f}x, target >= 4x), fixed-1153 "
              f"{fixed['samples_per_s']} ({packed['samples_per_s'] / fixed['samples_per_s']:.2f}x, target >= 10x)")


def main() -> None:
    """Run the benchmark and print one JSON line (or, with --suite, every target)."""
    args = parse_args()
    if args.evaluation:
        from bench_evaluation import main as evaluation_benchmark  # scripts/ is on sys.path when run as a script

        evaluation_benchmark([])
        return
    if args.serving:
        from bench_serving import main as serving_benchmark

        serving_benchmark([])
        return
    if args.suite:
        run_suite(args)
        return
    if args.preference and args.realistic:
        sys.exit("error: --preference runs the fixed shape (--batch pairs x --seq tokens); drop --realistic")
    if args.real_size:
        from bench_real_size import main as real_size_benchmark

        options = ["--layers", str(args.layers), "--format", args.format]
        for name in ("model_dir", "work_dir", "memory_budget_gib", "stages", "tokens"):
            if getattr(args, name) is not None:
                options += [f"--{name}", str(getattr(args, name))]
        real_size_benchmark(options + (["--keep"] if args.keep else []))
        return
    torch.manual_seed(args.seed)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    config = model_config(args)
    model = build_model(args, config, dtype, device)
    packed_rows = packed_realistic_rows(args, config.padded_vocab_size) if args.realistic == "packed" else None
    setup = training_setup(args, dtype, packed_rows)
    plan = recompute_plan(args, config, setup, device)
    apply_recompute_plan(model, plan)
    estimate = estimate_training_memory(config, dataclasses.replace(setup, recompute=plan))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    if args.realistic:
        batches = realistic_batches(args, config.padded_vocab_size, device, packed_rows)
    else:
        batches = fixed_batches(args, config.padded_vocab_size, device)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    mixed_precision = dtype != torch.float32

    method = method_named(args.method)
    cached_reference: list[torch.Tensor] = []

    def reference_log_probs(batch: dict) -> torch.Tensor:
        """The reference pass in the method's reference context; a method that trains the base itself has none, and
        its reference is the starting model's, computed once as training caches it (every preference batch is the
        same fixed-shape batch)."""
        context = method.reference_context(model)
        if context is None and cached_reference:
            return cached_reference[0]
        with torch.no_grad(), contextlib.nullcontext() if context is None else context:
            reference = model(**batch, sequence_log_probs=True).log_probs
        if context is None:
            cached_reference.append(reference)
        return reference

    def preference_loss(batch: dict) -> torch.Tensor:
        reference = reference_log_probs(batch)
        log_probs = model(**batch, sequence_log_probs=True).log_probs
        pairs = args.batch
        return dpo_loss(log_probs[:pairs], log_probs[pairs:], reference[:pairs], reference[pairs:], 0.1).losses.mean()

    def step() -> tuple[torch.Tensor, int, int]:
        batch, samples = next(batches)
        with torch.autocast(device, dtype=dtype) if mixed_precision else contextlib.nullcontext():
            loss = preference_loss(batch) if args.preference else model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mask = batch.get("attention_mask")
        real_tokens = batch["input_ids"].numel() if mask is None else int((mask != 0).sum())
        return loss, samples, real_tokens

    for _ in range(args.warmup):
        step()
    synchronize()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = tokens = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, step_samples, step_tokens = step()
        samples += step_samples
        tokens += step_tokens
    synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "impl": "ours", "method": args.method, "mode": "preference" if args.preference else args.realistic or "fixed",
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "batch": args.batch, "seq": None if args.realistic else args.seq,
        "recompute": plan.describe(config.num_layers),
        "layers": config.num_layers, "dtype": str(dtype).replace("torch.", ""),
        "trainable": sum(p.numel() for p in parameters),
        "tokens_per_s": round(tokens / elapsed, 1), "samples_per_s": round(samples / elapsed, 2),
        **({"pairs_per_s": round(samples / elapsed, 2)} if args.preference else {}),
        "step_s": round(elapsed / args.steps, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "estimated_gib": round(estimate.total / GIB, 2),
        "loss": round(loss.item(), 4), "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
