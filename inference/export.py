"""Export a fine-tuned checkpoint as a standalone model folder (official layout, safetensors, tokenizer files).

    python inference/export.py --model output/checkpoint-1000 --output_dir chatglm3-6b-tuned

LoRA: the adapter is merged into its base (PEFT merge_and_unload). P-Tuning v2: the prefix is folded in: the
config keeps pre_seq_len/prefix_projection and the weights include `transformer.prefix_encoder.*`, so
`AutoModelForCausalLM.from_pretrained(OUT)` (after `import finetune`) gives the prefix model. Full and base
checkpoints are re-saved as they are. The folder is built next to OUT and renamed into place. The base's
`auto_map` is kept and its official remote-code files (modeling_chatglm.py, ...) are copied along when it has them
(a warning says what to copy when the base has an auto_map but not the files).
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from finetune.atomic_files import replace_folder
from finetune.checkpoint_format import open_checkpoint
from finetune.checkpoints import (
    DTYPES,
    ModelLoadError,
    add_allow_other_base_argument,
    load_for_inference,
    resolve_base,
)
from finetune.methods.base import CheckpointKind
from finetune.model.checkpoint_files import CheckpointError, check_chatglm_folder, read_json_file
from finetune.model.remote_code import copy_remote_code_files

DEFAULT_MAX_SHARD_SIZE = "5GB"


def stored_dtype(model_folder: str) -> str:
    """The dtype a model folder's config.json says its weights are stored in (float32 when it does not say)."""
    config_path = Path(model_folder) / "config.json"
    config = read_json_file(config_path) if config_path.is_file() else {}
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def check_output_dir(output_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse to write over a source checkpoint, or over a non-empty folder without --overwrite."""
    resolved = output_dir.resolve()
    for source in sources:
        if resolved == source.resolve():
            raise CheckpointError(
                f"{output_dir}: is the checkpoint or base being exported; choose another --output_dir"
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"{output_dir}: exists and is a file; choose another --output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{output_dir}: exists and is not empty; pass --overwrite to replace it")


def export_checkpoint(
    checkpoint: str,
    output_dir: str,
    base: str | None = None,
    tokenizer: str | None = None,
    dtype: str | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_other_base: bool = False,
) -> CheckpointKind:
    """Write `checkpoint` (with its base for LoRA/prefix) as a standalone model folder; return its kind."""
    opened = open_checkpoint(checkpoint)
    base_path = resolve_base(opened, base) if opened.needs_base else checkpoint
    target = Path(output_dir)
    check_output_dir(target, [Path(checkpoint), Path(base_path)], overwrite)
    model, loaded_tokenizer, kind = load_for_inference(
        opened,
        base=base_path if opened.needs_base else None,
        tokenizer=tokenizer,
        device="cpu",
        dtype=dtype or stored_dtype(base_path),
        quantization_bit=0,
        merge_lora=True,
        allow_other_base=allow_other_base,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=target.parent))
    try:
        built = workspace / target.name
        model.save_pretrained(built, max_shard_size=max_shard_size)
        loaded_tokenizer.save_pretrained(built)
        copy_remote_code_files(base_path, built, shown_as=target)
        check_chatglm_folder(built)
        replace_folder(built, target)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return kind


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the export."""
    parser = argparse.ArgumentParser(
        description="Merge a LoRA adapter or fold a P-Tuning v2 prefix into a standalone ChatGLM3 model folder."
    )
    parser.add_argument("--model", required=True, help="checkpoint folder: LoRA, P-Tuning v2, full or base")
    parser.add_argument("--output_dir", required=True, help="folder to write (built next to it, then renamed)")
    parser.add_argument("--base", help="base model folder (default: from training_record.json / adapter_config.json)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the base model's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the base's stored dtype)")
    parser.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE, help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    add_allow_other_base_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message on a checkpoint problem)."""
    args = build_parser().parse_args(argv)
    try:
        kind = export_checkpoint(
            args.model,
            args.output_dir,
            args.base,
            args.tokenizer,
            args.dtype,
            args.max_shard_size,
            args.overwrite,
            args.allow_other_base,
        )
    except (CheckpointError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {kind.value} checkpoint {args.model} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
