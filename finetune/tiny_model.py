"""Build a tiny randomly initialised ChatGLM3 checkpoint, in the official folder layout, for tests and smoke runs.

Usage: python -m finetune.tiny_model --output_dir DIR [--text_file F ...] [--num_layers 2 --hidden_size 64 ...]
The real shape: python -m finetune.tiny_model --preset chatglm3-6b --output_dir DIR [--layers N]
[--format safetensors|bin] writes chatglm3-6b's exact config with random bf16 weights in the official 7-shard layout
(finetune/real_size_model.py).
"""

import argparse
import io
import json
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GenerationConfig

from finetune.atomic_files import replace_folder
from finetune.model.configuration import ChatGLMConfig
from finetune.model.modeling import ChatGLMForConditionalGeneration
from finetune.model.tokenization import CHATGLM_SPECIAL_TOKENS, ChatGLMTokenizer, reply_stop_ids

VOCAB_PADDING_MULTIPLE = 64

# Vocabulary of the built-in corpus: synthetic product descriptions in the AdvertiseGen style, written for this
# project, plus English sentences and chat/tool-call snippets so every kind of text the toolkit handles has pieces.
_CATEGORIES = [
    ("裙", "skirt"), ("连衣裙", "dress"), ("半身裙", "midi skirt"), ("裤", "trousers"), ("阔腿裤", "wide-leg pants"),
    ("牛仔裤", "jeans"), ("上衣", "top"), ("衬衫", "shirt"), ("卫衣", "hoodie"), ("外套", "jacket"),
    ("针织衫", "cardigan"), ("T恤", "T-shirt"),
]
_COLORS = [
    ("红色", "red"), ("白色", "white"), ("黑色", "black"), ("蓝色", "blue"), ("粉色", "pink"), ("绿色", "green"),
    ("灰色", "grey"), ("卡其色", "khaki"),
]
_STYLES = [
    ("简约", "minimalist"), ("复古", "vintage"), ("休闲", "casual"), ("街头", "streetwear"), ("文艺", "artsy"),
    ("甜美", "sweet"), ("通勤", "office"), ("运动", "sporty"),
]
_PATTERNS = [
    ("条纹", "striped"), ("格子", "plaid"), ("印花", "printed"), ("纯色", "plain"), ("刺绣", "embroidered"),
    ("波点", "polka-dot"), ("撞色", "colour-block"), ("字母", "letter-print"),
]
_MATERIALS = [
    ("棉", "cotton"), ("牛仔布", "denim"), ("针织", "knit"), ("蕾丝", "lace"), ("雪纺", "chiffon"),
    ("亚麻", "linen"), ("丝绒", "velvet"),
]
_FITS = [("宽松", "loose"), ("修身", "slim"), ("直筒", "straight"), ("显瘦", "flattering"), ("A字", "A-line")]
_BENEFITS = ["穿着舒适透气", "很好地修饰身材", "展现优雅的气质", "让人显得更加精神", "适合日常穿搭", "夏天穿也很清凉"]
_OCCASIONS = ["上班通勤", "周末逛街", "约会出游", "居家休闲", "运动健身", "旅行度假"]
_CITIES = [("北京", "Beijing"), ("上海", "Shanghai"), ("广州", "Guangzhou"), ("深圳", "Shenzhen"), ("杭州", "Hangzhou")]
_ENGLISH_SENTENCES = [
    "Hello world, the quick brown fox jumps over the lazy dog!",
    "You are a helpful assistant. Answer the question as well as you can.",
    "Please write a short advertisement for this product.",
    "What is the weather like in {city_en} today?",
    "The temperature in {city_en} is {number} degrees.",
    "Our new {color_en} {category_en} is made of soft {material_en}.",
    "A {fit_en} {style_en} {category_en} with a {pattern_en} design, perfect for every day.",
    "Order {number} items and get free shipping within {small} days.",
]


def _describe_product(rng: random.Random) -> list[str]:
    """A few lines about one random product: the keyword prompt, its Chinese copy and an English line."""
    category, category_en = rng.choice(_CATEGORIES)
    color, color_en = rng.choice(_COLORS)
    style, style_en = rng.choice(_STYLES)
    pattern, pattern_en = rng.choice(_PATTERNS)
    material, material_en = rng.choice(_MATERIALS)
    fit, fit_en = rng.choice(_FITS)
    city, city_en = rng.choice(_CITIES)
    number, small = rng.randint(10, 9999), rng.randint(1, 9)
    prompt = f"类型#{category}*颜色#{color}*风格#{style}*图案#{pattern}*材质#{material}*版型#{fit}"
    copy = (
        f"这款{color}{category}采用{material}面料，{fit}的版型{rng.choice(_BENEFITS)}。{pattern}的设计非常{style}，"
        f"适合{rng.choice(_OCCASIONS)}，售价{number}元。"
    )
    english = rng.choice(_ENGLISH_SENTENCES).format(
        city_en=city_en, number=number, small=small, color_en=color_en, category_en=category_en,
        material_en=material_en, fit_en=fit_en, style_en=style_en, pattern_en=pattern_en,
    )
    tool = json.dumps({"name": "get_weather", "parameters": {"city": city}}, ensure_ascii=False)
    call = f'```python\ntool_call(city="{city_en}", limit={small})\n```'
    return [prompt, copy, english, f"{city}今天天气怎么样？", tool, call, f'{{"temperature": {number % 40}}}']


def default_corpus(num_products: int = 400, seed: int = 0) -> list[str]:
    """The built-in training text: synthetic Chinese and English product copy and chat snippets (ours)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(num_products):
        lines.extend(_describe_product(rng))
    return lines


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE SentencePiece model with byte fallback and no normalisation; return the serialised model."""
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on: the given texts are empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece vocabulary on {len(lines)} lines ({error}); "
            "change --vocab_size as that message says, or train on more text (--text_file)."
        ) from error
    return model.getvalue()


def padded_vocab_size(sentencepiece_size: int) -> int:
    """Embedding rows: SentencePiece pieces plus the ChatGLM3 tokens, rounded up to a multiple of 64."""
    needed = sentencepiece_size + len(CHATGLM_SPECIAL_TOKENS)
    return -(-needed // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE


def _write_checkpoint(
    folder: Path, model_proto: bytes, config_fields: dict, seed: int, dtype: torch.dtype, device: str, prepare
) -> None:
    """Write tokenizer, config, random weights (built on `device`, saved in `dtype`) and generation config."""
    vocab_file = folder / "tokenizer.model"
    vocab_file.write_bytes(model_proto)
    tokenizer = ChatGLMTokenizer(vocab_file=str(vocab_file))
    tokenizer.save_pretrained(folder)

    config = ChatGLMConfig(
        padded_vocab_size=padded_vocab_size(tokenizer.sp_model.get_piece_size()),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_fields,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = ChatGLMForConditionalGeneration(config).to(dtype)
    if prepare is not None:
        prepare(model, tokenizer)
    model.save_pretrained(folder)

    GenerationConfig(eos_token_id=reply_stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def build_tiny_model(
    output_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    kv_channels: int = 16,
    multi_query_group_num: int = 2,
    ffn_hidden_size: int = 160,
    vocab_size: int = 900,
    seq_length: int = 512,
    rope_ratio: float = 1,
    multi_query_attention: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    prepare: Callable[[ChatGLMForConditionalGeneration, ChatGLMTokenizer], None] | None = None,
) -> Path:
    """Train a tokenizer on `texts` (default: the built-in corpus) and save a random ChatGLM3 model at `output_dir`.

    The shape is ChatGLM3-6B's (qkv bias, multi-query attention) scaled down; `seq_length` and `rope_ratio` build the
    long-context variants' shape (chatglm3-6b-32k: seq_length 32768, rope_ratio 50). Large shapes (the full 6B one)
    are best built on a GPU (`device="cuda"`) and saved in `dtype` bfloat16. `prepare(model, tokenizer)`, when given,
    adjusts the random model before it is saved.
    """
    if num_attention_heads % multi_query_group_num:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must be a multiple of multi_query_group_num "
            f"({multi_query_group_num})"
        )
    target = Path(output_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    model_proto = train_sentencepiece(default_corpus() if texts is None else texts, vocab_size)
    config_fields = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "kv_channels": kv_channels,
        "multi_query_group_num": multi_query_group_num,
        "ffn_hidden_size": ffn_hidden_size,
        "seq_length": seq_length,
        "rope_ratio": rope_ratio,
        "add_qkv_bias": True,
        "multi_query_attention": multi_query_attention,
    }
    workspace = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        built = workspace / target.name
        built.mkdir()
        _write_checkpoint(built, model_proto, config_fields, seed, dtype, device, prepare)
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True (--overwrite)")
        replace_folder(built, target)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return target


def _read_text_files(paths: list[str]) -> list[str]:
    """The lines of the given UTF-8 text files."""
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error}); --text_file takes plain UTF-8 text files") from error
    return texts


def main(argv: list[str] | None = None) -> Path:
    """Command line entry point: build the tiny model and print its folder."""
    parser = argparse.ArgumentParser(description="Build a tiny random ChatGLM3 checkpoint in the official layout.")
    parser.add_argument("--output_dir", required=True, help="folder to create (built next to it, then renamed)")
    parser.add_argument("--text_file", nargs="+", help="UTF-8 text to train the tokenizer on (default: built-in)")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--kv_channels", type=int, default=16)
    parser.add_argument("--multi_query_group_num", type=int, default=2)
    parser.add_argument("--ffn_hidden_size", type=int, default=160)
    parser.add_argument("--vocab_size", type=int, default=900, help="SentencePiece pieces (+9 ChatGLM3 tokens)")
    parser.add_argument("--seq_length", type=int, default=512, help="the model's context (32768 for a 32k shape)")
    parser.add_argument(
        "--rope_ratio", type=float, default=1.0, help="rotary base = 10000 x rope_ratio (50 for a 32k shape)"
    )
    parser.add_argument(
        "--no_multi_query_attention", action="store_true", help="one K/V head per attention head (official default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output_dir")
    parser.add_argument(
        "--preset", choices=["chatglm3-6b"], default=None,
        help="instead of the tiny shape: chatglm3-6b's exact config, random bf16 weights in the official shards",
    )
    parser.add_argument("--layers", type=int, default=None, help="with --preset: fewer layers than the preset's 28")
    parser.add_argument("--format", choices=["safetensors", "bin"], default="safetensors", help="with --preset")
    args = parser.parse_args(argv)
    if args.preset:
        from finetune.real_size_model import CHATGLM3_6B_LAYERS, build_real_size_model

        folder = build_real_size_model(
            args.output_dir, num_layers=args.layers or CHATGLM3_6B_LAYERS, weight_format=args.format,
            seed=args.seed, overwrite=args.overwrite,
        )
        print(folder)
        return folder
    if args.layers is not None:
        parser.error("--layers goes with --preset; the tiny shape's depth is --num_layers")
    folder = build_tiny_model(
        args.output_dir,
        texts=_read_text_files(args.text_file) if args.text_file else None,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        multi_query_group_num=args.multi_query_group_num,
        ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=args.vocab_size,
        seq_length=args.seq_length,
        rope_ratio=int(args.rope_ratio) if args.rope_ratio.is_integer() else args.rope_ratio,
        multi_query_attention=not args.no_multi_query_attention,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(folder)
    return folder


if __name__ == "__main__":
    main()
