"""ChatGLMTokenizer against the official tokenizer's outputs (reference.json) and transformers' tokenizer API."""

import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer, BatchEncoding

import finetune.model  # noqa: F401  (registers ChatGLMTokenizer with AutoTokenizer)
from finetune.model.tokenization import CHATGLM_SPECIAL_TOKENS, ChatGLMTokenizer


def test_special_token_ids_follow_the_sentencepiece_vocabulary(tokenizer, reference):
    base = reference["sp_vocab_size"]
    assert tokenizer.sp_model.get_piece_size() == base
    assert list(CHATGLM_SPECIAL_TOKENS) == list(reference["special_tokens"])
    for token, token_id in reference["special_tokens"].items():
        assert tokenizer.get_command(token) == token_id
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert tokenizer.vocab_size == base + 9
    assert len(tokenizer) == base + 9
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id) == (0, 0, 1)
    assert tokenizer.get_vocab()["<|assistant|>"] == reference["special_tokens"]["<|assistant|>"]


def test_encode_matches_official_ids_pieces_and_decoding(tokenizer, reference):
    cases = reference["tokenizer"]["encode"]
    assert len(cases) >= 10
    for case in cases:
        text = case["text"]
        assert tokenizer.encode(text, add_special_tokens=False) == case["ids"], text
        assert tokenizer.encode(text) == case["with_special"], text
        assert tokenizer(text)["input_ids"] == case["with_special"], text
        assert tokenizer.convert_ids_to_tokens(case["ids"]) == case["pieces"], text
        assert tokenizer.tokenize(text) == case["pieces"], text
        assert tokenizer.decode(case["ids"]) == case["decoded"], text


def test_special_token_text_inside_user_content_stays_text(tokenizer, reference):
    ids = tokenizer.encode("<|user|> hi [gMASK] </s>", add_special_tokens=False)
    assert not set(ids) & set(reference["special_tokens"].values())
    assert tokenizer.eos_token_id not in ids
    parsing = ChatGLMTokenizer(vocab_file=tokenizer.vocab_file, encode_special_tokens=True)
    assert reference["special_tokens"]["<|user|>"] in parsing.encode("<|user|> hi", add_special_tokens=False)


def test_build_single_message_matches_official(tokenizer, reference):
    for case in reference["tokenizer"]["build_single_message"]:
        ids = tokenizer.build_single_message(case["role"], case["metadata"], case["message"])
        assert ids == case["ids"], case


def test_build_chat_input_matches_official(tokenizer, reference):
    case = reference["tokenizer"]["build_chat_input"]
    inputs = tokenizer.build_chat_input(case["query"], history=case["history"], role=case["role"])
    assert isinstance(inputs, BatchEncoding)
    assert isinstance(inputs["input_ids"], torch.Tensor)
    assert inputs["input_ids"].tolist() == [case["input_ids"]]
    assert inputs["attention_mask"].tolist() == [[1] * len(case["input_ids"])]
    assert tokenizer.build_chat_input("你好")["input_ids"][0].tolist() == (
        [901, 903] + tokenizer.build_single_message("user", "", "你好") + [907]
    )


def test_bad_role_and_unknown_command_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="unknown chat role 'robot'"):
        tokenizer.build_single_message("robot", "", "hi")
    with pytest.raises(KeyError, match="not a ChatGLM3 command token"):
        tokenizer.get_command("<|robot|>")


def test_decode_writes_command_tokens_and_hides_control_ids_as_official(tokenizer):
    ids = [901, 903] + tokenizer.build_single_message("user", "", "你好") + [907, 2]
    # The official decoder keeps the word-start space of a piece that follows a command token ("▁" then "\n" here).
    assert tokenizer.decode(ids) == "[gMASK]sop<|user|> \n 你好<|assistant|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[gMASK]sop<|user|> \n 你好<|assistant|>"
    tool_name = tokenizer.encode("get_weather", add_special_tokens=False)
    assert tokenizer.decode([907] + tool_name) == "<|assistant|> get_weather"
    assert tokenizer.convert_tokens_to_string(["<|assistant|>", "\u2581get"]) == "<|assistant|> get"
    assert tokenizer.decode(tokenizer.strip_command_ids(ids)) == "\n 你好"
    assert tokenizer.decode([901, 903] + tokenizer.encode("数字12345和English混合", add_special_tokens=False)) == (
        "[gMASK]sop 数字12345和English混合"
    )


def test_decode_of_control_negative_and_beyond_the_vocabulary_ids_gives_nothing_as_official(tokenizer):
    hello = tokenizer.encode("你好", add_special_tokens=False)
    assert tokenizer.decode([1, 0] + hello + [2, -100]) == "你好"
    assert tokenizer.convert_ids_to_tokens([1000, -100]) == ["", ""]
    assert tokenizer.decode([901, 903, 1000]) == "[gMASK]sop"
    assert tokenizer.decode([907] + tokenizer.encode("Hello", add_special_tokens=False)) == "<|assistant|> Hello"


def test_batch_padding_left_by_default_with_position_ids_and_right_on_request(tokenizer):
    texts = ["你好", "Hello world, the quick brown fox!"]
    lengths = [len(tokenizer.encode(text)) for text in texts]
    assert lengths[0] < lengths[1]
    pad = lengths[1] - lengths[0]
    left = tokenizer(texts, padding=True, return_tensors="pt")
    assert left["input_ids"][0].tolist() == [0] * pad + tokenizer.encode(texts[0])
    assert left["attention_mask"][0].tolist() == [0] * pad + [1] * lengths[0]
    assert left["position_ids"][0].tolist() == [0] * pad + list(range(lengths[0]))
    assert left["position_ids"][1].tolist() == list(range(lengths[1]))
    right = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right")
    assert right["input_ids"].shape == (2, lengths[1])
    assert right["input_ids"][0, lengths[0] :].eq(0).all()
    assert right["attention_mask"][0].tolist() == [1] * lengths[0] + [0] * pad
    assert right["position_ids"][0].tolist() == list(range(lengths[0])) + [0] * pad
    assert tokenizer.batch_decode(right["input_ids"], skip_special_tokens=True) == ["[gMASK]sop " + t for t in texts]


def test_padding_side_given_at_load_time_and_to_pad(reference_model_dir, tokenizer):
    right_tokenizer = AutoTokenizer.from_pretrained(reference_model_dir, padding_side="right")
    assert right_tokenizer.padding_side == "right"
    left_tokenizer = AutoTokenizer.from_pretrained(reference_model_dir)
    assert left_tokenizer.padding_side == "left"
    features = [tokenizer("你好"), tokenizer("类型#裙*颜色#红色*风格#简约")]
    padded = left_tokenizer.pad(features, return_tensors="pt")
    assert padded["input_ids"][0, 0].item() == 0 and padded["attention_mask"][0, 0].item() == 0
    padded = tokenizer.pad(features, padding_side="left", pad_to_multiple_of=8, return_tensors="pt")
    assert padded["input_ids"].shape[1] % 8 == 0
    assert padded["input_ids"][1, -1].item() == features[1]["input_ids"][-1]


def test_truncation_keeps_the_prefix_and_pairs_end_with_eos(tokenizer):
    truncated = tokenizer("Hello world, the quick brown fox!", max_length=5, truncation=True)["input_ids"]
    assert truncated == [901, 903, 736, 75, 738]
    pair = tokenizer("你好", "Hello")["input_ids"]
    assert pair == [901, 903] + tokenizer.encode("你好", add_special_tokens=False) + tokenizer.encode(
        "Hello", add_special_tokens=False
    ) + [2]


def test_save_and_reload_round_trip(tokenizer, reference, tmp_path):
    files = tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == Path(tokenizer.vocab_file).read_bytes()
    assert str(tmp_path / "tokenizer_config.json") in [str(path) for path in files]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    assert not [path.name for path in tmp_path.iterdir() if ".tmp" in path.name]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is ChatGLMTokenizer
    for case in reference["tokenizer"]["encode"]:
        assert reloaded.encode(case["text"]) == case["with_special"]
    case = reference["tokenizer"]["build_chat_input"]
    assert reloaded.build_chat_input(case["query"], case["history"])["input_ids"].tolist() == [case["input_ids"]]


def test_auto_tokenizer_loads_official_folder_without_trust_remote_code(reference_model_dir):
    official_config = json.loads((reference_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" in official_config
    loaded = AutoTokenizer.from_pretrained(reference_model_dir)
    assert type(loaded) is ChatGLMTokenizer
    assert loaded.encode("你好") == [901, 903, 736, 231, 192, 163, 232, 168, 192]


def test_datasets_map_with_tokenizer_in_worker_processes(tokenizer):
    texts = ["你好", "类型#裙*颜色#红色", "Hello world", "emoji 😀"]
    dataset = datasets.Dataset.from_dict({"text": texts})
    encoded = dataset.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=2, remove_columns=["text"])
    assert encoded["input_ids"] == [tokenizer.encode(text) for text in texts]
    assert encoded["attention_mask"] == [[1] * len(tokenizer.encode(text)) for text in texts]


def test_remove_space_and_do_lower_case_options_apply_to_text(tokenizer):
    collapsing = ChatGLMTokenizer(vocab_file=tokenizer.vocab_file, remove_space=True, do_lower_case=True)
    assert collapsing.encode("  Hello \t World  ") == tokenizer.encode("hello world")
    assert tokenizer.encode("  Hello") != tokenizer.encode("hello")


def test_saved_token_ids_that_contradict_tokenizer_model_are_rejected(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    assert "added_tokens_decoder" not in config
    # A tokenizer_config.json written by transformers itself lists the added tokens; here with shifted ids.
    config["added_tokens_decoder"] = {
        str(index + 50): {"content": token.content, "special": True}
        for index, token in tokenizer.added_tokens_decoder.items()
        if index >= 900
    }
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"'\[MASK\]' has id 950, expected 900"):
        ChatGLMTokenizer.from_pretrained(tmp_path)


def test_fast_decode_equals_the_token_by_token_path(tokenizer):
    """decode() (decode_ids) gives exactly id -> token -> convert_tokens_to_string, on every id and mixed runs."""
    generator = torch.Generator().manual_seed(0)
    last = tokenizer.vocab_size + 3
    sequences = [[index] for index in range(-1, last)]
    sequences += [torch.randint(-1, last, (40,), generator=generator).tolist() for _ in range(300)]
    sequences.append(tokenizer.encode("数字12345和English混合 😀 ünïcode", add_special_tokens=False))
    for ids in sequences:
        tokens = [tokenizer._convert_id_to_token(index) for index in ids]
        assert tokenizer.decode_ids(ids) == tokenizer.decode(ids) == tokenizer.convert_tokens_to_string(tokens), ids
