"""inference/api_server.py: a real uvicorn process on loopback, driven with the official openai client.

One server serves a base, two LoRA adapters and two P-Tuning prefixes (different lengths) on one copy of the base;
greedy replies must equal inference.py's for the same checkpoint, alone and in a full mixed batch. Request validation
and reply conversion in process: tests/unit/inference/test_openai_protocol.py.
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
from inference.api_server import exposure_warning, ids_through_stop
from inference.api_server import main as api_server_main
from inference.chat_cli import main as inference_main
from inference.chat_cli import reply_text

API_KEY = "test-key"
FAULT_MARKER = "<fail here>"  # requests holding it fail in the engine (the server's CHATGLM_SERVER_TEST_FAULT hook)
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
    """One server for all of them, with an API key, a batch of 8 and the engine fault hook armed."""
    models = [f"{name}={path}" for name, path in checkpoints.items()]
    options = ("--max_concurrency", "8", "--max_queue", "64")
    running = RunningServer(models, *options, api_key=API_KEY, env={"CHATGLM_SERVER_TEST_FAULT": FAULT_MARKER})
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
    options = ("--max_concurrency", "1", "--max_queue", "1", "--grace_period", "120")
    running = RunningServer([str(checkpoints["lora"])], *options)
    client = running.client()
    body = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}
    streams = []

    def open_stream(max_tokens: int) -> None:
        streams.append(client.chat.completions.create(**{**body, "max_tokens": max_tokens}, stream=True))

    # A stream's headers come with its first token (the queued one waits for the running one): open them in threads.
    openers = [threading.Thread(target=open_stream, args=(max_tokens,)) for max_tokens in (300, 20)]
    openers[0].start()
    wait_for(lambda: running.health()["running"] == 1, 30, "the first request to run")
    openers[1].start()
    wait_for(lambda: running.health()["in_flight"] == 2, 30, "one request running and one queued")
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**body)
    assert refused.value.status_code == 429 and "--max_queue" in refused.value.message
    assert refused.value.response.headers["Retry-After"] == "1"
    for opener in openers:
        opener.join(60)
    finished = []
    readers = [
        threading.Thread(target=lambda s=s: finished.append(list(s)[-1].choices[0].finish_reason)) for s in streams
    ]
    for reader in readers:
        reader.start()
    running.process.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(150)
    assert finished == ["length", "length"]
    assert running.process.wait(60) == -signal.SIGTERM
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.url}/health", timeout=2)


def failing_request(server, name: str, stream: bool) -> str:
    """A request the engine fails on midway (the fault hook): "failed" when it is answered as such."""
    body = {"model": name, "messages": [{"role": "user", "content": f"hi {FAULT_MARKER}"}], "max_tokens": MAX_TOKENS}
    body["temperature"] = 0
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={**body, "stream": stream}, headers=server.headers(), timeout=60
    )
    if stream and response.status_code == 200:  # it failed midway: the stream's last event is the error
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        errors = [json.loads(event)["error"] for event in events if event.startswith('{"error"')]
        failed = len(errors) == 1 and events[-1] == json.dumps({"error": errors[0]}, ensure_ascii=False)
    else:  # it failed before its first piece was sent (always so without streaming)
        errors = [response.json()["error"]]
        failed = response.status_code == 500 and errors[0]["type"] == "server_error"
    return "failed" if failed and "InjectedFault" in errors[0]["message"] else f"wrong failure: {response.text!r}"


def test_load_200_requests_from_16_clients(server, expected):
    """Streaming and not, some malformed, some cancelled midway, some failing in the engine midway: right answers,
    right errors, only the failing requests fail, nothing hangs."""
    client = server.client(timeout=60)
    models = ["base", "lora", "prefix", "prefix5"]

    def one(index: int) -> str:
        name, prompt = models[index % len(models)], PROMPTS[index % 3]
        if index % 20 == 9:
            return failing_request(server, name, stream=index % 40 == 9)
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
    assert sorted(set(outcomes)) == ["cancelled", "error", "failed", "ok"], [o for o in set(outcomes) if " " in o]
    assert [index for index, outcome in enumerate(outcomes) if outcome == "failed"] == list(range(9, 200, 20))
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
    # The default max new tokens fits the tiny model's 512-token context: the first message works as it is.
    assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "256"
    _, finish = say(PROMPTS[1])
    assert finish in ("length", "stop")
    browser.find_element(By.ID, "clear").click()
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


def test_an_engine_failure_answers_only_that_request_with_a_500_and_is_logged(server, expected):
    assert failing_request(server, "lora", stream=False) == "failed"
    for _ in range(3):
        assert failing_request(server, "prefix", stream=True) == "failed"
    assert "InjectedFault" in server.output() and "a request failed during a decoding step" in server.output()
    wait_for(lambda: server.health()["in_flight"] == 0, 10, "the failed requests to leave")
    assert server.health()["status"] == "ok"
    assert greedy(server.client(), "lora", PROMPTS[1]).choices[0].message.content == expected["lora", PROMPTS[1]]


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "lora", "messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
        b'{"model": "lora", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
        b'{"model": "lora", "messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}',
        b'{"model": "lora", "messages": [{"role": "assistant", "tool_calls": 5}, {"role": "tool", "content": "x"}]}',
        b'{"model": "lora", "messages": [{"role": "user", "content": 5}]}',
        b'{"model": "lora", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}',
        b'{"model": "lora", "messages": "hi"}',
        b'{"model": ["lora"], "messages": []}',
        b"[" * 100_000,
        b"\xff\xfe\x00",
        b"null",
        b"",
    ],
)
def test_malformed_bodies_get_a_4xx_never_a_500(server, content):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=server.headers(), timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["message"]


def test_what_real_openai_clients_send_is_served(server, expected):
    client = server.client()
    parts = [{"type": "text", "text": PROMPTS[1]}]
    reply = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": parts}], temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected["lora", PROMPTS[1]]
    system = client.chat.completions.create(
        model="lora", temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}],
    )
    developer = client.chat.completions.create(
        model="lora", temperature=0, max_tokens=MAX_TOKENS,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}],
    )
    assert developer.choices[0].message.content == system.choices[0].message.content
    card = client.models.retrieve("prefix5")
    assert card.id == "prefix5" and card.model_extra["max_model_len"] == 512
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert "is not served here" in missing.value.message


def test_tool_choice_none_returns_no_call_and_a_named_function_is_called(server, checkpoints):
    client = server.client()
    tools = [{"type": "function", "function": TOOL}, {"type": "function", "function": {"name": "get_time"}}]
    messages = [{"role": "user", "content": "北京天气怎么样？"}]
    options = {"model": "tools", "messages": messages, "temperature": 0, "max_tokens": 40}
    auto = client.chat.completions.create(tools=tools[:1], **options)
    assert auto.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(tools=tools[:1], tool_choice="none", **options)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced_prefix = len(AutoTokenizer.from_pretrained(checkpoints["tools"]).sp_model.encode("get_weather\n"))
    for choice in (named, "required"):  # "required" with one tool names it
        forced = client.chat.completions.create(tools=tools[:1], tool_choice=choice, **options)
        [call] = forced.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        # The name was given: the reply started with it (the metadata line) in the prompt, not generated.
        assert forced.usage.prompt_tokens == auto.usage.prompt_tokens + forced_prefix
        assert forced.usage.completion_tokens == auto.usage.completion_tokens - forced_prefix
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(tools=tools, tool_choice="required", **options)
    assert refused.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("tools", [None, [{"type": "function", "function": TOOL}]])
def test_plain_text_streams_token_by_token(server, tools):
    # The tiny model's replies have no ChatGLM3 metadata line; they used to arrive in one piece at the end.
    options = {"tools": tools} if tools else {}
    chunks = list(greedy(server.client(), "base", PROMPTS[1], stream=True, **options))
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > MAX_TOKENS // 2 and "".join(pieces) == greedy(server.client(), "base", PROMPTS[1], **options
                                                                       ).choices[0].message.content


def test_batch_inference_writes_tool_calls_as_the_chat_api_returns_them(server, checkpoints, tmp_path):
    tools = [TOOL]
    records = [{"tools": tools, "conversations": [{"role": "user", "content": "北京天气怎么样？"}]}]
    input_file, output_file = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    input_file.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    command = ["--model", str(checkpoints["tools"]), "--input_file", str(input_file), "--output_file", str(output_file)]
    assert inference_main([*command, "--max_new_tokens", "40"]) == 0
    [row] = [json.loads(line) for line in output_file.read_text(encoding="utf-8").splitlines()]
    served = server.client().chat.completions.create(
        model="tools", messages=records[0]["conversations"], tools=[{"type": "function", "function": TOOL}],
        temperature=0, max_tokens=40,
    )
    [call] = served.choices[0].message.tool_calls
    assert row["tools"] == tools and row["response"] is None
    assert row["tool_calls"] == [
        {"type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
    ]


def test_a_port_in_use_is_refused_before_the_models_load(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert api_server_main(["--model", str(tmp_path / "not-loaded"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "--port" in err and "not-loaded" not in err


def test_listening_on_all_interfaces_without_an_api_key_warns():
    assert "without --api_key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "key") is None and exposure_warning("127.0.0.1", None) is None


def test_ctrl_c_on_an_idle_server_exits_with_one_line(checkpoints):
    running = RunningServer([str(checkpoints["lora"])])
    before = running.output()
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(60) == 130
    added = running.output()[len(before) :]
    assert added.strip().splitlines() == ["interrupted (Ctrl-C): the server stops"], added
