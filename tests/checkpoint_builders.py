"""Small checkpoints in the agreed on-disk formats (LoRA, P-Tuning v2, full), built from the reference tiny model.

Shared by the checkpoint, inference, evaluation and export tests. Each builder writes a real checkpoint the way
training does: PEFT save_pretrained for LoRA, config.json + save_prefix_weights for P-Tuning v2, save_pretrained
plus tokenizer files for full fine-tuning, and training_record.json.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import finetune.model  # noqa: F401  (registers the ChatGLM3 classes with the Auto classes)
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from finetune.methods.ptuning import save_prefix_weights

PROBE_PROMPTS = ["类型#裙*颜色#红色", "hello", "类型#上衣*版型#宽松*风格#简约*图案#条纹*衣样式#衬衫"]


def load_base(base_dir: Path, **config_overrides) -> ChatGLMForConditionalGeneration:
    """The base model in fp32 eval mode, optionally with config overrides such as pre_seq_len."""
    model = ChatGLMForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, **config_overrides)
    return model.eval()


def write_training_record(folder: Path, method: str, base_model: Path, **fields) -> None:
    """training_record.json in the agreed format."""
    record = {
        "format_version": 1,
        "method": method,
        "base_model": str(base_model),
        "pre_seq_len": None,
        "prefix_projection": False,
        "quantization_bit": None,
        "lora": None,
        "model_args": {},
        "data_args": {},
        "training_args": {},
        "global_step": 10,
    }
    record.update(fields)
    (folder / "training_record.json").write_text(json.dumps(record, indent=2), encoding="utf-8")


def make_lora_checkpoint(base_dir: Path, folder: Path, seed: int = 0, with_record: bool = True) -> PeftModel:
    """A LoRA adapter on query_key_value with random non-zero lora_B; returns the in-memory adapted model."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.save_pretrained(folder)
    if with_record:
        lora = {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query_key_value"]}
        write_training_record(folder, "lora", base_dir, lora=lora)
    return model.eval()


def make_prefix_checkpoint(
    base_dir: Path, folder: Path, pre_seq_len: int = 4, prefix_projection: bool = False, seed: int = 0
) -> ChatGLMForConditionalGeneration:
    """A P-Tuning v2 checkpoint with a random prefix; returns the in-memory prefix model."""
    torch.manual_seed(seed)
    model = load_base(base_dir, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    with torch.no_grad():
        for parameter in model.transformer.prefix_encoder.parameters():
            parameter.normal_(std=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    save_prefix_weights(model, folder)
    write_training_record(folder, "ptuning", base_dir, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    return model


def make_full_checkpoint(base_dir: Path, folder: Path, seed: int = 0) -> ChatGLMForConditionalGeneration:
    """A whole-model checkpoint (perturbed weights) with tokenizer files and a 'full' training record."""
    torch.manual_seed(seed)
    model = load_base(base_dir)
    with torch.no_grad():
        model.transformer.output_layer.weight.add_(torch.randn_like(model.transformer.output_layer.weight))
    model.save_pretrained(folder)
    ChatGLMTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    write_training_record(folder, "full", base_dir)
    return model


def make_other_base(base_dir: Path, folder: Path, **config_overrides) -> Path:
    """A random base model of another shape (e.g. num_layers=3 or hidden_size=32) with the same tokenizer."""
    config = ChatGLMConfig.from_pretrained(base_dir)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    torch.manual_seed(1)
    ChatGLMForConditionalGeneration(config).save_pretrained(folder)
    ChatGLMTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    return folder


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    """Cut a file short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def probe_logits(model: torch.nn.Module, tokenizer: ChatGLMTokenizer) -> torch.Tensor:
    """fp32 logits of the probe prompts, right-padded in one batch with their attention mask."""
    batch = tokenizer(PROBE_PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
