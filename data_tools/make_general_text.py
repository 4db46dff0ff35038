#!/usr/bin/env python
"""Write general Chinese text for pre-training the quickstart's tiny model, its stand-in for the pretrained 6B.

A real chatglm3-6b already writes fluent Chinese and follows simple requests before it is tuned on AdvertiseGen;
a random tiny model knows nothing. The quickstart therefore first trains the tiny model briefly on this text, so
that P-Tuning v2 and LoRA start, as they do on the 6B, from a base that knows the language and only has to learn
the task. The text is generated here from our own word lists and sentence templates (nothing is taken from the
AdvertiseGen dataset). It never holds the task being evaluated: no prompt is in AdvertiseGen's `类型#...*...`
keyword format, and no response equals a summary of the files passed with --exclude (the dev set).

Records are JSON lines of {"prompt", "response"} (the input-output format the training entry point reads), one of:
  request       a plain request for a product description (介绍一下这件<garment>。) -> a description
  continuation  续写：<first sentence of a product description> -> the rest of the description
  question      <a product description>\\n问：<what is its colour / material / ...?> -> the answer
  copy          抄写：<a sentence> -> the same sentence
  chat          a short everyday question -> a short answer

    python -m data_tools.make_general_text --output general.jsonl [--size 1200] [--seed 0] [--exclude dev.json]
"""

import argparse
import json
import random
import sys
from pathlib import Path

from finetune.atomic_files import write_jsonl_atomically
from data_tools.make_sample_advertise_gen import ATTRIBUTES, CLOSINGS, PHRASES

# More ways to say each attribute than the sample data uses, so that the general text is not its templates alone.
EXTRA_PHRASES = {
    "类型": ["这件{v}做工精致，细节到位。", "{v}是很多人喜欢的款式。"],
    "颜色": ["{v}看起来很有活力。", "这种{v}很适合春夏季节。"],
    "风格": ["喜欢{v}风的朋友一定不要错过。", "{v}感十足，很有个性。"],
    "图案": ["{v}的样式很受欢迎。", "加入了{v}，看起来不单调。"],
    "材质": ["{v}的面料摸起来很舒服。", "用了{v}，洗过也不起球。"],
    "版型": ["{v}的设计让穿着更轻松。", "{v}的款式适合很多身材。"],
}
QUESTIONS = {
    "类型": "这是什么衣服？",
    "颜色": "它是什么颜色的？",
    "风格": "它是什么风格的？",
    "图案": "它是什么图案的？",
    "材质": "它是什么材质的？",
    "版型": "它是什么版型的？",
}
CHATS = [
    ("你好", "你好，有什么可以帮你的吗？"),
    ("你是谁？", "我是一个语言模型助手，可以回答问题、写文章。"),
    ("今天天气怎么样？", "我无法查看实时天气，建议你看一下天气预报。"),
    ("谢谢你", "不客气，很高兴能帮到你。"),
    ("推荐一件适合上班穿的衣服", "可以选择一件简约的衬衫，搭配直筒裤，干净又得体。"),
    ("夏天穿什么面料好？", "夏天适合穿棉、亚麻这类透气的面料。"),
    ("怎么洗羊毛衫？", "羊毛衫最好用冷水手洗，平铺晾干，不要暴晒。"),
    ("再见", "再见，祝你生活愉快！"),
]
REQUESTS = ["介绍一下这件{v}。", "写一段商品介绍。", "帮我描述一下这件{v}。", "这件{v}怎么样？"]
KINDS = ("request", "continuation", "question", "copy", "chat")
KIND_WEIGHTS = (4, 2, 2, 1, 1)


def describe(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """A random product (3-5 attributes) and the sentences of a description of it, in a random order."""
    keys = ["类型"] + rng.sample([key for key in ATTRIBUTES if key != "类型"], rng.randint(2, 4))
    values = {key: rng.choice(ATTRIBUTES[key]) for key in keys}
    rest = keys[1:]
    rng.shuffle(rest)
    sentences = [rng.choice(PHRASES[key] + EXTRA_PHRASES[key]).format(v=values[key]) for key in [keys[0], *rest]]
    return values, sentences + [rng.choice(CLOSINGS)]


def make_record(rng: random.Random) -> dict[str, str]:
    """One general-text record of a random kind."""
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    if kind == "chat":
        prompt, response = rng.choice(CHATS)
        return {"prompt": prompt, "response": response}
    values, sentences = describe(rng)
    if kind == "request":
        return {"prompt": rng.choice(REQUESTS).format(v=values["类型"]), "response": "".join(sentences)}
    if kind == "continuation":
        return {"prompt": "续写：" + sentences[0], "response": "".join(sentences[1:])}
    if kind == "question":
        key = rng.choice(list(values))
        return {"prompt": "".join(sentences) + "\n问：" + QUESTIONS[key], "response": values[key] + "。"}
    sentence = rng.choice(sentences)
    return {"prompt": "抄写：" + sentence, "response": sentence}


def read_summaries(paths: list[str]) -> set[str]:
    """The "summary" texts of AdvertiseGen-format JSON-lines files."""
    summaries = set()
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                summaries.add(json.loads(line)["summary"])
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}, line {number}: not an AdvertiseGen record with a \"summary\" ({error}); --exclude takes "
                    "AdvertiseGen-format JSON lines such as data/advertise_gen_sample/dev.json"
                ) from error
    return summaries


def make_general_text(size: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """`size` records, the same for the same seed; no response is one of the `exclude` texts."""
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    while len(records) < size:
        record = make_record(rng)
        if record["response"] not in exclude:
            records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: write the records to --output (atomically)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON-lines file to write")
    parser.add_argument("--size", type=int, default=1200, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", nargs="*", default=[], help="AdvertiseGen files whose summaries must not appear")
    args = parser.parse_args(argv)
    if args.size < 1:
        print(f"make_general_text: error: --size must be a positive number of records, got {args.size}", file=sys.stderr)
        return 2
    try:
        exclude = read_summaries(args.exclude)
    except (OSError, ValueError) as error:
        print(f"make_general_text: error: {error}", file=sys.stderr)
        return 2
    count = write_jsonl_atomically(args.output, make_general_text(args.size, args.seed, exclude))
    print(f"wrote {count} general-text records (seed {args.seed}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
