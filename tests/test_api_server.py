"""inference/api_server.py: a real uvicorn process on loopback, driven with the official openai client.

One server serves a base, two LoRA adapters and two P-Tuning prefixes (different lengths) on one copy of the base;
greedy replies must equal inference.py's for the same checkpoint, alone and in a full mixed batch. Request validation
and reply conversion in process: tests/test_openai_protocol.py.
"""

import json
import shutil
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import torch
from api_server_helpers import RunningServer, wait_for
from checkpoint_builders import load_base, make_lora_checkpoint, make_prefix_checkpoint, write_training_record
from transformers import AutoTokenizer

from finetune.checkpoints import load_for_inference
from finetune.data.encoding import TOOLS_SYSTEM_PROMPT, encode_conversation, format_tool_call
from inference.api_server import ids_through_stop
from inference.api_server import main as api_server_main
from inference.chat_cli import main as inference_main
from inference.chat_cli import reply_text

API_KEY = "test-key"
MAX_TOKENS = 12
TOOL = {"name": "get_weather", "description": "Weather of a city", "parameters": {"city": "string"}}
TOOL_EXAMPLE = {
    "tools": [TOOL],
    "conversations": [
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 20}},
        {"role": "assistant", "content": "北京现在 20 度。"},
    ],
}
PROMPTS = ["类型#裙*颜色#红色", "hello", "类型#上衣*版型#宽松*风格#简约*图案#条纹*衣样式#衬衫", "你好"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_dir: Path) -> dict[str, Path]:
    """The tiny base, two LoRA adapters and two P-Tuning prefixes (3 and 5 prefix tokens) on it."""
    root = tmp_path_factory.mktemp("served")
    make_lora_checkpoint(tiny_model_dir, root / "lora", seed=1)
    make_lora_checkpoint(tiny_model_dir, root / "lora2", seed=2)
    make_prefix_checkpoint(tiny_model_dir, root / "prefix", pre_seq_len=3, seed=3)
    make_prefix_checkpoint(tiny_model_dir, root / "prefix5", pre_seq_len=5, prefix_projection=True, seed=4)
    fine_tune_tool_caller(tiny_model_dir, root / "tools")
    paths = {name: root / name for name in ("lora", "lora2", "prefix", "prefix5", "tools")}
    return {"base": tiny_model_dir, **paths}


def fine_tune_tool_caller(base_dir: Path, folder: Path, steps: int = 120) -> None:
    """A full fine-tune of the tiny base on TOOL_EXAMPLE (it learns to call the tool, then to answer)."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    encoded = encode_conversation(TOOL_EXAMPLE, tokenizer, None)
    model = load_base(base_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids, labels = torch.tensor([encoded["input_ids"]]), torch.tensor([encoded["labels"]])
    for _ in range(steps):
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_training_record(folder, "full", base_dir)


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]):
    """One server for all of them, with an API key and a batch of 8."""
    models = [f"{name}={path}" for name, path in checkpoints.items()]
    running = RunningServer(models, "--max_concurrency", "8", "--max_queue", "64", api_key=API_KEY)
    yield running
    assert running.stop() == -signal.SIGTERM


@pytest.fixture(scope="module")
def expected(checkpoints: dict[str, Path]) -> dict[tuple[str, str], str]:
    """Greedy chat replies of every (model, prompt), each checkpoint loaded on its own."""
    replies = {}
    for name, path in checkpoints.items():
        model, tokenizer, _ = load_for_inference(path, device="cpu")
        for prompt in PROMPTS:
            reply, _ = model.chat(tokenizer, prompt, max_new_tokens=MAX_TOKENS, do_sample=False, max_length=None)
            replies[name, prompt] = reply_text(reply)
    return replies


def greedy(client: openai.OpenAI, model: str, prompt: str, **kwargs):
    """A greedy non-streamed completion."""
    options = {"temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **options)


def test_models_health_and_api_key(server: RunningServer):
    assert [model.id for model in server.client().models.list()] == [
        "base",
        "lora",
        "lora2",
        "prefix",
        "prefix5",
        "tools",
    ]
    assert server.health()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError) as refused:
        server.client(api_key="wrong").models.list()
    assert refused.value.status_code == 401 and "Authorization: Bearer" in refused.value.message
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


@pytest.mark.parametrize("name", ["lora", "prefix"])
def test_greedy_reply_equals_inference_cli(server, checkpoints, name, capsys):
    prompt = PROMPTS[0]
    assert (
        inference_main(["--model", str(checkpoints[name]), "--prompt", prompt, "--max_new_tokens", str(MAX_TOKENS)])
        == 0
    )
    printed = capsys.readouterr().out
    reply = greedy(server.client(), name, prompt)
    assert reply.choices[0].message.content + "\n" == printed
    assert reply.choices[0].message.content.strip()


def test_full_mixed_batch_equals_each_alone(server, expected):
    client = server.client()
    jobs = [(name, prompt) for name in ("base", "lora", "lora2", "prefix", "prefix5") for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: greedy(client, *job), jobs))
    assert [reply.choices[0].message.content for reply in replies] == [expected[job] for job in jobs]
    assert len({expected[job] for job in jobs}) == len(jobs)


def test_stream_equals_non_stream_with_usage(server, checkpoints, expected):
    client = server.client()
    whole = greedy(client, "prefix5", PROMPTS[2])
    chunks = list(greedy(client, "prefix5", PROMPTS[2], stream=True, stream_options={"include_usage": True}))
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content == expected["prefix5", PROMPTS[2]]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    _, tokenizer, _ = load_for_inference(checkpoints["base"], device="cpu")
    prompt_tokens = len(tokenizer.build_chat_input(PROMPTS[2])["input_ids"][0])
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens > 0
    assert whole.usage.total_tokens == prompt_tokens + whole.usage.completion_tokens


@pytest.mark.parametrize("name", ["base", "lora", "prefix5"])
def test_streamed_content_always_equals_the_non_streamed_content(server, name):
    client = server.client()
    for prompt in PROMPTS:
        whole = greedy(client, name, prompt, max_tokens=48)
        chunks = greedy(client, name, prompt, max_tokens=48, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == (whole.choices[0].message.content or ""), (name, prompt)


def test_usage_counts_the_tokens_up_to_the_one_that_completes_a_stop_string(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.encode("hello world, how are you", add_special_tokens=False)
    through = next(end for end in range(1, len(ids) + 1) if "wor" in tokenizer.decode(ids[:end]))
    # All ids arrived in one step: those after the one that completed "wor" are not counted.
    assert ids_through_stop(ids, 0, tokenizer.decode_ids, ["wor"]) == ids[:through]
    assert through < len(ids)
    assert ids_through_stop(ids, 0, tokenizer.decode_ids, ["absent"]) == ids


def test_max_tokens_stop_and_seed(server, expected):
    client = server.client()
    short = greedy(client, "lora", PROMPTS[0], max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = expected["lora", PROMPTS[0]]
    stop = full[4:6]
    stopped = greedy(client, "lora", PROMPTS[0], stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)].strip()
    streamed = greedy(client, "lora", PROMPTS[0], stop=stop, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == full[: full.index(stop)].strip()
    messages = [{"role": "user", "content": PROMPTS[1]}]

    def sampled(seed: int) -> str:
        reply = client.chat.completions.create(
            model="base", messages=messages, temperature=1.5, top_p=1.0, seed=seed, max_tokens=MAX_TOKENS
        )
        return reply.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "lora", "messages": []}, "messages"),
        ({"model": "lora", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            {"model": "lora", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "messages[1]",
        ),
        (
            {
                "model": "lora",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "system", "content": "x"},
                    {"role": "user", "content": "hi"},
                ],
            },
            "messages[1]",
        ),
        (
            {"model": "lora", "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
            "messages[1]",
        ),
        ({"model": "lora", "messages": [{"role": "user", "content": "类型#裙 " * 400}]}, "messages"),
        ({"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, "max_tokens"),
        ({"model": "lora", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"model": "lora", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
        ({"model": "lora", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json_gets_400_and_the_server_keeps_serving(server, expected):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=b'{"model": "lora", "messages": [', headers=server.headers()
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert greedy(server.client(), "lora", PROMPTS[1]).choices[0].message.content == expected["lora", PROMPTS[1]]


def test_client_disconnect_frees_the_slot(server):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
    body["temperature"] = 0
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers()) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.health()["running"] == 1
    wait_for(lambda: server.health()["running"] == 0 and server.health()["in_flight"] == 0, 5, "the slot to free")
    body["stream"] = False
    payload = json.dumps(body).encode()
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(payload))}
    request_head = "".join(f"{name}: {value}\r\n" for name, value in {**headers, **server.headers()}.items())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{request_head}\r\n".encode() + payload)
        wait_for(lambda: server.health()["running"] == 1, 5, "the non-streamed request to start decoding")
    wait_for(lambda: server.health()["in_flight"] == 0, 5, "the non-streamed request to be dropped")


def test_full_queue_answers_429_and_sigterm_lets_running_requests_finish(checkpoints):
    running = RunningServer([str(checkpoints["lora"])], "--max_concurrency", "1", "--max_queue", "1")
    client = running.client()
    body = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "temperature": 0}
    streams = [client.chat.completions.create(**body, stream=True) for _ in range(2)]
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**body)
    assert refused.value.status_code == 429 and "--max_queue" in refused.value.message
    finished = []
    readers = [
        threading.Thread(target=lambda s=s: finished.append(list(s)[-1].choices[0].finish_reason)) for s in streams
    ]
    for reader in readers:
        reader.start()
    running.process.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(60)
    assert finished == ["length", "length"]
    assert running.process.wait(60) == -signal.SIGTERM
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.url}/health", timeout=2)


def test_load_200_requests_from_16_clients(server, expected):
    """Streaming and not, some malformed, some cancelled midway: right answers, right errors, nothing hangs."""
    client = server.client(timeout=60)
    models = ["base", "lora", "prefix", "prefix5"]

    def one(index: int) -> str:
        name, prompt = models[index % len(models)], PROMPTS[index % 3]
        if index % 10 == 3:
            response = httpx.post(
                f"{server.url}/v1/chat/completions", content=b"{oops", headers=server.headers(), timeout=60
            )
            return "error" if response.status_code == 400 else f"bad status {response.status_code}"
        if index % 10 == 7:
            with greedy(client, name, prompt, stream=True) as stream:
                next(iter(stream))
            return "cancelled"
        if index % 2:
            text = "".join(chunk.choices[0].delta.content or "" for chunk in greedy(client, name, prompt, stream=True))
        else:
            text = greedy(client, name, prompt).choices[0].message.content
        return "ok" if text == expected[name, prompt] else f"wrong reply for {name}: {text!r}"

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(200), timeout=120))
    assert sorted(set(outcomes)) == ["cancelled", "error", "ok"], [o for o in outcomes if o not in ("ok", "error")]
    wait_for(lambda: server.health()["in_flight"] == 0, 10, "every request to leave")
    assert greedy(client, "lora", PROMPTS[1]).choices[0].message.content == expected["lora", PROMPTS[1]]


def test_tool_call_then_observation_with_a_fine_tuned_checkpoint(server, checkpoints):
    client = server.client()
    tools = [{"type": "function", "function": TOOL}]
    messages = [{"role": "user", "content": "北京天气怎么样？"}]
    options = {"model": "tools", "tools": tools, "temperature": 0, "max_tokens": 40}
    reply = client.chat.completions.create(messages=messages, **options)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **options))
    assert not any(chunk.choices[0].delta.content for chunk in chunks)
    [streamed_call] = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert streamed_call.function.name == "get_weather" and streamed_call.function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 20})},
    ]
    answer = client.chat.completions.create(messages=messages, **options)
    model, tokenizer, _ = load_for_inference(checkpoints["tools"], device="cpu")
    history = [  # the conversation as training encodes it
        {"role": "system", "content": TOOLS_SYSTEM_PROMPT.rstrip("\n"), "tools": [TOOL]},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": format_tool_call({"city": "北京"})},
    ]
    expected, _ = model.chat(
        tokenizer, '{"temp": 20}', history=history, role="observation", do_sample=False, max_new_tokens=40
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == expected == "北京现在 20 度。"
    streamed = list(client.chat.completions.create(messages=messages, stream=True, **options))
    pieces = [chunk.choices[0].delta.content for chunk in streamed if chunk.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected  # a reply in ChatGLM3's format streams token by token
    prompt = tokenizer.build_chat_input('{"temp": 20}', history=history, role="observation")
    assert answer.usage.prompt_tokens == len(prompt["input_ids"][0])


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium driven by Selenium (skipped where no browser is installed)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip(
            "no browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()


def test_web_chat_page(server, browser, expected):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)

    def field(element_id: str, text: str) -> None:
        element = browser.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(text)

    def say(text: str) -> tuple[str, str]:
        """Send a message; the finished assistant reply's text and finish reason."""
        count = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        field("input", text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")) > count)
        reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        return reply.find_element(By.CLASS_NAME, "text").get_attribute("textContent"), reply.get_attribute(
            "data-finish"
        )

    browser.get(f"{server.url}/")
    field("api_key", API_KEY + "\t")
    wait.until(lambda _: len(Select(browser.find_element(By.ID, "model")).options) == 6)
    Select(browser.find_element(By.ID, "model")).select_by_value("lora")
    field("temperature", "0")
    field("max_tokens", str(MAX_TOKENS))
    assert say(PROMPTS[0]) == (expected["lora", PROMPTS[0]], "length")

    field("system", "Be brief.")
    second, _ = say(PROMPTS[1])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": expected["lora", PROMPTS[0]]},
        {"role": "user", "content": PROMPTS[1]},
    ]
    reference = server.client().chat.completions.create(
        model="lora", messages=messages, temperature=0, max_tokens=MAX_TOKENS
    )
    assert second == reference.choices[0].message.content.strip()

    browser.find_element(By.ID, "clear").click()
    field("max_tokens", "1000")
    error, finish = say("hi")
    assert finish == "error" and "exceed the model's context" in error and error.endswith("[max_tokens]")
    field("max_tokens", "400")
    field("input", "hi")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].text)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish='stopped']"))
    wait_for(lambda: server.health()["in_flight"] == 0, 5, "the stopped request to leave")

    browser.find_element(By.ID, "clear").click()
    Select(browser.find_element(By.ID, "model")).select_by_value("tools")
    browser.find_element(By.ID, "system").clear()
    field("max_tokens", "40")
    field("tools", json.dumps([{"type": "function", "function": TOOL}]))
    _, finish = say("北京天气怎么样？")
    call = browser.find_elements(By.CLASS_NAME, "tool-call")[-1].text
    assert finish == "tool_calls" and "get_weather" in call and "北京" in call
    assert browser.find_element(By.ID, "as_tool").is_selected()
    assert say(json.dumps({"temp": 20})) == ("北京现在 20 度。", "stop")


def test_unloadable_models_exit_with_a_message(tmp_path, checkpoints, capsys):
    assert api_server_main(["--model", str(tmp_path / "nope")]) == 1
    assert f"error: {tmp_path / 'nope'}: no such checkpoint folder" in capsys.readouterr().err
    twice = ["--model", f"a={checkpoints['lora']}", "--model", f"a={checkpoints['prefix']}"]
    assert api_server_main(twice) == 1
    assert "the name 'a' is used twice" in capsys.readouterr().err
