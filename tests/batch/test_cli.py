"""`ragcache batch` through its argument parser: exit codes, reruns, bad paths; and one slow run
on the real Gemma 3 270m, whose 512-token sliding window the document outgrows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ragcache.batch.cli import EXIT_PARTIAL, register
from ragcache.batch.output import read_records
from ragcache.engine import Engine
from ragcache.errors import RagcacheError
from ragcache.model_loader import LoadedModel, load_model
from ragcache.sampling import SamplingParams
from ragcache.settings import load_settings

WORDS = [
    "cache",
    "tree",
    "token",
    "prefix",
    "window",
    "layer",
    "chunk",
    "answer",
    "value",
    "key",
    "memory",
    "node",
]


def batch(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ragcache")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["batch", *argv])
    return args.func(args, load_settings())


def files(tmp_path: Path, n_words: int, lines: list[str]) -> tuple[Path, Path]:
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(WORDS[(i * 5 + i // 7) % len(WORDS)] for i in range(n_words)) + ".")
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return doc, questions


def test_cli_long_context_run_rerun_and_bad_input(tiny_gemma: LoadedModel, tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"q{i}", "question": f"Which {WORDS[i]}?"}) for i in range(4)]
    lines.append(json.dumps({"custom_id": "oa", "body": {"prompt": "Which node?"}}))
    doc, questions = files(tmp_path, 150, lines)
    answers = tmp_path / "a.jsonl"
    common = ["--doc", str(doc), "--model", str(tiny_gemma.path), "--max-tokens", "3"]
    common += ["--no-disk-cache", "--no-progress", "--max-batch", "2"]
    assert batch([str(questions), "-o", str(answers), *common]) == 0
    records = read_records(answers)
    assert sorted(r["id"] for r in records) == ["oa", "q0", "q1", "q2", "q3"]
    assert all(r["error"] is None and r["usage"]["prompt_tokens"] > 150 for r in records)
    # Rerun with one more question and a broken line: only those are new; exit 5 for the bad line.
    with questions.open("a") as fh:
        fh.write(json.dumps({"id": "q9", "question": "Which tree?"}) + "\n{oops\n")
    assert batch([str(questions), "-o", str(answers), *common]) == EXIT_PARTIAL
    records = read_records(answers)
    assert [r["id"] for r in records[5:]] == [None, "q9"]
    assert records[5]["error"]["type"] == "bad_line"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RagcacheError, match="no questions") as info:
        batch([str(empty), "-o", str(answers), *common])
    assert info.value.exit_code == 2
    with pytest.raises(RagcacheError, match="cannot write") as info:
        batch([str(questions), "-o", str(tmp_path / "missing" / "a.jsonl"), *common])
    assert info.value.exit_code == 2
    assert len(read_records(answers)) == 7  # nothing already answered was lost


@pytest.mark.slow
def test_real_gemma_restores_a_document_past_its_window(tmp_path: Path, home: Path) -> None:
    lines = [
        json.dumps({"id": "a", "question": "Which word comes first?"}),
        json.dumps({"id": "b", "question": "Is memory mentioned?"}),
        json.dumps({"id": "c", "question": "What is a node?"}),
    ]
    doc, questions = files(tmp_path, 1100, lines)
    answers = tmp_path / "a.jsonl"
    argv = [str(questions), "-o", str(answers), "--doc", str(doc), "--model", "gemma3-270m"]
    assert batch([*argv, "--max-tokens", "4", "--no-disk-cache", "--json-report"]) == 0
    records = {r["id"]: r for r in read_records(answers)}
    prompt_tokens = [records[i]["usage"]["prompt_tokens"] for i in "abc"]
    assert min(prompt_tokens) > 1000
    cached = sorted(records[i]["usage"]["cached_tokens"] for i in "abc")
    # The first question computes the document; the other two restore it (past the 512 window).
    assert cached[0] == 0 and cached[1] > 1000
    # Greedy answers restored from the cache equal a cold run's.
    from ragcache.batch.formats import BatchRequest
    from ragcache.batch.longdoc import LongContextMode, read_documents

    loaded = load_model("gemma3-270m", home)
    mode = LongContextMode(loaded, read_documents([doc]))
    prepared = mode.prepare(BatchRequest("c", "What is a node?", 3), SamplingParams(max_tokens=4))
    cold = Engine(loaded).generate(prepared.prompt, prepared.params)
    assert records["c"]["answer"] == cold.text
