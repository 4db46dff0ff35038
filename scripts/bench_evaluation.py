"""Benchmark: batched evaluation generation against one example at a time, on the same model in the same run.

Builds the tiny random ChatGLM3 model (finetune/tiny_model.py; nothing is downloaded), encodes N AdvertiseGen-like
prompts as evaluation does, then generates greedily for all of them twice: in length-bucketed left-padded batches
(our evaluation) and one prompt at a time (the official demos' way). Prints one JSON line: examples/s and generated
tokens/s of both, the speed-up, and whether both gave the same tokens.

    python scripts/bench_evaluation.py [--examples 64 --batch_size 32 --max_new_tokens 32]
    python scripts/benchmark.py --evaluation        # the same, from the benchmark script
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from bench_encoding import ATTRIBUTES  # scripts/ is on sys.path when run as a script

from finetune.checkpoints import load_for_inference
from finetune.generation import build_generation_config, generate_token_ids, input_output_prompt_ids
from finetune.tiny_model import build_tiny_model


def synthetic_prompts(count: int, seed: int = 0) -> list[str]:
    """AdvertiseGen-like attribute prompts of 2-5 attributes."""
    generator = random.Random(seed)
    prompts = []
    for _ in range(count):
        keys = generator.sample(sorted(ATTRIBUTES), k=generator.randint(2, 5))
        prompts.append("*".join(f"{key}#{generator.choice(ATTRIBUTES[key])}" for key in keys))
    return prompts


def timed_generation(model, tokenizer, prompts: list[list[int]], config, batch_size: int) -> tuple[list, float]:
    """Generated ids and the seconds they took."""
    started = time.perf_counter()
    generated = generate_token_ids(model, tokenizer, prompts, config, batch_size)
    return generated, time.perf_counter() - started


def run_evaluation_benchmark(examples: int, batch_size: int, max_new_tokens: int) -> dict:
    """Batched vs one-at-a-time evaluation generation on the tiny model; the figures as a dict."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_tiny_model(Path(folder) / "tiny")
        model, tokenizer, _ = load_for_inference(model_dir, device="cpu", dtype="float32")
        prompts = [input_output_prompt_ids(text, tokenizer, 64) for text in synthetic_prompts(examples)]
        config = build_generation_config(tokenizer, max_new_tokens)
        timed_generation(model, tokenizer, prompts[:2], config, 2)  # warm-up
        batched, batched_seconds = timed_generation(model, tokenizer, prompts, config, batch_size)
        single, single_seconds = timed_generation(model, tokenizer, prompts, config, 1)
    tokens = sum(len(ids) for ids in batched)
    return {
        "examples": examples,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "batched_examples_per_s": round(examples / batched_seconds, 2),
        "batched_generated_tokens_per_s": round(tokens / batched_seconds, 1),
        "single_examples_per_s": round(examples / single_seconds, 2),
        "single_generated_tokens_per_s": round(sum(len(ids) for ids in single) / single_seconds, 1),
        "speedup": round(single_seconds / batched_seconds, 2),
        "same_tokens": batched == single,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    figures = run_evaluation_benchmark(args.examples, args.batch_size, args.max_new_tokens)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
