"""Write a chatglm3-6b-shaped checkpoint with random bf16 weights in the official sharded layout, one shard at a time.

The folder has chatglm3-6b's exact config (or fewer layers), `model-0000N-of-0000K.safetensors` or
`pytorch_model-0000N-of-0000K.bin` shards with their index under the official tensor names, the tiny SentencePiece
tokenizer with the ChatGLM3 special tokens, and a generation config. Only one shard is in memory at a time.
Used by `python -m finetune.tiny_model --preset chatglm3-6b` and `scripts/benchmark.py --real_size`.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from finetune.atomic_files import replace_folder
from finetune.model.configuration import CHATGLM3_6B_FIELDS, ChatGLMConfig
from finetune.model.modeling import ChatGLMForConditionalGeneration
from finetune.model.tokenization import ChatGLMTokenizer, reply_stop_ids
from finetune.tiny_model import default_corpus, train_sentencepiece

CHATGLM3_6B_LAYERS = 28
# The official chatglm3-6b folder ships its weights in 7 shards.
CHATGLM3_6B_SHARDS = 7
WEIGHT_FORMATS = ("safetensors", "bin")
# The official checkpoint also stores the rotary inverse frequencies (our model computes them and ignores the key).
ROTARY_KEY = "transformer.rotary_pos_emb.inv_freq"
WEIGHT_STD = 0.02
TOKENIZER_PIECES = 900


def chatglm3_6b_config(num_layers: int = CHATGLM3_6B_LAYERS) -> ChatGLMConfig:
    """chatglm3-6b's config.json fields (28 layers unless `num_layers` is given), stored as bfloat16."""
    if num_layers < 1:
        raise ValueError(f"--layers must be at least 1, got {num_layers}")
    config = ChatGLMConfig(**CHATGLM3_6B_FIELDS, num_layers=num_layers)
    config.dtype = torch.bfloat16
    return config


def weight_shapes(config: ChatGLMConfig) -> dict[str, torch.Size]:
    """Every tensor of the official checkpoint for `config`, in module order, with its shape (nothing allocated)."""
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    shapes[ROTARY_KEY] = torch.Size([config.kv_channels // 4])
    return shapes


def shard_names(shapes: dict[str, torch.Size], shards: int) -> list[list[str]]:
    """Split the tensors, in order, into at most `shards` contiguous groups of about equal bytes."""
    sizes = {name: shape.numel() for name, shape in shapes.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    offset = 0
    for name, size in sizes.items():
        middle = offset + size / 2
        groups[min(shards - 1, int(middle * shards / total))].append(name)
        offset += size
    return [group for group in groups if group]


def random_weight(name: str, shape: torch.Size, config: ChatGLMConfig, generator: torch.Generator) -> torch.Tensor:
    """A bf16 tensor for `name`: norms 1, rotary frequencies as the official model computes them, else N(0, 0.02)."""
    if name == ROTARY_KEY:
        rotary_dim = config.kv_channels // 2
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        return (1.0 / (10000 * config.rope_ratio) ** exponent).to(torch.bfloat16)
    if "layernorm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, WEIGHT_STD, generator=generator)


def shard_file_name(index: int, count: int, weight_format: str) -> str:
    """The official shard name: model-0000N-of-0000K.safetensors or pytorch_model-0000N-of-0000K.bin."""
    stem = "model" if weight_format == "safetensors" else "pytorch_model"
    return f"{stem}-{index:05d}-of-{count:05d}.{weight_format}"


def write_weights(folder: Path, config: ChatGLMConfig, weight_format: str, seed: int) -> int:
    """Write random weights shard by shard plus the shard index into `folder`; return the weight bytes."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    shapes = weight_shapes(config)
    groups = shard_names(shapes, CHATGLM3_6B_SHARDS)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for number, names in enumerate(groups, start=1):
        file_name = shard_file_name(number, len(groups), weight_format)
        shard = {name: random_weight(name, shapes[name], config, generator) for name in names}
        if weight_format == "safetensors":
            save_file(shard, folder / file_name, metadata={"format": "pt"})
        else:
            torch.save(shard, folder / file_name)
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
        weight_map.update(dict.fromkeys(names, file_name))
        del shard
    index_name = "model.safetensors.index.json" if weight_format == "safetensors" else "pytorch_model.bin.index.json"
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total_bytes


def write_tokenizer(folder: Path) -> ChatGLMTokenizer:
    """The tiny SentencePiece tokenizer (ChatGLM3 special tokens after its pieces), saved into `folder`."""
    vocab_file = folder / "tokenizer.model"
    vocab_file.write_bytes(train_sentencepiece(default_corpus(), TOKENIZER_PIECES))
    tokenizer = ChatGLMTokenizer(vocab_file=str(vocab_file))
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_real_size_model(
    output_dir: str | Path,
    num_layers: int = CHATGLM3_6B_LAYERS,
    weight_format: str = "safetensors",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a chatglm3-6b-shaped folder with random bf16 weights at `output_dir` (built beside it, then renamed)."""
    target = Path(output_dir).resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    config = chatglm3_6b_config(num_layers)
    workspace = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        built = workspace / target.name
        built.mkdir()
        tokenizer = write_tokenizer(built)
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.save_pretrained(built)
        GenerationConfig(
            eos_token_id=reply_stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id
        ).save_pretrained(built)
        write_weights(built, config, weight_format, seed)
        replace_folder(built, target)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return target


def weight_bytes(folder: str | Path) -> int:
    """The weight bytes a sharded folder's index records (metadata.total_size)."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            return int(json.loads((folder / index_name).read_text(encoding="utf-8"))["metadata"]["total_size"])
    raise FileNotFoundError(f"{folder}: no model.safetensors.index.json or pytorch_model.bin.index.json")
