"""finetune/prediction_log.py: partial prediction files kept per process, resumed with the same settings, merged in
data order (the interrupted evaluation runs themselves: tests/e2e/test_evaluation_runs.py)."""

import json
from pathlib import Path

import pytest

from finetune.prediction_log import (
    OutputNotWritableError,
    PartialWriter,
    check_writable,
    merge_predictions,
    partial_files,
    partial_path,
    prepare_resume,
    read_partial_rows,
    settings_path,
)

SETTINGS = {"max_new_tokens": 8, "data": "dev.jsonl"}


def write_rows(final: Path, rank: int, rows: list[dict]) -> None:
    """Append rows to process `rank`'s partial file through the writer."""
    writer = PartialWriter(partial_path(final, rank))
    writer.write(rows)
    writer.close()


def test_file_names_sit_next_to_the_final_file(tmp_path):
    final = tmp_path / "generated_predictions.jsonl"
    assert partial_path(final, 3) == tmp_path / "generated_predictions.jsonl.rank3.partial"
    assert settings_path(final) == tmp_path / "generated_predictions.jsonl.settings.json"
    write_rows(final, 1, [{"id": "b"}])
    write_rows(final, 0, [{"id": "a"}])
    (tmp_path / "other.jsonl.rank0.partial").write_text("", encoding="utf-8")
    assert partial_files(final) == [partial_path(final, 0), partial_path(final, 1)]


def test_rows_of_every_process_merge_in_data_order_and_the_partials_go(tmp_path):
    final = tmp_path / "predictions.jsonl"
    prepare_resume(final, SETTINGS)
    write_rows(final, 0, [{"id": "2", "predict": "c"}, {"id": "0", "predict": "a"}])
    write_rows(final, 1, [{"id": "1", "predict": "b"}])
    rows = merge_predictions(final, ["0", "1", "2"], keep_id=False)
    assert rows == [{"id": "0", "predict": "a"}, {"id": "1", "predict": "b"}, {"id": "2", "predict": "c"}]
    lines = final.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"predict": "a"}, {"predict": "b"}, {"predict": "c"}]
    assert partial_files(final) == [] and not settings_path(final).exists()


def test_merge_refuses_when_rows_are_missing_and_keeps_the_partials(tmp_path):
    final = tmp_path / "predictions.jsonl"
    write_rows(final, 0, [{"id": "0"}])
    with pytest.raises(RuntimeError, match=r"1 predictions are missing .* \(first: 1\); rerun"):
        merge_predictions(final, ["0", "1"])
    assert not final.exists() and partial_files(final) == [partial_path(final, 0)]


def test_same_settings_keep_the_rows_other_settings_discard_them(tmp_path, capsys):
    final = tmp_path / "predictions.jsonl"
    prepare_resume(final, SETTINGS)
    write_rows(final, 0, [{"id": "0", "predict": "a"}])
    prepare_resume(final, dict(SETTINGS))
    assert read_partial_rows(final) == {"0": {"id": "0", "predict": "a"}}
    assert "continuing the interrupted run" in capsys.readouterr().err
    prepare_resume(final, {**SETTINGS, "max_new_tokens": 9})
    assert read_partial_rows(final) == {} and partial_files(final) == []
    assert "discarding partial predictions" in capsys.readouterr().err
    assert json.loads(settings_path(final).read_text(encoding="utf-8"))["max_new_tokens"] == 9


def test_a_line_torn_by_a_crash_is_ignored_then_cut_before_appending(tmp_path):
    final = tmp_path / "predictions.jsonl"
    part = partial_path(final, 0)
    part.write_text('{"id": "0", "predict": "a"}\n{"id": "1", "pre', encoding="utf-8")
    assert list(read_partial_rows(final)) == ["0"]
    write_rows(final, 0, [{"id": "1", "predict": "b"}])
    assert part.read_text(encoding="utf-8") == '{"id": "0", "predict": "a"}\n{"id": "1", "predict": "b"}\n'


def test_check_writable_creates_the_folder_or_names_the_knob(tmp_path):
    check_writable(tmp_path / "new" / "folder", "--output_dir")
    assert (tmp_path / "new" / "folder").is_dir() and list((tmp_path / "new" / "folder").iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("", encoding="utf-8")
    with pytest.raises(OutputNotWritableError, match=r"cannot write results to .*a_file.*--output_dir"):
        check_writable(blocker / "sub", "--output_dir")


def test_a_writer_that_wrote_nothing_leaves_no_file(tmp_path):
    final = tmp_path / "predictions.jsonl"
    writer = PartialWriter(partial_path(final, 0))
    writer.close()
    assert partial_files(final) == []
    partial_path(final, 1).write_text('{"id": "0", "pred', encoding="utf-8")  # only a line torn by a crash
    PartialWriter(partial_path(final, 1)).close()
    assert partial_files(final) == []
