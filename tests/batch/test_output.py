"""The answers file: whole lines only, resumable, clear errors when it cannot be written."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from ragcache.batch.formats import BAD_LINE, error_record
from ragcache.batch.output import AnswerLog, OutputNotWritableError, read_records


def answer(id: str, line: int) -> dict:
    return {"id": id, "line": line, "answer": "a", "error": None}


def test_reopen_keeps_answers_and_input_errors_drops_failures_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    lines = [
        answer("q1", 1),
        error_record(2, None, BAD_LINE, "not valid JSON"),
        error_record(3, "q3", "PromptTooLongError", "too long"),
        answer("q4", 4),
    ]
    torn = json.dumps(answer("q5", 5))[:20]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + torn)
    log, resumed = AnswerLog.open(path)
    with log:
        assert resumed.answered == {"q1", "q4"}
        assert resumed.input_error_lines == {2}
        assert resumed.dropped == 2  # the failure and the torn line
        log.append(answer("q3", 3))
    records = read_records(path)
    assert [r["id"] for r in records] == ["q1", None, "q4", "q3"]
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_appends_are_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    log, _ = AnswerLog.open(path, fsync=False)
    text = "x" * 5000  # larger than a pipe buffer's atomic size, still one write each

    def write(k: int) -> None:
        for i in range(25):
            log.append({**answer(f"{k}-{i}", i), "answer": text})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = read_records(path)
    assert len(records) == 200 and len({r["id"] for r in records}) == 200
    assert all(r["answer"] == text for r in records)


@pytest.mark.parametrize("where", ["missing_folder", "is_folder", "under_a_file"])
def test_unwritable_paths_say_so(tmp_path: Path, where: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    path = {
        "missing_folder": tmp_path / "nope" / "answers.jsonl",
        "is_folder": tmp_path,
        "under_a_file": tmp_path / "file.txt" / "answers.jsonl",
    }[where]
    with pytest.raises(OutputNotWritableError, match="answers"):
        AnswerLog.open(path)
    assert (tmp_path / "file.txt").read_text() == "x"
