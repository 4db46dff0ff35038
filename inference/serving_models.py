"""The models a server offers: `--model CKPT` or several `--model NAME=CKPT`, loaded once per base.

Every checkpoint is opened once (finetune.checkpoint_format.open_checkpoint). One loads through
finetune.checkpoints.load_for_inference (every kind). With several, the checkpoints that load on a base (LoRA
adapters, P-Tuning v2 prefixes) and name the same one share one copy of it: each is attached to it by its method
(an adapter under its own name, a prefix encoder of its own); a `NAME=BASE` entry serves that base itself. Other
whole models are loaded on their own. A shared base is quantized as its checkpoints' training records say (they must
agree) unless --quantization_bit is given. Each loaded model gets one ServingEngine.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.checkpoint_format import Checkpoint, open_checkpoint
from finetune.checkpoints import load_for_inference, open_base
from finetune.methods.base import Attachment, CheckpointKind
from finetune.model.checkpoint_files import CheckpointError
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


def variant_of(attachment: Attachment) -> Variant:
    """The engine's variant for what a checkpoint's method attached."""
    return Variant(adapter=attachment.adapter, prefix=attachment.prefix)


def _load_options(options: LoadOptions) -> dict:
    return {
        "device": options.device,
        "dtype": options.dtype,
        "quantization_bit": options.quantization_bit,
        "allow_other_base": options.allow_other_base,
    }


def shared_base_quantization(members: list[Checkpoint], options: LoadOptions) -> int | None:
    """The bits a shared base loads with: --quantization_bit, else what the members' training records agree on."""
    if options.quantization_bit is not None:
        return options.quantization_bit
    recorded = {str(member.folder): member.quantization_bit or 0 for member in members if member.record is not None}
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{path} ({bits or 'not quantized'})" for path, bits in recorded.items())
        raise CheckpointError(
            f"checkpoints sharing one base were trained on differently quantized bases: {listed}; serve them on "
            "separate bases or pass --quantization_bit"
        )
    return next(iter(recorded.values()), 0)


def base_key(base: str) -> str:
    """What identifies a base for sharing: a local folder's real path (links and `..` resolved), else the hub name."""
    return os.path.realpath(base) if os.path.isdir(base) else base


def load_served_models(specs: list[str], options: LoadOptions, max_batch_size: int) -> dict[str, ServedModel]:
    """Load every `--model` value, sharing bases; returns the served models by name (engines started)."""
    parsed = parse_model_specs(specs)
    paths = dict(parsed)
    checkpoints = {name: open_checkpoint(path) for name, path in parsed}
    served: dict[str, ServedModel] = {}
    if len(parsed) == 1:
        name, path = parsed[0]
        checkpoint = checkpoints[name]
        model, tokenizer, kind = load_for_inference(
            checkpoint, base=options.base, tokenizer=options.tokenizer, **_load_options(options)
        )
        engine = ServingEngine(model, max_batch_size).start()
        variant = variant_of(checkpoint.attachment_of(model))
        served[name] = ServedModel(name, path, kind, engine, tokenizer, variant, int(model.config.seq_length))
        return served
    bases: dict[str, list[str]] = {}
    for name, checkpoint in checkpoints.items():
        if checkpoint.needs_base:
            base = open_base(checkpoint, options.base, options.allow_other_base)
            bases.setdefault(base_key(base), []).append(name)
    for name, path in parsed:
        checkpoint = checkpoints[name]
        if checkpoint.needs_base:
            continue
        if base_key(path) in bases:
            bases[base_key(path)].append(name)
            continue
        model, tokenizer, kind = load_for_inference(checkpoint, tokenizer=options.tokenizer, **_load_options(options))
        engine = ServingEngine(model, max_batch_size).start()
        served[name] = ServedModel(name, path, kind, engine, tokenizer, Variant(), int(model.config.seq_length))
    for base_path, members in bases.items():
        quantization = shared_base_quantization([checkpoints[name] for name in members], options)
        load_options = {**_load_options(options), "quantization_bit": quantization}
        model, tokenizer, _ = load_for_inference(base_path, tokenizer=options.tokenizer, **load_options)
        variants = {}
        for index, name in enumerate(members):
            model, attachment = checkpoints[name].attach(model, slot=f"adapter{index}")
            variants[name] = variant_of(attachment)
        model.eval()
        engine = ServingEngine(model, max_batch_size).start()
        for name in members:
            kind, seq_length = checkpoints[name].kind, int(model.config.seq_length)
            served[name] = ServedModel(name, paths[name], kind, engine, tokenizer, variants[name], seq_length)
    return {name: served[name] for name, _ in parsed}
