"""Behaviour of our ChatGLM3 model beyond the reference numbers: P-Tuning training, loss, saving, errors, chat."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune.model  # noqa: F401  (registers the Auto classes)
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.model.configuration import CHATGLM3_6B_FIELDS
from finetune.model.chat import parse_tool_call, split_response
from finetune.model.checkpoint_files import CheckpointError
from finetune.model.loss import chunked_causal_lm_loss
from finetune.methods.ptuning import load_prefix_checkpoint, save_prefix_weights


def small_config(**overrides) -> ChatGLMConfig:
    """A ChatGLM3-shaped config with other layer/group counts than the fixture."""
    values = dict(
        CHATGLM3_6B_FIELDS,
        num_layers=3, hidden_size=48, num_attention_heads=6, kv_channels=8, multi_query_group_num=3,
        ffn_hidden_size=96, padded_vocab_size=320, seq_length=256,
    )
    values.update(overrides)
    return ChatGLMConfig(**values)


def test_ptuning_with_gradient_checkpointing_trains_only_the_prefix():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=4, prefix_projection=True))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("transformer.prefix_encoder.")
    model.gradient_checkpointing_enable()
    model.train()
    input_ids = torch.randint(5, 300, (2, 12))
    labels = input_ids.clone()
    labels[:, :4] = -100
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    prefix_grads = [p.grad for n, p in model.named_parameters() if n.startswith("transformer.prefix_encoder.")]
    assert prefix_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in prefix_grads)
    base_grads = [p.grad for n, p in model.named_parameters() if not n.startswith("transformer.prefix_encoder.")]
    assert all(g is None for g in base_grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=3))
    model.train()
    input_ids = torch.randint(5, 300, (2, 10))

    def prefix_grad() -> torch.Tensor:
        model.zero_grad()
        torch.manual_seed(1)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return model.transformer.prefix_encoder.embedding.weight.grad.clone()

    plain = prefix_grad()
    model.gradient_checkpointing_enable()
    assert torch.allclose(prefix_grad(), plain, atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1000])
def test_chunked_loss_equals_full_cross_entropy(chunk_tokens):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    output_layer = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100
    loss = chunked_causal_lm_loss(hidden, labels, output_layer, chunk_tokens=chunk_tokens)
    (hidden_grad,) = torch.autograd.grad(loss, hidden)
    logits = output_layer(hidden)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(hidden_grad, expected_grad, atol=1e-6)


def test_loss_without_labelled_tokens_is_zero_and_differentiable():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.full((1, 4), -100), torch.nn.Linear(8, 10))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None


def test_save_pretrained_round_trip_keeps_official_names(reference_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir).eval()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        saved = set(handle.keys())
    index = json.loads((reference_model_dir / "pytorch_model.bin.index.json").read_text())
    # All of the official names, the rotary buffer included (the official loader warns "newly initialized" without it).
    assert saved == set(index["weight_map"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.tensor([[901, 903, 906, 736, 13, 470, 747]])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_saved_config_has_torch_dtype_and_use_cache_on_and_old_folders_still_load(reference_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir)
    model.config.use_cache = False  # as training leaves it
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32" and config["use_cache"] is True
    assert model.config.use_cache is False
    # A folder saved before the rotary buffer was written loads, with the buffer recomputed.
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "saved", old)
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("inv_freq")}
    save_file(state, old / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = AutoModelForCausalLM.from_pretrained(old, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(reloaded.transformer.rotary_pos_emb.inv_freq, model.transformer.rotary_pos_emb.inv_freq)


def test_from_pretrained_follows_the_transformers_contract(reference_model_dir):
    model, info = AutoModelForCausalLM.from_pretrained(reference_model_dir, output_loading_info=True, pre_seq_len=2)
    assert isinstance(model, ChatGLMForConditionalGeneration) and set(info) >= {"missing_keys", "unexpected_keys"}
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == {
        "transformer.prefix_encoder.embedding.weight"
    }
    state_dict = AutoModelForCausalLM.from_pretrained(reference_model_dir).state_dict()
    base_config = AutoModelForCausalLM.from_pretrained(reference_model_dir).config
    rebuilt = ChatGLMForConditionalGeneration.from_pretrained(None, config=base_config, state_dict=state_dict)
    for key, value in state_dict.items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value)


def test_tuples_shift_labels_and_attention_weights(reference_model_dir, caplog):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir).eval()
    input_ids = torch.tensor([[901, 903, 906, 736, 13, 470, 747]])
    with caplog.at_level("WARNING"):
        as_tuple = model.transformer(input_ids, return_dict=False)
        outputs = model(input_ids, labels=input_ids)
    assert isinstance(as_tuple, tuple) and "use_return_dict" not in caplog.text
    torch.testing.assert_close(as_tuple[0], model.transformer(input_ids).last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model(input_ids), tuple) and isinstance(model.transformer(input_ids), tuple)
    model.config.return_dict = True
    shifted = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    torch.testing.assert_close(model(input_ids, shift_labels=shifted).loss, outputs.loss)
    other = torch.cat([input_ids[:, 2:], torch.full((1, 2), -100)], dim=1)
    assert not torch.allclose(model(input_ids, labels=input_ids, shift_labels=other).loss, outputs.loss)
    for module in (model, model.transformer):
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            module(input_ids, output_attentions=True)


def test_config_overrides_pass_through_from_pretrained(reference_model_dir):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, pre_seq_len=6, prefix_projection=True)
    assert model.config.pre_seq_len == 6 and model.config.prefix_projection
    assert model.transformer.prefix_encoder.embedding.weight.shape[0] == 6
    assert model.transformer.prefix_encoder.trans is not None


def test_prefix_checkpoint_round_trip(reference_model_dir, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, pre_seq_len=5).eval()
    torch.nn.init.normal_(model.transformer.prefix_encoder.embedding.weight)
    save_prefix_weights(model, tmp_path, official_bin=True)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "pytorch_model.bin").is_file()
    other = AutoModelForCausalLM.from_pretrained(reference_model_dir, pre_seq_len=5).eval()
    load_prefix_checkpoint(other, tmp_path)
    input_ids = torch.tensor([[901, 903, 906, 736, 13]])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, other(input_ids).logits)


def test_folder_that_is_not_chatglm_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama'"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_truncated_shard_is_named(reference_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(reference_model_dir, folder)
    shard = folder / "pytorch_model-00003-of-00005.bin"
    shard.chmod(0o644)
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00005.bin.*truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_safetensors_is_named(reference_model_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(reference_model_dir).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_prefix_checkpoint_with_wrong_pre_seq_len_is_explained(reference_dir):
    model = AutoModelForCausalLM.from_pretrained(reference_dir / "model", pre_seq_len=7)
    with pytest.raises(CheckpointError, match=r"ptuning/pytorch_model.bin: pre_seq_len mismatch.*pre_seq_len=5"):
        load_prefix_checkpoint(model, reference_dir / "ptuning")


def test_prefix_checkpoint_for_other_layer_count_is_explained(reference_dir):
    config = ChatGLMConfig.from_pretrained(reference_dir / "model", num_layers=3, pre_seq_len=5)
    model = ChatGLMForConditionalGeneration(config)
    with pytest.raises(CheckpointError, match="layer/shape mismatch.*2 layers"):
        load_prefix_checkpoint(model, reference_dir / "ptuning")


def test_prefix_checkpoint_into_model_without_prefix_is_explained(reference_dir):
    model = AutoModelForCausalLM.from_pretrained(reference_dir / "model")
    with pytest.raises(CheckpointError, match="built without pre_seq_len"):
        load_prefix_checkpoint(model, reference_dir / "ptuning")


def test_chat_and_stream_chat_agree(reference_model_dir):
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reference_model_dir)
    history = [{"role": "system", "content": "You are a copywriter."}]
    reply, new_history = model.chat(tokenizer, "你好", history=history, do_sample=False, max_new_tokens=8)
    assert isinstance(reply, str)
    assert [m["role"] for m in new_history] == ["system", "user", "assistant"]
    assert new_history[1]["content"] == "你好"
    streamed = list(model.stream_chat(tokenizer, "你好", history=history, do_sample=False, max_new_tokens=8))
    assert streamed[-1] == (reply, new_history)
    assert history == [{"role": "system", "content": "You are a copywriter."}]


def test_tool_call_replies_are_parsed_without_eval():
    history = [
        {"role": "system", "content": "tools", "tools": [{"name": "get_weather"}]},
        {"role": "user", "content": "?"},
    ]
    reply, new_history = split_response("get_weather\n```python\ntool_call(city='北京', days=2)\n```", history)
    assert reply == {"name": "get_weather", "parameters": {"city": "北京", "days": 2}}
    assert new_history[-1]["metadata"] == "get_weather"
    with pytest.raises(ValueError, match="tool_call"):
        parse_tool_call("__import__('os').system('echo no')")


def test_multi_segment_reply_keeps_every_assistant_turn():
    reply, history = split_response("\nThinking.<|assistant|>\nDone.", [{"role": "user", "content": "q"}])
    assert reply == "Done."
    assert [m["content"] for m in history if m["role"] == "assistant"] == ["Thinking.", "Done."]


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_right_padded_batch_equals_each_row_alone(pre_seq_len):
    """The training collator's right padding runs unmasked causal attention; real tokens must not notice."""
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=pre_seq_len)).eval()
    rows = [torch.randint(5, 300, (9,)), torch.randint(5, 300, (5,))]
    input_ids = torch.zeros(2, 9, dtype=torch.long)
    attention_mask = torch.zeros(2, 9, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        token_losses = []
        for index, row in enumerate(rows):
            alone = model(input_ids=row[None], labels=row[None])
            assert torch.allclose(batched.logits[index, : len(row)], alone.logits[0], atol=1e-5)
            token_losses.append(alone.loss * (len(row) - 1))
    assert torch.allclose(batched.loss, sum(token_losses) / (len(rows[0]) + len(rows[1]) - 2), atol=1e-6)


def test_prefix_attention_through_leading_queries_equals_the_masked_form():
    """The flash-friendly prefix path (zero queries in front + causal) equals an explicit prefix+causal mask."""
    from finetune.model.modeling import AttentionBias, build_attention_bias

    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=4)).eval()
    attention = model.transformer.encoder.layers[0].self_attention
    hidden = torch.randn(2, 6, 48)
    rotary = model.transformer.rotary_pos_emb(torch.arange(6).expand(2, -1))
    prefix = model.transformer.prefix_encoder(2, torch.float32)[0]
    fast = build_attention_bias(None, query_length=6, past_length=0, prefix_length=4, device=hidden.device)
    assert fast.leading_queries == 4 and fast.mask is None
    explicit_mask = torch.arange(10)[None, :] <= torch.arange(6)[:, None] + 4
    masked = AttentionBias(mask=explicit_mask[None, None], is_causal=False)
    with torch.no_grad():
        assert torch.allclose(
            attention(hidden, rotary, fast, prefix, None), attention(hidden, rotary, masked, prefix, None), atol=1e-6
        )


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_packed_rows_equal_each_example_alone(pre_seq_len):
    """Packed rows (segment ids, positions restarting) give every example the logits it gets alone."""
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=pre_seq_len)).eval()
    examples = [torch.randint(5, 300, (length,)) for length in (5, 3, 7, 2)]
    rows = [[0, 1, 3], [2]]
    width = 11
    input_ids = torch.zeros(2, width, dtype=torch.long)
    segments = torch.zeros(2, width, dtype=torch.long)
    positions = torch.zeros(2, width, dtype=torch.long)
    places = {}
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            length = len(examples[index])
            input_ids[row, start : start + length] = examples[index]
            segments[row, start : start + length] = segment
            positions[row, start : start + length] = torch.arange(length)
            places[index] = (row, start, length)
            start += length
    with torch.no_grad():
        packed = model(input_ids=input_ids, attention_mask=segments, position_ids=positions).logits
        for index, (row, start, length) in places.items():
            alone = model(input_ids=examples[index][None]).logits[0]
            assert torch.allclose(packed[row, start : start + length], alone, atol=1e-5)


def test_packed_gradients_equal_unpacked_gradients():
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(small_config(pre_seq_len=3)).eval()
    examples = [torch.randint(5, 300, (length,)) for length in (6, 4, 5)]
    input_ids = torch.cat(examples)[None]
    segments = torch.cat([torch.full((len(e),), i + 1) for i, e in enumerate(examples)])[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    labels = input_ids.clone()
    starts = [0, 6, 10]
    labels[0, starts] = -100
    model(input_ids=input_ids, attention_mask=segments, position_ids=positions, labels=labels).loss.backward()
    packed_grad = model.transformer.prefix_encoder.embedding.weight.grad.clone()
    model.zero_grad()
    total = sum(len(e) - 1 for e in examples)
    for example in examples:
        (model(input_ids=example[None], labels=example[None]).loss * (len(example) - 1) / total).backward()
    assert torch.allclose(packed_grad, model.transformer.prefix_encoder.embedding.weight.grad, atol=1e-6)
