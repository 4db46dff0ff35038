"""Run inside the old stack (transformers 4.40.2, peft 0.11.1, ...) with THUDM's official ChatGLM3 remote code.

Not a test module: tests/e2e/test_use_elsewhere.py starts it as `python official_stack_probe.py JOBS.json OUT_DIR` with
PYTHONPATH pointing at the old stack. Each job loads a folder the way users of the official code do and writes what it
gave (token ids, decoded text, logits) to OUT_DIR: `results.json` plus `<job name>.safetensors` for tensors.
"""

import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")

PREFIX_KEY_PREFIX = "transformer.prefix_encoder."


def official_tokenizer(folder: str):
    """The official ChatGLMTokenizer of `folder` (from its tokenization_chatglm.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert type(tokenizer).__module__.startswith("transformers_modules."), type(tokenizer).__module__
    return tokenizer


def tokenizer_job(job: dict) -> dict:
    """Encodings, decodings, chat inputs and a padded batch from the official tokenizer of job['folder']."""
    tokenizer = official_tokenizer(job["folder"])
    batch = tokenizer(job["prompts"], padding=True)
    return {
        "encode": [tokenizer.encode(text) for text in job["texts"]],
        "encode_plain": [tokenizer.encode(text, add_special_tokens=False) for text in job["texts"]],
        "decode": [tokenizer.decode(ids) for ids in job["id_sequences"]],
        "chat_input": tokenizer.build_chat_input(job["query"], history=job["history"])["input_ids"][0].tolist(),
        "batch": {key: [list(row) for row in value] for key, value in batch.items()},
        "vocab_size": tokenizer.vocab_size,
    }


def official_model(folder: str, **config_overrides):
    """The official ChatGLMForConditionalGeneration of `folder` in fp32 eval mode (config fields overridable)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True, **config_overrides)
    model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=True, torch_dtype=torch.float32)
    # The class must come from the folder's modeling_chatglm.py (transformers' dynamic modules), not from elsewhere.
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    return model.float().eval()


def logits_of(model, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The batch the official tokenizer builds for `prompts` (left-padded) and the model's logits for it."""
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return {**{key: value.contiguous() for key, value in batch.items()}, "logits": logits.float().contiguous()}


def automodel_job(job: dict) -> dict[str, torch.Tensor]:
    """AutoModel.from_pretrained(folder, trust_remote_code=True), as the official demos, FastChat and vLLM load it."""
    model = official_model(job["folder"])
    return logits_of(model, official_tokenizer(job.get("tokenizer", job["folder"])), job["prompts"])


def v1_ptuning_job(job: dict) -> dict[str, torch.Tensor]:
    """The official v1 P-Tuning recipe: base with pre_seq_len, prefix from the checkpoint's pytorch_model.bin."""
    checkpoint_config = json.loads(open(os.path.join(job["checkpoint"], "config.json"), encoding="utf-8").read())
    model = official_model(
        job["base"],
        pre_seq_len=checkpoint_config["pre_seq_len"],
        prefix_projection=checkpoint_config.get("prefix_projection", False),
    )
    state_dict = torch.load(os.path.join(job["checkpoint"], "pytorch_model.bin"), map_location="cpu", weights_only=True)
    prefix = {
        key[len(PREFIX_KEY_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(PREFIX_KEY_PREFIX)
    }
    model.transformer.prefix_encoder.load_state_dict(prefix)
    return logits_of(model, official_tokenizer(job["base"]), job["prompts"])


def peft_job(job: dict) -> dict[str, torch.Tensor]:
    """PeftModel.from_pretrained(official base, adapter folder) on the old PEFT."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(official_model(job["base"]), job["adapter"]).eval()
    return logits_of(model, official_tokenizer(job["base"]), job["prompts"])


def save_peft_adapter_job(job: dict) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter with the old PEFT on the official model (random non-zero B), and its logits."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(job["seed"])
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=16, target_modules=["query_key_value"])
    model = get_peft_model(official_model(job["base"]), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.save_pretrained(job["adapter"])
    return logits_of(model.eval(), official_tokenizer(job["base"]), job["prompts"])


JOBS = {
    "tokenizer": tokenizer_job,
    "automodel": automodel_job,
    "v1_ptuning": v1_ptuning_job,
    "peft": peft_job,
    "save_peft_adapter": save_peft_adapter_job,
}


def main() -> None:
    """Run every job of the jobs file; a job that raises records its error instead of results."""
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out_dir = sys.argv[2]
    import peft
    import transformers

    results = {"versions": {"transformers": transformers.__version__, "peft": peft.__version__}, "jobs": {}}
    for job in jobs:
        try:
            output = JOBS[job["kind"]](job)
        except (AttributeError, OSError, RuntimeError, TypeError, ValueError, KeyError) as error:
            results["jobs"][job["name"]] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if isinstance(output, dict) and output and all(isinstance(value, torch.Tensor) for value in output.values()):
            save_file(output, os.path.join(out_dir, f"{job['name']}.safetensors"))
            results["jobs"][job["name"]] = {"tensors": f"{job['name']}.safetensors"}
        else:
            results["jobs"][job["name"]] = output
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, ensure_ascii=False)


if __name__ == "__main__":
    main()
