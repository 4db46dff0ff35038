"""data_tools/make_general_text.py: the general text the quickstart pre-trains its tiny model on is deterministic,
in the input-output format, and never the AdvertiseGen task it is evaluated on. The quickstart run itself is in
tests/e2e/test_quickstart.py."""

import json
import subprocess
import sys
from pathlib import Path

from data_tools.make_general_text import KINDS, make_general_text, read_summaries

REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_DEV = REPO_ROOT / "data" / "advertise_gen_sample" / "dev.json"


def test_same_seed_same_text_other_seed_other_text():
    assert make_general_text(200, seed=3) == make_general_text(200, seed=3)
    assert make_general_text(200, seed=3) != make_general_text(200, seed=4)


def test_records_are_input_output_with_every_kind_and_no_advertise_gen_prompt():
    records = make_general_text(600, seed=0)
    assert all(set(record) == {"prompt", "response"} for record in records)
    assert all(record["prompt"] and record["response"] for record in records)
    prompts = [record["prompt"] for record in records]
    # AdvertiseGen prompts are "key#value*key#value"; the general text never asks in that form.
    assert not any("#" in prompt or "*" in prompt for prompt in prompts)
    starts = {prompt[:3] for prompt in prompts}
    assert {"续写：", "抄写："} <= starts
    assert sum(prompt.endswith("？") and "\n问：" in prompt for prompt in prompts) > 50
    assert len(KINDS) == 6


def test_selling_points_in_plain_words_are_taken_up_in_their_order():
    requests = [record for record in make_general_text(600, seed=1) if "、" in record["prompt"]]
    assert len(requests) > 100
    for record in requests:
        points = record["prompt"].rstrip("。").replace("要点是", "：").split("：")[-1].split("、")
        assert 3 <= len(points) <= 5, record
        start = 0
        for point in points:  # each selling point is taken up after the one before it
            start = record["response"].index(point, start) + len(point)


def test_no_response_is_a_dev_summary(tmp_path):
    dev_summaries = read_summaries([str(SAMPLE_DEV)])
    assert len(dev_summaries) == 16
    # Write a dev file whose summary the generator produces for seed 0, and check the generator leaves it out.
    produced = make_general_text(300, seed=0)
    continuation = next(record["response"] for record in produced if record["response"].endswith("。") and len(record["response"]) > 20)
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps({"content": "类型#裙", "summary": continuation}, ensure_ascii=False) + "\n", encoding="utf-8")
    kept = make_general_text(300, seed=0, exclude=read_summaries([str(dev)]))
    assert len(kept) == 300
    assert continuation not in {record["response"] for record in kept}
    assert not dev_summaries & {record["response"] for record in make_general_text(2000, seed=0, exclude=dev_summaries)}


def test_command_line_writes_the_file_atomically_and_rejects_bad_input(tmp_path):
    output = tmp_path / "general.jsonl"
    command = [sys.executable, "-m", "data_tools.make_general_text", "--output", str(output), "--size", "50"]
    completed = subprocess.run(
        [*command, "--seed", "7", "--exclude", str(SAMPLE_DEV)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    lines = output.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == make_general_text(50, seed=7, exclude=read_summaries([str(SAMPLE_DEV)]))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["general.jsonl"]  # no temporary file left

    not_advertise_gen = tmp_path / "other.json"
    not_advertise_gen.write_text('{"prompt": "x"}\n', encoding="utf-8")
    completed = subprocess.run(
        [*command, "--exclude", str(not_advertise_gen)], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 2
    assert f"{not_advertise_gen}, line 1" in completed.stderr and "summary" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
