"""Behaviour that users' own code relies on in the official ChatGLM3 classes (config, tokenizer, model, chat, files)."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import input_output_records, run_arguments, write_jsonl
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import finetune.model  # noqa: F401  (registers the Auto classes)
from finetune.data.encoding import IGNORE_INDEX, encode_conversation
from finetune.generation import INVALID_SCORE_FALLBACK_TOKEN
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from finetune.model.chat import split_response
from finetune.model.modeling import AttentionBias, RotaryEmbedding, SelfAttention, apply_rotary
from finetune.methods.ptuning import load_prefix_checkpoint, prefix_state_dict
from finetune.tiny_model import build_tiny_model
from finetune.train import main, warn_rows_beyond_context
from inference.export import export_checkpoint

# The official chatglm3-6b tokenizer_config.json chat template.
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HISTORY = [
    {"role": "system", "content": "You are a helpful assistant. Answer the question as well as you can."},
    {"role": "user", "content": "北京今天天气怎么样？"},
    {"role": "assistant", "content": "The temperature in Beijing is 21 degrees."},
]
REMOTE_CODE = {
    "configuration_chatglm.py": "CONFIG = 1\n",
    "modeling_chatglm.py": "from .configuration_chatglm import CONFIG\nfrom .quantization import quantize\n",
    "quantization.py": "def quantize():\n    return None\n",
    "tokenization_chatglm.py": "TOKENIZER = 1\n",
}


@pytest.fixture(scope="module")
def tokenizer(reference_model_dir: Path) -> ChatGLMTokenizer:
    """The reference tokenizer, loaded as users load it."""
    return AutoTokenizer.from_pretrained(reference_model_dir)


@pytest.fixture(scope="module")
def model(reference_model_dir: Path) -> ChatGLMForConditionalGeneration:
    """The reference model in eval mode."""
    return AutoModelForCausalLM.from_pretrained(reference_model_dir).eval()


@pytest.fixture(scope="module")
def official_base(reference_model_dir: Path, tmp_path_factory) -> Path:
    """A copy of the reference folder with (dummy) official remote-code files that its auto_map points to."""
    folder = tmp_path_factory.mktemp("official") / "chatglm3-tiny"
    shutil.copytree(reference_model_dir, folder)
    for name, text in REMOTE_CODE.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ---- config and long-context variants ----------------------------------------------------------------------------


def test_integer_numeric_fields_and_rope_ratio_load(reference_model_dir, tmp_path):
    config = ChatGLMConfig(hidden_dropout=0, attention_dropout=0, layernorm_epsilon=1, rope_ratio=50)
    assert config.rope_ratio == 50 and config.hidden_dropout == 0
    assert AutoModelForCausalLM.from_pretrained(reference_model_dir, rope_ratio=50).config.rope_ratio == 50
    folder = tmp_path / "model-128k"
    shutil.copytree(reference_model_dir, folder)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, "rope_ratio": 500, "seq_length": 131072}))
    long_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rotary = long_model.transformer.rotary_pos_emb
    assert rotary.base == 10000 * 500
    expected = 1.0 / (10000 * 500) ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    cos, _ = rotary(torch.tensor([[1]]))
    torch.testing.assert_close(cos[0, 0, 0], torch.cos(expected))


def test_missing_fields_take_official_class_defaults_and_unknown_fields_are_kept(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 2, "my_field": "x"}))
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.add_qkv_bias, config.multi_query_attention, config.multi_query_group_num) == (False, False, 1)
    assert config.seq_length == 2048 and config.rope_ratio == 1 and config.my_field == "x"
    config.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["my_field"] == "x"


def test_tiny_builder_makes_a_32k_shape_and_long_rows_are_warned(tmp_path, caplog):
    folder = build_tiny_model(tmp_path / "tiny-32k", num_layers=1, seq_length=32768, rope_ratio=50)
    config = AutoConfig.from_pretrained(folder)
    assert (config.seq_length, config.rope_ratio, config.multi_query_attention) == (32768, 50, True)
    assert warn_rows_beyond_context(32768, config) is None
    short = AutoConfig.from_pretrained(folder, seq_length=512, pre_seq_len=8)
    with caplog.at_level(logging.WARNING, logger="finetune.train"):
        message = warn_rows_beyond_context(505, short)
    assert message is not None and "513 tokens" in message and "seq_length 512" in message
    assert message in caplog.text


# ---- tokenizer -----------------------------------------------------------------------------------------------------


def test_padded_batch_generates_as_each_prompt_alone(tokenizer, model):
    prompts = ["你好", "类型#裙*颜色#红色*风格#简约", "Hello world, the quick brown fox jumps!"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "left" and "position_ids" in batch
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone["input_ids"].shape[1] :]
        assert generated[row, batch["input_ids"].shape[1] :].tolist() == expected.tolist()


def test_chat_template_gives_build_chat_input_ids(tokenizer, reference, official_base, tmp_path):
    messages = HISTORY + [{"role": "user", "content": "那上海呢？"}]
    expected = tokenizer.build_chat_input("那上海呢？", history=HISTORY)["input_ids"][0].tolist()
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == expected
    case = reference["tokenizer"]["build_chat_input"]
    with_tools = case["history"] + [{"role": case["role"], "content": case["query"]}]
    assert tokenizer.apply_chat_template(with_tools, add_generation_prompt=True)["input_ids"] == case["input_ids"]

    config_path = official_base / "tokenizer_config.json"
    values = json.loads(config_path.read_text())
    folder = tmp_path / "official-template"
    shutil.copytree(official_base, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**values, "chat_template": OFFICIAL_CHAT_TEMPLATE}))
    official = AutoTokenizer.from_pretrained(folder)
    assert official.chat_template == OFFICIAL_CHAT_TEMPLATE
    assert official.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == expected
    # Plain encode keeps the official default: command tokens written in text stay text.
    rendered = official.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert official.encode(rendered, add_special_tokens=False) != expected

    tokenizer.save_pretrained(tmp_path / "saved")
    assert "chat_template" in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == expected


def test_encode_special_tokens_parses_only_command_tokens_and_can_be_set_after_loading(reference_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir)
    text = "<|user|>\n hi</s><s><unk> sops"
    as_text = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.get_command("<|user|>") not in as_text
    tokenizer.encode_special_tokens = True
    parsed = tokenizer.encode(text, add_special_tokens=False)
    assert parsed[0] == tokenizer.get_command("<|user|>")
    assert not {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id, 903} & set(parsed[1:])
    assert parsed[1:] == tokenizer.encode("\n hi</s><s><unk> sops", add_special_tokens=False)
    loaded_on = AutoTokenizer.from_pretrained(reference_model_dir, encode_special_tokens=True)
    assert loaded_on.encode_special_tokens and loaded_on.encode(text, add_special_tokens=False) == parsed


def test_get_command_knows_the_official_control_names(tokenizer):
    assert tokenizer.get_command("<eos>") == tokenizer.eos_token_id == 2
    assert tokenizer.get_command("<bos>") == 1
    assert tokenizer.get_command("<pad>") == tokenizer.pad_token_id == 0


# ---- model and chat ------------------------------------------------------------------------------------------------


def test_model_with_prefix_trains_only_the_prefix_encoder(reference_model_dir):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, pre_seq_len=4)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"transformer.prefix_encoder.embedding.weight"}
    encoder = model.transformer.prefix_encoder.train()
    torch.manual_seed(0)
    keys = encoder(batch_size=2, dtype=torch.float32)[0][0]
    assert keys.shape == (2, 2, 4, 16)
    assert not torch.equal(keys[0] == 0, keys[1] == 0)


def test_stream_chat_with_past_key_values_continues_the_cached_conversation(tokenizer, model):
    settings = {"do_sample": False, "max_new_tokens": 5}
    first = list(model.stream_chat(tokenizer, "你好", return_past_key_values=True, **settings))
    texts = [item[0] for item in first]
    assert texts and all(texts) and len(set(texts)) == len(texts)
    reply, history, cache = first[-1]
    assert (reply, history) == model.chat(tokenizer, "你好", **settings)
    prompt = tokenizer.build_chat_input("你好")["input_ids"][0].tolist()
    answer = tokenizer.encode(reply, add_special_tokens=False)
    assert cache.get_seq_length() == len(prompt) + settings["max_new_tokens"] - 1

    second = list(model.stream_chat(tokenizer, "北京", history, past_key_values=cache, **settings))
    generated = model.generate(input_ids=torch.tensor([prompt]), **settings)[0].tolist()
    follow_up = generated[:-1] + tokenizer.build_chat_input("北京")["input_ids"][0].tolist()
    expected = model.generate(input_ids=torch.tensor([follow_up]), **settings)[0, len(follow_up) :].tolist()
    assert second[-1][0] == split_response(tokenizer.decode(expected), [])[0]
    assert len(second[-1]) == 2 and answer


def test_stream_generate_yields_growing_ids(tokenizer, model):
    inputs = tokenizer.build_chat_input("你好")
    steps = list(model.stream_generate(inputs["input_ids"], do_sample=False, max_new_tokens=4))
    assert [step.shape[1] for step in steps] == [inputs["input_ids"].shape[1] + n for n in range(1, 5)]
    assert steps[-1].tolist() == model.generate(**inputs, do_sample=False, max_new_tokens=4).tolist()


def test_chat_with_invalid_scores_writes_the_official_fallback_token(reference_model_dir, tokenizer):
    broken = AutoModelForCausalLM.from_pretrained(reference_model_dir).eval()
    with torch.no_grad():
        broken.transformer.output_layer.weight[7].fill_(math.nan)
    reply, _ = broken.chat(tokenizer, "你好", max_new_tokens=3)
    assert reply == tokenizer.decode([INVALID_SCORE_FALLBACK_TOKEN] * 3).strip()
    assert split_response("[[训练时间]]", [])[0] == "2023年"


def test_hidden_states_and_tuple_outputs(model):
    input_ids = torch.tensor([[901, 903, 736, 231, 192]])
    outputs = model(input_ids, output_hidden_states=True)
    assert len(outputs.hidden_states) == model.config.num_layers + 1
    embeddings = model.transformer.embedding(input_ids)
    torch.testing.assert_close(outputs.hidden_states[0], embeddings)
    final = model.transformer.encoder.final_layernorm(outputs.hidden_states[-1])
    torch.testing.assert_close(model.transformer.output_layer(final), outputs.logits)
    as_tuple = model(input_ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], outputs.logits)


def test_attention_without_multi_query_uses_the_official_per_head_layout():
    config = ChatGLMConfig(
        multi_query_attention=False, num_attention_heads=2, kv_channels=4, hidden_size=8, add_qkv_bias=True
    )
    torch.manual_seed(0)
    attention = SelfAttention(config, layer_idx=0).eval()
    hidden = torch.randn(1, 5, 8)
    rotary = RotaryEmbedding(config)(torch.arange(5).unsqueeze(0))
    output = attention(hidden, rotary, AttentionBias(mask=None, is_causal=True), prefix=None, cache=None)

    # By hand: the fused projection's output channels are, head by head, that head's query, key and value.
    weight, bias = attention.query_key_value.weight, attention.query_key_value.bias
    contexts = []
    for head in range(2):
        rows = slice(head * 12, head * 12 + 12)
        projected = hidden[0] @ weight[rows].T + bias[rows]
        query, key, value = projected[:, :4], projected[:, 4:8], projected[:, 8:]
        query = apply_rotary(query[None, None], *rotary)[0, 0]
        key = apply_rotary(key[None, None], *rotary)[0, 0]
        scores = (query @ key.T) / 2.0
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
        contexts.append(scores.softmax(-1) @ value)
    expected = attention.dense(torch.cat(contexts, dim=-1))
    torch.testing.assert_close(output[0], expected)


def test_legacy_torch_prefix_checkpoint_loads(reference_dir, tmp_path):
    official = AutoModelForCausalLM.from_pretrained(reference_dir / "model", pre_seq_len=5)
    load_prefix_checkpoint(official, reference_dir / "ptuning")
    torch.save(prefix_state_dict(official), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reloaded = AutoModelForCausalLM.from_pretrained(reference_dir / "model", pre_seq_len=5)
    load_prefix_checkpoint(reloaded, tmp_path)
    for key, value in prefix_state_dict(official).items():
        torch.testing.assert_close(prefix_state_dict(reloaded)[key], value)


# ---- remote-code files ---------------------------------------------------------------------------------------------


def assert_carries_official_files(folder: Path, base: Path) -> None:
    """`folder` has the base's auto_map in both configs and byte-identical copies of its remote-code files."""
    for name in REMOTE_CODE:
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name
    for config_name in ("config.json", "tokenizer_config.json"):
        saved = json.loads((folder / config_name).read_text())["auto_map"]
        assert saved == json.loads((base / config_name).read_text())["auto_map"], config_name


def test_save_and_export_keep_auto_map_and_carry_the_remote_code(official_base, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(official_base)
    model.save_pretrained(tmp_path / "saved")
    base_map = json.loads((official_base / "config.json").read_text())["auto_map"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"] == base_map
    export_checkpoint(str(official_base), str(tmp_path / "exported"))
    assert_carries_official_files(tmp_path / "exported", official_base)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "exported")) is ChatGLMForConditionalGeneration


def test_export_from_a_base_without_the_remote_code_files_says_what_to_copy(reference_model_dir, tmp_path, caplog):
    assert json.loads((reference_model_dir / "config.json").read_text())["auto_map"]
    with caplog.at_level(logging.WARNING, logger="finetune.model.remote_code"):
        export_checkpoint(str(reference_model_dir), str(tmp_path / "exported"))
    assert "configuration_chatglm.py" in caplog.text and "modeling_chatglm.py" in caplog.text
    assert str(tmp_path / "exported") in caplog.text and "copy the .py files of the official" in caplog.text
    assert not list((tmp_path / "exported").glob("*.py"))


def test_trained_prefix_checkpoint_carries_the_remote_code(official_base, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(4))
    output_dir = tmp_path / "out"
    main(run_arguments(official_base, train_file, output_dir, tmp_path / "cache", max_steps=1, pre_seq_len=4))
    for name in REMOTE_CODE:
        assert (output_dir / name).read_bytes() == (official_base / name).read_bytes(), name
    assert json.loads((output_dir / "config.json").read_text())["auto_map"]["AutoModel"].startswith("modeling_chatglm")


# ---- labels --------------------------------------------------------------------------------------------------------


def test_observation_is_learned_only_when_it_opts_in(tokenizer):
    conversation = [
        {"role": "user", "content": "北京天气怎么样"},
        {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
        {"role": "observation", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "北京今天21度。"},
    ]
    observation_ids = tokenizer.build_single_message("observation", "", '{"temperature": 21}')
    for opted_in in (False, True):
        messages = [dict(message) for message in conversation]
        if opted_in:
            messages[2]["loss"] = True
        encoded = encode_conversation({"conversations": messages}, tokenizer, max_seq_length=None)
        start = next(i for i in range(len(encoded["input_ids"])) if encoded["input_ids"][i : i + 1] == [908])
        learned = [label != IGNORE_INDEX for label in encoded["labels"][start + 1 : start + len(observation_ids)]]
        assert all(learned) if opted_in else not any(learned)
