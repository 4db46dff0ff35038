#!/usr/bin/env python
"""Training-throughput benchmark on a ChatGLM3-shaped model with random weights (nothing is downloaded).

It uses the project's own code path: our model, `finetune.methods.apply_method` (freezing, PEFT LoRA, fp32 trainables,
bitsandbytes for QLoRA through `load_base_model`), our collator and packing. Each run prints one JSON line.

Fixed-shape mode (the recipe of the official finetune demo: frozen bf16 base, fp32 trainables, gradient checkpointing,
AdamW; each row batch x seq tokens with the first third of its labels masked):
    python scripts/benchmark.py --method lora --batch 4 --seq 768
    python scripts/benchmark.py --method ptuning --pre_seq_len 128 --batch 1 --seq 2048
    python scripts/benchmark.py --method qlora --batch 1 --seq 1024
Realistic mode (AdvertiseGen-shaped examples: prompts of 20-60 tokens, responses of 60-200; reports samples/s):
    python scripts/benchmark.py --method lora --realistic packed
    python scripts/benchmark.py --method lora --realistic dynamic     # official v2: dynamic padding, batch 4
    python scripts/benchmark.py --method lora --realistic fixed       # official v1: every row padded to 1153
CPU mode (a small shape, for regression tracking without a GPU):
    python scripts/benchmark.py --cpu --method lora
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.arguments import ModelArguments  # noqa: E402
from finetune.data.collator import RightPaddingCollator, pack_examples  # noqa: E402
from finetune.methods import apply_method, load_base_model  # noqa: E402
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402

OFFICIAL_V1_ROW_LENGTH = 1024 + 128 + 1
CPU_SHAPE = dict(num_layers=2, hidden_size=256, num_attention_heads=8, kv_channels=32, multi_query_group_num=2,
                 ffn_hidden_size=688, padded_vocab_size=8192)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["lora", "ptuning", "qlora"], default="lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1) or not (0)")
    parser.add_argument("--pre_seq_len", type=int, default=128)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cpu", action="store_true", help="small shape on the CPU, fp32")
    parser.add_argument("--realistic", choices=["packed", "dynamic", "fixed"], default=None)
    parser.add_argument("--examples", type=int, default=256, help="realistic mode: number of synthetic examples")
    parser.add_argument("--pack_length", type=int, default=2048, help="realistic packed mode: tokens per row")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> ChatGLMConfig:
    """ChatGLM3-6B shape (with --layers), or the small CPU shape."""
    shape = dict(CPU_SHAPE) if args.cpu else {"num_layers": args.layers}
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


def build_model(args: argparse.Namespace, config: ChatGLMConfig, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The model to train, prepared by the project's method code."""
    method_args = dict(pre_seq_len=args.pre_seq_len) if args.method == "ptuning" else dict(lora_rank=args.lora_rank)
    if args.method == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            random_base(config, torch.bfloat16, "cpu").save_pretrained(folder)
            model_args = ModelArguments(model_name_or_path=folder, quantization_bit=4, **method_args)
            model = load_base_model(model_args, torch.bfloat16)
    else:
        if args.method == "ptuning":
            config.pre_seq_len = args.pre_seq_len
        model_args = ModelArguments(model_name_or_path="random-weights", **method_args)
        model = random_base(config, dtype, device)
    model = apply_method(model, model_args)
    if args.gc:
        model.gradient_checkpointing_enable()
    return model.train()


def fixed_batches(args: argparse.Namespace, vocab: int, device: str):
    """The same batch x seq batch every step, first third of each row's labels masked."""
    input_ids = torch.randint(10, vocab - 100, (args.batch, args.seq), device=device)
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


def realistic_batches(args: argparse.Namespace, vocab: int, device: str):
    """Batches of synthetic AdvertiseGen-shaped examples in the chosen layout, cycling forever."""
    import datasets

    examples = realistic_examples(args.examples, vocab, args.seed)
    collator = RightPaddingCollator(pad_token_id=0)
    if args.realistic == "packed":
        rows = pack_examples(datasets.Dataset.from_list(examples), args.pack_length)
        counts = [int(max(row)) for row in rows["attention_mask"]]
        rows = [dict(row) for row in rows.remove_columns("length")]
        groups = [(rows[i : i + args.batch], sum(counts[i : i + args.batch])) for i in range(0, len(rows), args.batch)]
    else:
        collator.max_length = OFFICIAL_V1_ROW_LENGTH if args.realistic == "fixed" else None
        groups = [(examples[i : i + args.batch], len(examples[i : i + args.batch]))
                  for i in range(0, len(examples), args.batch)]
    batches = [({k: v.to(device) for k, v in collator(group).items()}, count) for group, count in groups]
    while True:
        yield from batches


def main() -> None:
    """Run the benchmark and print one JSON line."""
    args = parse_args()
    torch.manual_seed(args.seed)
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if args.cpu else getattr(torch, args.dtype)
    config = model_config(args)
    model = build_model(args, config, dtype, device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    batches = realistic_batches(args, config.padded_vocab_size, device) if args.realistic else fixed_batches(
        args, config.padded_vocab_size, device
    )
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> tuple[torch.Tensor, int, int]:
        batch, samples = next(batches)
        loss = model(**batch).loss
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
        "impl": "ours", "method": args.method, "mode": args.realistic or "fixed", "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "batch": args.batch, "seq": None if args.realistic else args.seq, "gc": args.gc,
        "layers": config.num_layers, "dtype": str(dtype).replace("torch.", ""),
        "trainable": sum(p.numel() for p in parameters),
        "tokens_per_s": round(tokens / elapsed, 1), "samples_per_s": round(samples / elapsed, 2),
        "step_s": round(elapsed / args.steps, 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "loss": round(float(loss), 4), "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
