"""finetune/atomic_files.py: a failed write leaves the old file and no temporary file; folders are swapped whole."""

import json
import os
import sys

import pytest

from finetune.atomic_files import replace_folder, write_atomically, write_jsonl_atomically


def test_jsonl_is_written_with_non_ascii_kept_and_counted(tmp_path):
    path = tmp_path / "sub" / "data.jsonl"
    records = [{"prompt": "类型#裙", "response": "红色"}, {"prompt": "a", "response": "b"}]
    assert write_jsonl_atomically(path, iter(records)) == 2
    assert path.read_text(encoding="utf-8") == '{"prompt": "类型#裙", "response": "红色"}\n{"prompt": "a", "response": "b"}\n'
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records


def test_a_write_that_fails_halfway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def records():
        yield {"n": 1}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_jsonl_atomically(path, records())
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(item.name for item in tmp_path.iterdir()) == ["data.jsonl"]


def test_new_files_get_the_umask_permissions(tmp_path):
    if sys.platform == "win32":
        pytest.skip("POSIX permissions")
    path = tmp_path / "text.txt"
    write_atomically(path, lambda handle: handle.write("x"))
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_replace_folder_swaps_a_finished_folder_in_and_removes_the_old_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    built = tmp_path / ".model.building"
    built.mkdir()
    (built / "new.bin").write_text("new")
    replace_folder(built, target)
    assert [item.name for item in target.iterdir()] == ["new.bin"]
    assert sorted(item.name for item in tmp_path.iterdir()) == ["model"]
