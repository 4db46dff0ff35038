"""The tiny-model builder: official folder layout, loadable by our classes, a working tokenizer, other shapes."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune.model  # noqa: F401  (registers the Auto classes)
from finetune.model.modeling import ChatGLMForConditionalGeneration
from finetune.model.tokenization import ChatGLMTokenizer
from finetune.tiny_model import build_tiny_model, main

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
}
SAMPLE_TEXTS = ["类型#裙*颜色#红色*风格#简约", "Hello world, the quick brown fox!", "龘 😀\ttabs\nnewline  ", ""]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The default tiny model, built once for this module."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "chatglm3-tiny")


def _model_proto(path: Path) -> sentencepiece_model_pb2.ModelProto:
    """Parse a tokenizer.model file."""
    return sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())


def test_folder_has_the_official_layout_and_nothing_left_behind(tiny_dir):
    assert {path.name for path in tiny_dir.iterdir()} == EXPECTED_FILES
    assert [path.name for path in tiny_dir.parent.iterdir()] == [tiny_dir.name]
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "chatglm"
    assert config["architectures"] == ["ChatGLMForConditionalGeneration"]
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 64, 4)
    assert (config["kv_channels"], config["multi_query_group_num"], config["ffn_hidden_size"]) == (16, 2, 160)
    assert config["padded_vocab_size"] == 960  # 900 pieces + 9 ChatGLM3 tokens, rounded up to a multiple of 64
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 0)
    generation = json.loads((tiny_dir / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == [2, 906, 908]
    assert generation["pad_token_id"] == 0
    tokenizer_config = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["tokenizer_class"] == "ChatGLMTokenizer"
    assert "auto_map" not in tokenizer_config


def test_sentencepiece_options_match_the_official_tokenizer(tiny_dir, reference_model_dir):
    ours, official = _model_proto(tiny_dir / "tokenizer.model"), _model_proto(reference_model_dir / "tokenizer.model")
    for field in ("model_type", "vocab_size", "byte_fallback", "split_digits", "allow_whitespace_only_pieces",
                  "character_coverage", "unk_id", "bos_id", "eos_id", "pad_id"):
        assert getattr(ours.trainer_spec, field) == getattr(official.trainer_spec, field), field
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(official.normalizer_spec, field), field
    assert len(ours.pieces) == 900


def test_model_and_tokenizer_load_with_our_classes(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(tokenizer) is ChatGLMTokenizer
    assert type(model) is ChatGLMForConditionalGeneration
    assert tokenizer.get_command("<|user|>") == 906 and tokenizer.vocab_size == 909
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert ids[:2] == [901, 903]
        assert max(ids) < model.config.padded_vocab_size
        assert tokenizer.decode(ids[2:]) == text
    prompt = tokenizer.build_chat_input("类型#裤*版型#宽松")
    logits = model(**prompt).logits
    assert logits.shape == (1, prompt["input_ids"].shape[1], 960)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_same_checkpoint_and_other_seed_other_weights(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (again / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    first, second, third = (load_file(folder / "model.safetensors") for folder in (tiny_dir, again, other))
    assert first.keys() == second.keys() == third.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], third[name]) for name in first)


def test_second_shape_builds_and_runs_forward_with_loss(tmp_path):
    folder = build_tiny_model(
        tmp_path / "shape2", num_layers=3, multi_query_group_num=1, vocab_size=600, hidden_size=48,
        num_attention_heads=3, kv_channels=16, ffn_hidden_size=96, seed=2,
    )
    model = ChatGLMForConditionalGeneration.from_pretrained(folder)
    tokenizer = ChatGLMTokenizer.from_pretrained(folder)
    assert (model.config.num_layers, model.config.multi_query_group_num) == (3, 1)
    assert tokenizer.vocab_size == 609 and model.config.padded_vocab_size == 640
    assert tokenizer.get_command("[gMASK]") == 601
    batch = tokenizer(SAMPLE_TEXTS[:2], padding=True, padding_side="left", return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    output = model(**batch, labels=labels)
    assert output.logits.shape == (*batch["input_ids"].shape, 640)
    assert torch.isfinite(output.loss) and output.loss.item() > 0


def test_command_line_trains_on_given_text_files(tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(["the red dress is soft and light", "红色的裙子很舒适"] * 50), encoding="utf-8")
    folder = main(["--output_dir", str(tmp_path / "cli"), "--text_file", str(text_file), "--vocab_size", "300",
                   "--num_layers", "1"])
    assert {path.name for path in folder.iterdir()} == EXPECTED_FILES
    pieces = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert pieces.get_piece_size() == 300
    for line in ("the red dress is soft and light", "红色的裙子很舒适"):
        encoded = pieces.encode(line, out_type=str)
        assert len(encoded) < len(line) and not [piece for piece in encoded if piece.startswith("<0x")], encoded
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_layers"] == 1


def test_existing_folder_is_kept_unless_overwrite(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("user data", encoding="utf-8")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_model(target, num_layers=1)
    assert [path.name for path in target.iterdir()] == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    build_tiny_model(target, num_layers=1, overwrite=True)
    assert {path.name for path in target.iterdir()} == EXPECTED_FILES
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_too_small_text_fails_clearly_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tmp_path / "model", texts=["hello world"], vocab_size=900)
    assert list(tmp_path.iterdir()) == []
