"""The models a server offers: `--model CKPT` or several `--model NAME=CKPT`, loaded once per base.

One checkpoint loads through finetune.checkpoints.load_for_inference (every kind). With several, LoRA adapters and
P-Tuning v2 prefixes that name the same base share one copy of it: the adapters are added to one PeftModel under
their own names and each prefix gets its own prefix encoder; a `NAME=BASE` entry serves that base itself. Full
fine-tunes and other whole models are loaded on their own. A shared base is quantized as its checkpoints' training
records say (they must agree) unless --quantization_bit is given. Each loaded model gets one ServingEngine.
"""

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from peft import PeftModel

from finetune.checkpoint_layout import CheckpointKind, read_training_record
from finetune.checkpoints import detect_checkpoint_kind, load_for_inference, open_base
from finetune.methods.lora import load_lora_adapter
from finetune.methods.ptuning import prefix_settings
from finetune.model.checkpoint_files import CheckpointError
from finetune.model.prefix_checkpoint import load_prefix_checkpoint
from finetune.model.prefix_encoder import PrefixEncoder
from finetune.quantization import recorded_bits
from inference.serving_engine import ServingEngine, Variant

MODEL_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class ServedModel:
    """A name clients ask for: the engine that runs it, its tokenizer, its adapter/prefix and its context size."""

    name: str
    path: str
    kind: CheckpointKind
    engine: ServingEngine
    tokenizer: object
    variant: Variant
    seq_length: int


@dataclass(frozen=True)
class LoadOptions:
    """How to load checkpoints (the options of finetune.checkpoints.add_loading_arguments)."""

    base: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantization_bit: int | None = None
    allow_other_base: bool = False


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """(name, path) of each `--model` value: `NAME=CKPT`, or `CKPT` named after its folder.

    A value is split at its first `=` only when what is left of it is a plain name (letters, digits, `.`, `_`, `-`)
    and the whole value is not an existing path whose right side is not one, so `--model runs/lr=1e-4/ckpt` works.
    """
    parsed = []
    for spec in specs:
        name, separator, path = spec.partition("=")
        named = bool(separator) and MODEL_NAME.fullmatch(name) is not None
        if named and os.path.exists(spec) and not os.path.exists(path):
            named = False
        if not named:
            name, path = Path(spec.rstrip("/")).name, spec
        if not name or not path:
            raise CheckpointError(f"--model {spec!r}: expected CKPT or NAME=CKPT")
        if name in (existing for existing, _ in parsed):
            raise CheckpointError(
                f"--model {spec!r}: the name {name!r} is used twice; give each NAME=CKPT its own name"
            )
        parsed.append((name, path))
    return parsed


def load_prefix_encoder(config, folder: Path) -> PrefixEncoder:
    """A P-Tuning v2 prefix encoder for a base with `config`, with the weights of `folder` (fp32, eval mode)."""
    pre_seq_len, prefix_projection = prefix_settings(folder)
    prefix_config = copy.deepcopy(config)
    prefix_config.pre_seq_len, prefix_config.prefix_projection = pre_seq_len, prefix_projection
    encoder = PrefixEncoder(prefix_config).float().eval()
    holder = SimpleNamespace(config=prefix_config, transformer=SimpleNamespace(prefix_encoder=encoder))
    load_prefix_checkpoint(holder, folder)
    return encoder


def _variant_of(model, kind: CheckpointKind) -> Variant:
    """The variant a single loaded checkpoint runs with (its own adapter or prefix)."""
    if kind is CheckpointKind.LORA and isinstance(model, PeftModel):
        return Variant(adapter=model.active_adapter)
    if kind is CheckpointKind.PREFIX:
        return Variant(prefix=model.transformer.prefix_encoder)
    return Variant()


def _load_options(options: LoadOptions) -> dict:
    return {
        "device": options.device,
        "dtype": options.dtype,
        "quantization_bit": options.quantization_bit,
        "allow_other_base": options.allow_other_base,
    }


def shared_base_quantization(members: list[tuple[str, str]], options: LoadOptions) -> int | None:
    """The bits a shared base loads with: --quantization_bit, else what the members' training records agree on."""
    if options.quantization_bit is not None:
        return options.quantization_bit
    records = {path: read_training_record(path) for _, path in members}
    recorded = {path: recorded_bits(record) or 0 for path, record in records.items() if record is not None}
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{path} ({bits or 'not quantized'})" for path, bits in recorded.items())
        raise CheckpointError(
            f"checkpoints sharing one base were trained on differently quantized bases: {listed}; serve them on "
            "separate bases or pass --quantization_bit"
        )
    return next(iter(recorded.values()), 0)


def load_served_models(specs: list[str], options: LoadOptions, max_batch_size: int) -> dict[str, ServedModel]:
    """Load every `--model` value, sharing bases; returns the served models by name (engines started)."""
    parsed = parse_model_specs(specs)
    kinds = {name: detect_checkpoint_kind(path) for name, path in parsed}
    served: dict[str, ServedModel] = {}
    if len(parsed) == 1:
        name, path = parsed[0]
        model, tokenizer, kind = load_for_inference(
            path, base=options.base, tokenizer=options.tokenizer, **_load_options(options)
        )
        engine = ServingEngine(model, max_batch_size).start()
        seq_length = int(model.config.seq_length)
        served[name] = ServedModel(name, path, kind, engine, tokenizer, _variant_of(model, kind), seq_length)
        return served
    bases: dict[str, list[tuple[str, str]]] = {}
    for name, path in parsed:
        if kinds[name] in (CheckpointKind.LORA, CheckpointKind.PREFIX):
            base = open_base(path, options.base, options.allow_other_base)
            bases.setdefault(os.path.realpath(base), []).append((name, path))
    for name, path in parsed:
        real = os.path.realpath(path)
        if kinds[name] is CheckpointKind.BASE and real in bases:
            bases[real].append((name, path))
        elif kinds[name] in (CheckpointKind.BASE, CheckpointKind.FULL):
            model, tokenizer, kind = load_for_inference(path, tokenizer=options.tokenizer, **_load_options(options))
            engine = ServingEngine(model, max_batch_size).start()
            served[name] = ServedModel(name, path, kind, engine, tokenizer, Variant(), int(model.config.seq_length))
    for base_path, members in bases.items():
        load_options = {**_load_options(options), "quantization_bit": shared_base_quantization(members, options)}
        model, tokenizer, _ = load_for_inference(base_path, tokenizer=options.tokenizer, **load_options)
        config = model.config
        variants = {}
        for index, (name, path) in enumerate(members):
            kind = kinds[name]
            if kind is CheckpointKind.LORA:
                model = load_lora_adapter(model, Path(path), base_path, adapter_name=f"adapter{index}")
                variants[name] = Variant(adapter=f"adapter{index}")
            elif kind is CheckpointKind.PREFIX:
                encoder = load_prefix_encoder(config, Path(path)).to(next(model.parameters()).device)
                variants[name] = Variant(prefix=encoder)
            else:
                variants[name] = Variant()
        model.eval()
        engine = ServingEngine(model, max_batch_size).start()
        for name, path in members:
            served[name] = ServedModel(
                name, path, kinds[name], engine, tokenizer, variants[name], int(config.seq_length)
            )
    return {name: served[name] for name, _ in parsed}
