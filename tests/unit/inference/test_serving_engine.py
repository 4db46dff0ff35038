"""inference/serving_engine.py in-process: rows joining a running batch, cancellation, sampling."""

import threading
from pathlib import Path

import pytest
import torch

from finetune.checkpoints import load_for_inference
from finetune.generation import sample_token
from inference.serving_engine import GenerationRequest, ServingEngine

PROMPTS = ["hello", "类型#上衣*版型#宽松*风格#简约*图案#条纹*衣样式#衬衫*衣领型#翻领", "你好", "类型#裙"]
NEW_TOKENS = 24


class Collector:
    """Tokens and the finish reason of one request, with an event set when it ends."""

    def __init__(self):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()
        self.first_token = threading.Event()

    def on_token(self, token: int) -> None:
        self.tokens.append(token)
        self.first_token.set()

    def on_finish(self, reason: str) -> None:
        self.reason = reason
        self.done.set()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    """The tiny model and its tokenizer."""
    model, tokenizer, _ = load_for_inference(tiny_model_dir, device="cpu")
    return model, tokenizer


def request_for(tokenizer, prompt: str, collector: Collector, **kwargs) -> GenerationRequest:
    """A greedy request for the chat prompt of `prompt`, without stop ids (runs to max_new_tokens)."""
    return GenerationRequest(
        prompt_ids=tokenizer.build_chat_input(prompt)["input_ids"][0].tolist(),
        max_new_tokens=kwargs.pop("max_new_tokens", NEW_TOKENS),
        stop_ids=frozenset(),
        on_token=collector.on_token,
        on_finish=collector.on_finish,
        **kwargs,
    )


def greedy_alone(model, tokenizer, prompt: str) -> list[int]:
    """Greedy continuation by generate(), one request alone, no stop ids."""
    inputs = tokenizer.build_chat_input(prompt)
    output = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id
    )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_requests_joining_a_running_batch_equal_generate_alone(loaded):
    model, tokenizer = loaded
    engine = ServingEngine(model, max_batch_size=8).start()
    collectors = [Collector() for _ in PROMPTS]
    try:
        engine.submit(request_for(tokenizer, PROMPTS[0], collectors[0]))
        collectors[0].first_token.wait(30)
        for prompt, collector in zip(PROMPTS[1:], collectors[1:], strict=True):
            engine.submit(request_for(tokenizer, prompt, collector))
            collector.first_token.wait(30)
        assert all(collector.done.wait(60) for collector in collectors)
    finally:
        engine.stop(timeout=30)
    assert [collector.reason for collector in collectors] == ["length"] * len(PROMPTS)
    assert [collector.tokens for collector in collectors] == [greedy_alone(model, tokenizer, p) for p in PROMPTS]
    assert engine.running == 0


def test_requests_arriving_together_are_prefilled_in_one_batch_and_equal_generate_alone(loaded):
    model, tokenizer = loaded
    engine = ServingEngine(model, max_batch_size=8)
    collectors = [Collector() for _ in PROMPTS]
    one_token = Collector()
    forwards = []
    counting = model.register_forward_hook(
        lambda module, args, kwargs, output: forwards.append(kwargs), with_kwargs=True
    )
    for prompt, collector in zip(PROMPTS, collectors, strict=True):
        engine.submit(request_for(tokenizer, prompt, collector))
    engine.submit(request_for(tokenizer, PROMPTS[1], one_token, max_new_tokens=1))  # leaves right after its prefill
    engine.start()
    try:
        assert all(collector.done.wait(60) for collector in [*collectors, one_token])
    finally:
        engine.stop(timeout=30)
        counting.remove()
    assert forwards[0]["input_ids"].shape[0] == len(PROMPTS) + 1  # one prefill for all of them
    assert len(forwards) == NEW_TOKENS  # then one decoding step per further token
    assert [collector.tokens for collector in collectors] == [greedy_alone(model, tokenizer, p) for p in PROMPTS]
    assert one_token.reason == "length" and one_token.tokens == greedy_alone(model, tokenizer, PROMPTS[1])[:1]


def test_cancel_frees_the_slot_for_a_waiting_request(loaded):
    model, tokenizer = loaded
    engine = ServingEngine(model, max_batch_size=1).start()
    long_running, waiting = Collector(), Collector()
    try:
        first = request_for(tokenizer, PROMPTS[0], long_running, max_new_tokens=400)
        engine.submit(first)
        long_running.first_token.wait(30)
        engine.submit(request_for(tokenizer, PROMPTS[2], waiting))
        assert not waiting.first_token.wait(0.2)
        first.cancel()
        assert long_running.done.wait(30) and waiting.done.wait(60)
    finally:
        engine.stop(timeout=30)
    assert long_running.reason == "cancelled" and len(long_running.tokens) < 400
    assert waiting.reason == "length" and waiting.tokens == greedy_alone(model, tokenizer, PROMPTS[2])


def test_sampling_follows_the_seed_and_top_p():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    draws = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2, 3, 4)]
    assert draws[0] == draws[1] and len(set(draws)) > 1
    nucleus = [sample_token(logits, 1.0, 1e-6, torch.Generator().manual_seed(seed)) for seed in range(5)]
    assert nucleus == [int(logits.argmax())] * 5
    assert sample_token(logits, 0.0, 1.0, None) == int(logits.argmax())


def test_a_request_failing_in_its_preparation_fails_alone(loaded):
    model, tokenizer = loaded
    engine = ServingEngine(model, max_batch_size=8)
    good, bad = [Collector() for _ in PROMPTS[:2]], Collector()
    for prompt, collector in zip(PROMPTS[:2], good, strict=True):
        engine.submit(request_for(tokenizer, prompt, collector))
    # 2**64 overflows torch.Generator.manual_seed inside the engine (the server refuses it with a 400 before).
    engine.submit(request_for(tokenizer, PROMPTS[2], bad, temperature=1.0, seed=2**64))
    engine.start()
    try:
        assert all(collector.done.wait(60) for collector in [*good, bad]), "a request was left hanging"
    finally:
        engine.stop(timeout=30)
    assert bad.reason.startswith("error: ValueError") and "Overflow" in bad.reason and not bad.tokens
    assert [collector.tokens for collector in good] == [greedy_alone(model, tokenizer, p) for p in PROMPTS[:2]]
    assert engine.running == 0


def run_with_others(loaded, failing: GenerationRequest, failing_collector: Collector) -> list[Collector]:
    """Run `failing` among greedy requests that join a running batch; every collector must end. Returns theirs."""
    model, tokenizer = loaded
    engine = ServingEngine(model, max_batch_size=8).start()
    good = [Collector() for _ in PROMPTS]
    try:
        engine.submit(request_for(tokenizer, PROMPTS[0], good[0]))
        good[0].first_token.wait(30)  # running: the others join a batch that is decoding
        for prompt, collector in zip(PROMPTS[1:3], good[1:3], strict=True):
            engine.submit(request_for(tokenizer, prompt, collector))
        engine.submit(failing)
        engine.submit(request_for(tokenizer, PROMPTS[3], good[3]))
        assert all(collector.done.wait(60) for collector in [*good, failing_collector]), "a request was left hanging"
        after = Collector()  # the engine still runs requests afterwards
        engine.submit(request_for(tokenizer, PROMPTS[3], after))
        assert after.done.wait(60) and after.tokens == greedy_alone(model, tokenizer, PROMPTS[3])
    finally:
        engine.stop(timeout=30)
    assert engine.running == 0
    assert [collector.tokens for collector in good] == [greedy_alone(model, tokenizer, p) for p in PROMPTS]
    return good


def test_a_prompt_failing_the_batched_prefill_fails_alone(loaded):
    model, _ = loaded
    bad = Collector()
    # An id beyond the embedding fails the batched prefill it is part of; retried alone, only it fails.
    failing = GenerationRequest([model.config.padded_vocab_size + 7], 4, frozenset(), bad.on_token, bad.on_finish)
    run_with_others(loaded, failing, bad)
    assert bad.reason.startswith("error: IndexError") and not bad.tokens


def test_a_row_failing_a_batched_decoding_step_fails_alone(loaded):
    _, tokenizer = loaded
    bad = Collector()
    run_with_others(loaded, request_for(tokenizer, PROMPTS[1], bad, fail_after_tokens=3), bad)
    assert bad.reason.startswith("error: InjectedFault") and len(bad.tokens) == 3
