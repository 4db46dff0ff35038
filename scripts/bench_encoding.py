"""Benchmark: encode synthetic AdvertiseGen-sized examples through `load_training_data` (Dataset.map, num_proc).

Writes N synthetic prompt/response pairs (a ~30-character attribute prompt, a ~110-character description) to a
temporary JSONL file, then times reading, validation and encoding without the cache. Prints examples/s and seconds.

    PYTHONPATH=. python scripts/bench_encoding.py --tokenizer ../shared/reference/chatglm3-tiny/model

(run from the repository root; PYTHONPATH is not needed once the project is installed).
"""

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from finetune.atomic_files import write_jsonl_atomically
from finetune.data.loading import EncodingLimits, load_training_data
from finetune.model.tokenization import ChatGLMTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = Path(os.environ.get("CHATGLM_SHARED_DIR", REPO_ROOT.parent / "shared")) / (
    "reference/chatglm3-tiny/model"
)
ATTRIBUTES = {
    "类型": ["裙", "裤", "上衣", "外套", "衬衫"],
    "颜色": ["红色", "黑色", "白色", "蓝色", "粉色"],
    "风格": ["简约", "性感", "复古", "休闲", "通勤"],
    "图案": ["条纹", "线条", "印花", "纯色", "格子"],
    "版型": ["宽松", "修身", "显瘦", "直筒"],
}
DESCRIPTION_CHARACTERS = (
    "这款裙子采用了柔软舒适的面料上身效果非常显瘦时尚简约的设计搭配精致细节让你轻松穿出优雅气质，。"
)


def synthetic_example(generator: random.Random) -> dict:
    """One AdvertiseGen-like prompt/response pair."""
    keys = generator.sample(sorted(ATTRIBUTES), k=generator.randint(3, 5))
    prompt = "*".join(f"{key}#{generator.choice(ATTRIBUTES[key])}" for key in keys)
    response = "".join(generator.choices(DESCRIPTION_CHARACTERS, k=generator.randint(80, 140)))
    return {"prompt": prompt, "response": response}


def main() -> None:
    """Generate the data, encode it, print the throughput."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="folder with tokenizer.model")
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--max_source_length", type=int, default=64)
    parser.add_argument("--max_target_length", type=int, default=128)
    args = parser.parse_args()

    tokenizer = ChatGLMTokenizer.from_pretrained(args.tokenizer)
    generator = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "synthetic_advertise_gen.jsonl"
        write_jsonl_atomically(path, (synthetic_example(generator) for _ in range(args.examples)))
        started = time.perf_counter()
        data = load_training_data(
            path,
            tokenizer,
            EncodingLimits(args.max_source_length, args.max_target_length),
            num_proc=args.num_proc,
            cache_dir=None,
        )
        seconds = time.perf_counter() - started
    print(data.summary)
    print(f"encoded {data.dataset.num_rows} examples with num_proc={args.num_proc} in {seconds:.1f} s")
    print(f"{data.dataset.num_rows / seconds:.0f} examples/s")


if __name__ == "__main__":
    main()
