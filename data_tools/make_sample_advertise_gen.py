#!/usr/bin/env python
"""Write the project's bundled sample data: synthetic product-copy pairs in AdvertiseGen's format.

The texts are generated here from our own attribute lists and sentence templates (nothing is taken from the
AdvertiseGen dataset). Output: JSON lines of {"content": "类型#裙*颜色#红色*...", "summary": "..."}.

    python data_tools/make_sample_advertise_gen.py --output_dir data/advertise_gen_sample
"""

import argparse
import random
from pathlib import Path

from finetune.atomic_files import write_jsonl_atomically

ATTRIBUTES = {
    "类型": ["裙", "裤", "上衣", "外套", "卫衣", "衬衫", "针织衫", "连衣裙"],
    "颜色": ["红色", "白色", "黑色", "蓝色", "粉红色", "卡其色", "绿色"],
    "风格": ["简约", "复古", "休闲", "通勤", "甜美", "街头", "文艺"],
    "图案": ["条纹", "印花", "纯色", "格子", "碎花", "字母"],
    "材质": ["棉", "牛仔布", "雪纺", "针织", "亚麻", "羊毛"],
    "版型": ["宽松", "修身", "直筒", "收腰"],
}
PHRASES = {
    "类型": ["这款{v}设计大方，日常百搭。", "一件好看的{v}，是衣橱里不可缺少的单品。", "{v}的剪裁利落，穿上很有精神。"],
    "颜色": ["{v}的配色干净耐看，衬托肤色。", "选用{v}，低调中透着质感。", "{v}色调温柔，怎么搭都不出错。"],
    "风格": ["整体走{v}路线，轻松穿出好气质。", "{v}风格的设计，适合多种场合。", "带着{v}的味道，让人眼前一亮。"],
    "图案": ["{v}元素点缀其间，增添几分活力。", "经典的{v}图案，耐看又有趣。", "{v}的细节让整体更有层次。"],
    "材质": ["{v}面料柔软亲肤，穿着舒适透气。", "采用{v}材质，手感细腻有垂感。", "{v}面料做工扎实，不易变形。"],
    "版型": ["{v}的版型修饰身形，显瘦又显高。", "{v}设计不挑身材，活动自如。", "{v}剪裁，线条流畅自然。"],
}
CLOSINGS = ["无论上班还是出游都很合适。", "简单搭配就很出彩。", "值得入手的一件好单品。", "穿上它，自信满满。"]


def make_example(rng: random.Random) -> dict[str, str]:
    """One synthetic {"content", "summary"} pair: 3-5 attributes and a description built from them."""
    keys = ["类型"] + rng.sample([key for key in ATTRIBUTES if key != "类型"], rng.randint(2, 4))
    values = {key: rng.choice(ATTRIBUTES[key]) for key in keys}
    content = "*".join(f"{key}#{values[key]}" for key in keys)
    summary = "".join(rng.choice(PHRASES[key]).format(v=values[key]) for key in keys) + rng.choice(CLOSINGS)
    return {"content": content, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    """Write train.json and dev.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/advertise_gen_sample")
    parser.add_argument("--train_size", type=int, default=160)
    parser.add_argument("--dev_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    examples = [make_example(rng) for _ in range(args.train_size + args.dev_size)]
    output_dir = Path(args.output_dir)
    write_jsonl_atomically(output_dir / "train.json", examples[: args.train_size])
    write_jsonl_atomically(output_dir / "dev.json", examples[args.train_size :])
    print(f"wrote {args.train_size} training and {args.dev_size} dev examples to {output_dir}")


if __name__ == "__main__":
    main()
