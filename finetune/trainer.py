"""The toolkit's Trainer: Seq2SeqTrainer that saves the method's checkpoint files (finetune.methods) with
training_record.json in the layout of finetune.checkpoint_format, atomically, and evaluates by generating answers.

A checkpoint is written into `tmp-checkpoint-N` and renamed to `checkpoint-N` only once every file is in place, so a
crash mid-save never leaves a folder that resume would use.
"""

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import Seq2SeqTrainer
from transformers.distributed.fsdp import is_fsdp_managed_module
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import SaveStrategy, rotate_checkpoints

from finetune.atomic_files import replace_folder
from finetune.arguments import DataArguments, ModelArguments
from finetune.base_fingerprint import base_fingerprint
from finetune.callbacks import ResumedScheduleCallback
from finetune.checkpoint_format import (
    FINAL_STAGING_NAME,
    TRAINER_STATE_FILE,
    build_training_record,
    checkpoint_folder_name,
    checkpoint_folders,
    move_files_into,
    staging_folder,
    write_training_record,
)
from finetune.generation_eval_batches import (
    GENERATION_KEYS,
    PROMPT_ATTENTION_MASK,
    PROMPT_INPUT_IDS,
    REFERENCE_IDS,
    blank_after_stop,
)
from finetune.memory_preflight import ADAMW_STATE_BYTES as ADAM_STATE_BYTES_PER_PARAMETER
from finetune.memory_preflight import MASTER_WEIGHT_BYTES as MASTER_WEIGHT_BYTES_PER_PARAMETER
from finetune.methods import FinetuneMethod, method_of
from finetune.methods.base import SaveContext, parameter_size

logger = logging.getLogger(__name__)

GIB = 1024**3
# Below this many free bytes a failed write is taken for a full disk, whatever the writer's own message says
# (torch.save reports "basic_ios::clear: iostream error", safetensors an "os error 28").
NEARLY_FULL_BYTES = 1024**2


class DiskFullError(OSError):
    """A checkpoint did not fit on the output folder's disk (the partial folder has been removed)."""


def folder_size(folder: Path) -> int:
    """Bytes in the files under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def checkpoint_size_estimate(model: nn.Module, method: FinetuneMethod, deepspeed: bool) -> int:
    """About how many bytes one checkpoint takes: the saved weights plus the Adam state of the trained ones."""
    saved = trained = 0
    for parameter in model.parameters():
        count = parameter_size(parameter)
        if parameter.requires_grad:
            trained += count
        if parameter.requires_grad or method.trains_base_weights:
            saved += count * parameter.element_size()
    per_trained = ADAM_STATE_BYTES_PER_PARAMETER + (MASTER_WEIGHT_BYTES_PER_PARAMETER if deepspeed else 0)
    return saved + trained * per_trained


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """True when a failed write ran out of disk space in `folder`."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "no space left" in str(error).lower() or "os error 28" in str(error).lower():
        return True
    return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES


class FinetuneTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer that saves the agreed checkpoint format atomically and evaluates by generating answers."""

    def __init__(
        self,
        *args,
        model_args: ModelArguments,
        data_args: DataArguments,
        eval_data_collator: Callable[[list[dict]], dict],
        max_new_tokens: int,
        **kwargs,
    ):
        self.model_args = model_args
        self.base_fingerprint = base_fingerprint(model_args.model_name_or_path)
        self.method = method_of(model_args)
        self.data_args = data_args
        self.eval_data_collator = eval_data_collator
        self.max_new_tokens = max_new_tokens
        model = kwargs.get("model")
        with self._allow_quantized_prefix_training(model):
            super().__init__(*args, **kwargs)
        # The model's forward accepts **kwargs but computes a per-batch mean loss and ignores num_items_in_batch, so
        # the Trainer must scale the loss for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.add_callback(ResumedScheduleCallback())

    @contextlib.contextmanager
    def _allow_quantized_prefix_training(self, model: nn.Module | None):
        """Let Trainer accept a quantized base whose trainable part is our own fp32 prefix encoder, not PEFT.

        Trainer refuses a quantized model without PEFT adapters because such a model has nothing trainable; with
        P-Tuning v2 the prefix encoder (never quantized) is trainable, which is checked here instead.
        """
        if not getattr(model, "is_quantized", False) or isinstance(model, PeftModel):
            yield
            return
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        if not trainable or any(parameter.dtype != torch.float32 for parameter in trainable):
            raise ValueError(
                "a quantized model trained without PEFT adapters needs a trainable fp32 prefix encoder (P-Tuning v2)"
            )
        model.is_quantized = False
        try:
            yield
        finally:
            model.is_quantized = True

    # ---- saving -------------------------------------------------------------------------------------------------

    # Private override: Trainer.save_model gathers the ZeRO-3/FSDP state dict and hands it only to _save; no public
    # hook writes the model files.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the model files of this method and training_record.json into `output_dir`."""
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("Saving %s checkpoint files to %s", self.method.name, folder)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.method.save(model, folder, SaveContext(self.model_args, self.processing_class, state_dict))
        record = build_training_record(
            self.model_args,
            self.data_args,
            self.args.to_dict(),
            self.state.global_step,
            base=self.base_fingerprint,
            world_size=self.args.world_size,
        )
        write_training_record(folder, {**record, **self.stage_record()})

    def stage_record(self) -> dict:
        """Fields of training_record.json beyond the method's: none here; preference tuning records its stage."""
        return {}

    def checkpoint_bytes(self, run_dir: Path) -> int:
        """About how many bytes the next checkpoint takes: the newest complete one's size, else an estimate."""
        existing = checkpoint_folders(run_dir)
        if existing:
            return folder_size(existing[-1][1])
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return checkpoint_size_estimate(model, self.method, self.is_deepspeed_enabled)

    def check_free_space(self, run_dir: Path | None = None) -> None:
        """Raise DiskFullError when the output folder's disk has less free space than a checkpoint needs."""
        run_dir = Path(run_dir or self.args.output_dir)
        if not self.args.should_save:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        needed = self.checkpoint_bytes(run_dir)
        free = shutil.disk_usage(run_dir).free
        if free < needed:
            raise DiskFullError(self._disk_full_message(run_dir, needed, free))

    def _disk_full_message(self, run_dir: Path, needed: int, free: int) -> str:
        """The one-line explanation of a full disk under `run_dir`."""
        return (
            f"no space left on {run_dir} (needs about {needed / GIB:.3g} GiB for a checkpoint, {free / GIB:.3g} GiB "
            "free): free some space, lower --save_total_limit, or pass an --output_dir (OUTPUT_DIR) on a larger disk"
        )

    @contextlib.contextmanager
    def _disk_full_guard(self, staging: Path, run_dir: Path) -> Iterator[None]:
        """Turn a save that runs out of disk space into a DiskFullError, deleting its staging folder (other
        failures leave the folder as it is; resume never uses it)."""
        try:
            yield
        except Exception as error:
            if not (self.args.should_save and is_disk_full(error, run_dir)):
                raise
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            needed = self.checkpoint_bytes(run_dir)
            message = self._disk_full_message(run_dir, needed, shutil.disk_usage(run_dir).free)
            raise DiskFullError(f"{message}; the partial {staging.name} was removed") from error

    # Private override: no public hook chooses the folder a checkpoint is written into (on_save runs once the files
    # are in checkpoint-N), so writing into tmp-checkpoint-N and renaming it needs this method.
    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write checkpoint-N as Trainer does, but into tmp-checkpoint-N, renamed to checkpoint-N when complete.

        Mirrors Trainer._save_checkpoint (transformers 5.24): model files, optimizer/scheduler/scaler/RNG state,
        trainer state, then rotation of old checkpoints, which only ever sees complete `checkpoint-N` folders.
        """
        name = checkpoint_folder_name(self.state.global_step)
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / name
        staging = staging_folder(final)
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.check_free_space(run_dir)
        self.accelerator.wait_for_everyone()

        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        with self._disk_full_guard(staging, run_dir):
            self.save_model(str(staging), _internal_call=True)
            best_step = self.state.best_global_step
            if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
                best = run_dir / checkpoint_folder_name(best_step)
                if best_step == self.state.global_step or best.exists():
                    self.state.best_model_checkpoint = str(best)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(str(staging))
                self._save_scaler(str(staging))
                self._save_rng_state(str(staging))
            if self.args.should_save:
                self._save_trainer_state(staging)

        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_folder(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_trainer_state(self, folder: Path) -> None:
        """Record the state of stateful callbacks and write trainer_state.json into `folder`."""
        for callback in self.callback_handler.callbacks + [self.control]:
            if not isinstance(callback, ExportableState):
                continue
            callback_name = callback.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(callback_name), list):
                self.state.stateful_callbacks[callback_name].append(callback.state())
            else:
                self.state.stateful_callbacks[callback_name] = callback.state()
        self.state.save_to_json(str(folder / TRAINER_STATE_FILE))

    def save_final_model(self) -> None:
        """Save the trained model into output_dir: staged in tmp-final, moved in file by file, the record last."""
        output_dir = Path(self.args.output_dir)
        staging = output_dir / FINAL_STAGING_NAME
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        with self._disk_full_guard(staging, output_dir):
            self.save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            move_files_into(staging, output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ---- loading ------------------------------------------------------------------------------------------------

    def load_checkpoint_weights(self, folder: str | os.PathLike) -> None:
        """Load the trained weights of a checkpoint folder of this method into the model (e.g. to evaluate it)."""
        self._load_from_checkpoint(str(folder))

    # Private override: Trainer.train loads a resumed checkpoint's weights only here; no public hook lets the method
    # load its own weights (a prefix into the prefix encoder).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load a checkpoint's weights: by the method when it loads them itself (a prefix into the prefix encoder)."""
        if self.method.load_trained_weights(model if model is not None else self.model, Path(resume_from_checkpoint)):
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # Private override: load_best_model_at_end loads the best checkpoint only here; no public hook lets the method
    # load its own weights.
    def _load_best_model(self) -> None:
        """Load the best checkpoint at the end of training, by the method when it loads its weights itself."""
        if not self.is_deepspeed_enabled and self.method.load_trained_weights(
            self.model, Path(self.state.best_model_checkpoint)
        ):
            return
        super()._load_best_model()

    # ---- training -----------------------------------------------------------------------------------------------

    def _track_num_input_tokens(self, inputs: dict) -> None:
        """Count non-padding tokens also for packed rows, whose attention_mask holds segment ids 1, 2, ..."""
        mask = inputs.get("attention_mask")
        if mask is not None and bool((mask > 1).any()):
            inputs = {**inputs, "attention_mask": (mask > 0).long()}
        super()._track_num_input_tokens(inputs)

    # ---- evaluation ---------------------------------------------------------------------------------------------

    def _get_dataloader(
        self,
        dataset,
        description: str,
        batch_size: int,
        sampler_fn=None,
        is_training: bool = False,
        dataloader_key: str | None = None,
    ):
        """Trainer's dataloader, batched by `eval_data_collator` for evaluation and prediction."""
        if is_training:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        training_collator = self.data_collator
        self.data_collator = self.eval_data_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator = training_collator

    def _stop_token_ids(self) -> list[int]:
        """Token ids that end a generated answer: the generation config's eos ids and the tokenizer's eos."""
        eos = self.accelerator.unwrap_model(self.model).generation_config.eos_token_id
        stop_ids = list(eos) if isinstance(eos, Sequence) else [eos] if eos is not None else []
        if self.processing_class is not None and self.processing_class.eos_token_id not in stop_ids:
            stop_ids.append(self.processing_class.eos_token_id)
        return stop_ids

    def _generation_kwargs(self, overrides: dict) -> dict:
        """Greedy decoding of at most max_new_tokens, updated by Seq2SeqTrainer's and the caller's settings."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "eos_token_id": self._stop_token_ids(),
            "pad_token_id": self.processing_class.pad_token_id,
            "synced_gpus": is_deepspeed_zero3_enabled() or is_fsdp_managed_module(self.model),
        }
        kwargs.update(getattr(self, "_gen_kwargs", {}))
        kwargs.update(overrides)
        if kwargs.get("max_length") is not None:
            kwargs.pop("max_new_tokens")
        return {key: value for key, value in kwargs.items() if value is not None}

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation loss on the full examples and, with predict_with_generate, greedy answers to the prompts.

        Returns (loss, generated answer ids with the prompt removed and stop tokens blanked, reference ids).
        """
        inputs = dict(inputs)
        generation_inputs = {key: inputs.pop(key) for key in GENERATION_KEYS if key in inputs}
        inputs = self._prepare_inputs(inputs)
        loss = None
        if "labels" in inputs:
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = model(**inputs, logits_to_keep=1).loss.detach()
        if prediction_loss_only or not self.args.predict_with_generate or not generation_inputs:
            return loss, None, None
        generation_inputs = self._prepare_inputs(generation_inputs)
        prompt_ids = generation_inputs[PROMPT_INPUT_IDS]
        kwargs = self._generation_kwargs(gen_kwargs)
        with torch.no_grad():
            generated = self.model.generate(
                input_ids=prompt_ids, attention_mask=generation_inputs[PROMPT_ATTENTION_MASK], **kwargs
            )
        answers = blank_after_stop(generated[:, prompt_ids.shape[1] :], kwargs["eos_token_id"], kwargs["pad_token_id"])
        if answers.shape[1] == 0:
            answers = torch.full((answers.shape[0], 1), kwargs["pad_token_id"], device=answers.device)
        return loss, answers, generation_inputs[REFERENCE_IDS]
