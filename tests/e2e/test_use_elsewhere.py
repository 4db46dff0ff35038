"""The folders we write load in the official ChatGLM3 remote code and older PEFT, with the same tokens and logits.

A real old stack (transformers 4.40.2, tokenizers 0.19.1, huggingface_hub 0.23.4, peft 0.11.1, installed with
`pip install --no-deps --target` into a cache folder on first use, next to the project's torch) runs THUDM's official
`*_chatglm.py` files from ../shared/official_chatglm3 in a subprocess (tests/official_stack_probe.py). We train and
export tiny checkpoints of every kind from a base folder that carries those files, load each one the way users of the
official code do, and compare with what our own loader gives. The reverse direction is checked too: a LoRA adapter
saved by peft 0.11.1 and the official v1 P-Tuning checkpoint load in our loader (the one `python inference.py` uses).
Outside CI the test skips when the old stack cannot be installed (no network); under CI it runs.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cached_test_dependencies import old_stack_folder, unavailable
from safetensors.torch import load_file
from train_helpers import input_output_records, run_arguments, write_jsonl

import finetune.model  # noqa: F401  (registers the Auto classes)
from finetune.checkpoints import load_for_inference
from finetune.model import ChatGLMTokenizer
from finetune.train import main as train
from inference.export import export_checkpoint

pytestmark = pytest.mark.slow  # trains and exports three tiny runs, then loads them in a second Python stack

OFFICIAL_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
PROBE = Path(__file__).resolve().parents[1] / "official_stack_probe.py"
PROMPTS = ["你好", "类型#裙*颜色#红色*风格#简约", "Hello world, the quick brown fox jumps!"]
TEXTS = ["你好", "Hello world", "数字12345和English混合", "  two  spaces\n\tand tab", "<|user|> stays text </s>"]
HISTORY = [
    {"role": "system", "content": "Answer well.", "tools": [{"name": "get_weather", "parameters": {"city": "str"}}]},
    {"role": "user", "content": "北京天气"},
    {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
    {"role": "observation", "content": '{"temperature": 21}'},
]
# fp32 on the CPU: the two implementations differ only in the order of floating-point operations.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def old_stack() -> Path:
    """The folder holding the old transformers/tokenizers/huggingface_hub/peft (installed on first use)."""
    return old_stack_folder()


def run_probe(old_stack: Path, jobs: list[dict], work: Path) -> dict:
    """Run the probe jobs in the old stack; return results.json with each job's tensors loaded, and its stderr."""
    work.mkdir(parents=True, exist_ok=True)
    jobs_path = work / "jobs.json"
    jobs_path.write_text(json.dumps(jobs, ensure_ascii=False), encoding="utf-8")
    environment = {**os.environ, "PYTHONPATH": str(old_stack), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    environment["HF_MODULES_CACHE"] = str(work / "hf_modules")
    completed = subprocess.run(
        [sys.executable, str(PROBE), str(jobs_path), str(work)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=work,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((work / "results.json").read_text(encoding="utf-8"))
    for name, output in results["jobs"].items():
        assert "error" not in output, f"{name}: {output['error']}"
        if "tensors" in output:
            results["jobs"][name] = load_file(work / output["tensors"])
    results["stderr"] = completed.stderr
    return results


@pytest.fixture(scope="module")
def official_base(reference_model_dir: Path, shared_dir: Path, tmp_path_factory) -> Path:
    """The tiny official-layout checkpoint with THUDM's remote-code files beside it, as a chatglm3-6b download."""
    official_code = shared_dir / "official_chatglm3"
    if not official_code.is_dir():
        unavailable(f"{official_code} not found")
    folder = tmp_path_factory.mktemp("base") / "chatglm3-tiny"
    shutil.copytree(reference_model_dir, folder)
    for name in OFFICIAL_FILES:
        shutil.copyfile(official_code / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def written(official_base: Path, tmp_path_factory) -> dict[str, Path]:
    """Every checkpoint kind training and export write: trained briefly on the official base, then exported."""
    root = tmp_path_factory.mktemp("written")
    train_file = write_jsonl(root / "train.jsonl", input_output_records(4))
    runs = {
        "lora": {"lora_rank": 4, "lora_alpha": 32},
        "ptuning": {"pre_seq_len": 4},
        "full": {"learning_rate": 1e-3},
    }
    folders = {}
    for name, flags in runs.items():
        arguments = {"max_steps": 2, "save_steps": 100, **flags}
        train(run_arguments(official_base, train_file, root / name, root / "cache", **arguments))
        folders[name] = root / name
    for name in ("lora", "ptuning", "full"):
        export_checkpoint(str(folders[name]), str(root / f"{name}-export"))
        folders[f"{name}-export"] = root / f"{name}-export"
    return folders


def model_job(name: str, kind: str, **fields) -> dict:
    """A probe job that loads a model and returns its logits for PROMPTS."""
    return {"name": name, "kind": kind, "prompts": PROMPTS, **fields}


def our_logits(checkpoint: Path, batch: dict[str, torch.Tensor], base: Path | None = None) -> torch.Tensor:
    """Logits of our loader (the one `python inference.py --model CHECKPOINT` uses) for the official batch."""
    model, _, _ = load_for_inference(
        str(checkpoint), base=str(base) if base else None, device="cpu", dtype="float32", quantization_bit=0
    )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        return model(**inputs).logits.float()


def max_difference(official: dict[str, torch.Tensor], ours: torch.Tensor) -> float:
    """Largest absolute logit difference over the real (non-padding) tokens."""
    real = official["attention_mask"].bool()
    return (official["logits"][real] - ours[real]).abs().max().item()


def id_sequences(tokenizer: ChatGLMTokenizer) -> list[list[int]]:
    """Id sequences whose decoding differs between careless implementations: command tokens before word-start
    pieces, control ids, ids past the tokenizer's range (the embedding's padding rows), byte pieces."""
    tool_name = tokenizer.encode("get_weather", add_special_tokens=False)
    hello = tokenizer.encode("你好 world", add_special_tokens=False)
    beyond = tokenizer.vocab_size + 5
    generator = torch.Generator().manual_seed(3)
    random_rows = torch.randint(0, tokenizer.vocab_size + 20, (6, 12), generator=generator).tolist()
    return [
        [907] + tool_name,
        [901, 903] + tokenizer.build_single_message("user", "", "你好") + [907, 2],
        [400, 0, 400],
        [1] + hello + [2, beyond, 906] + hello,
        hello + [beyond, 907, 908] + tool_name,
        *random_rows,
    ]


def test_tokenizers_we_save_load_in_the_official_tokenizer_and_agree(old_stack, official_base, written, tmp_path):
    folders = {name: written[name] for name in ("full", "lora-export", "ptuning-export", "full-export")}
    ours_by_folder = {name: ChatGLMTokenizer.from_pretrained(folder) for name, folder in folders.items()}
    sequences = id_sequences(ours_by_folder["full"])
    job = {"texts": TEXTS, "id_sequences": sequences, "prompts": PROMPTS, "query": "那上海呢？"}
    job["history"] = HISTORY
    jobs = [{"name": name, "kind": "tokenizer", "folder": str(folder), **job} for name, folder in folders.items()]
    results = run_probe(old_stack, jobs, tmp_path / "probe")["jobs"]
    for name, ours in ours_by_folder.items():
        official = results[name]
        saved = json.loads((folders[name] / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert not {"eos_token", "pad_token", "unk_token", "bos_token", "added_tokens_decoder"} & set(saved), name
        assert official["encode"] == [ours.encode(text) for text in TEXTS], name
        assert official["encode_plain"] == [ours.encode(text, add_special_tokens=False) for text in TEXTS], name
        assert official["decode"] == [ours.decode(ids) for ids in sequences], name
        expected_chat = ours.build_chat_input("那上海呢？", history=HISTORY)["input_ids"][0].tolist()
        assert official["chat_input"] == expected_chat, name
        batch = ours(PROMPTS, padding=True)
        assert official["batch"] == {key: [list(row) for row in value] for key, value in batch.items()}, name
    assert results["full"]["decode"][0] == "<|assistant|> get_weather"
    assert results["full"]["decode"][2] == "vava"


def test_checkpoints_we_write_load_in_the_official_code_and_peft_0_11_with_our_logits(
    old_stack, official_base, written, tmp_path
):
    for name in ("full", "lora-export", "ptuning-export", "full-export"):
        config = json.loads((written[name] / "config.json").read_text(encoding="utf-8"))
        assert config["torch_dtype"] == config["dtype"] == "float32" and config["use_cache"] is True, name
    adapter_config = json.loads((written["lora"] / "adapter_config.json").read_text(encoding="utf-8"))
    assert "alora_invocation_tokens" not in adapter_config and "peft_version" not in adapter_config
    assert (written["ptuning"] / "pytorch_model.bin").is_file()

    base = str(official_base)
    jobs = [
        model_job("base", "automodel", folder=base),
        model_job("lora adapter | PeftModel", "peft", base=base, adapter=str(written["lora"])),
        model_job("ptuning checkpoint | official v1", "v1_ptuning", base=base, checkpoint=str(written["ptuning"])),
    ]
    for kind in ("lora-export", "ptuning-export", "full", "full-export"):
        jobs.append(model_job(f"{kind} | official AutoModel", "automodel", folder=str(written[kind])))
    probe = run_probe(old_stack, jobs, tmp_path / "probe")
    results = probe["jobs"]
    # The official loader finds every weight it has in our folders: no "newly initialized ... rotary_pos_emb.inv_freq"
    # (the v1 P-Tuning recipe itself still reports its fresh prefix encoder before loading the prefix).
    assert "rotary_pos_emb.inv_freq" not in probe["stderr"], probe["stderr"][-2000:]

    base_logits = our_logits(official_base, results["base"])
    assert max_difference(results["base"], base_logits) < LOGIT_TOLERANCE
    sources = {
        "lora adapter | PeftModel": (written["lora"], official_base),
        "ptuning checkpoint | official v1": (written["ptuning"], official_base),
        "lora-export | official AutoModel": (written["lora-export"], None),
        "ptuning-export | official AutoModel": (written["ptuning-export"], None),
        "full | official AutoModel": (written["full"], None),
        "full-export | official AutoModel": (written["full-export"], None),
    }
    table = {}
    for name, (checkpoint, checkpoint_base) in sources.items():
        ours = our_logits(checkpoint, results[name], checkpoint_base)
        table[name] = max_difference(results[name], ours)
        # The tuned weights really took part: the logits moved away from the base's.
        assert max_difference(results["base"], ours) > 100 * LOGIT_TOLERANCE, name
    print(f"\nmax |official - ours| logit difference ({probe['versions']}):")
    for name, difference in table.items():
        print(f"  {name}: {difference:.2e}")
    assert max(table.values()) < LOGIT_TOLERANCE, table


def test_official_v1_ptuning_and_peft_0_11_adapters_load_in_our_loader(
    old_stack, official_base, reference_dir, tmp_path
):
    adapter = tmp_path / "peft-0.11.1-adapter"
    base = str(official_base)
    jobs = [
        model_job("saved adapter", "save_peft_adapter", base=base, adapter=str(adapter), seed=5),
        model_job("official v1 ptuning", "v1_ptuning", base=base, checkpoint=str(reference_dir / "ptuning")),
    ]
    probe = run_probe(old_stack, jobs, tmp_path / "probe")
    results = probe["jobs"]
    adapter_difference = max_difference(results["saved adapter"], our_logits(adapter, results["saved adapter"]))
    prefix_difference = max_difference(
        results["official v1 ptuning"],
        our_logits(reference_dir / "ptuning", results["official v1 ptuning"], base=official_base),
    )
    print(f"\npeft 0.11.1 adapter in ours: {adapter_difference:.2e}")
    print(f"official v1 P-Tuning checkpoint in ours: {prefix_difference:.2e}")
    assert adapter_difference < LOGIT_TOLERANCE and prefix_difference < LOGIT_TOLERANCE
