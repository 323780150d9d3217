"""Input lines in both shapes, bad lines and duplicate ids, output records."""

from __future__ import annotations

import json

from ragcache.batch.formats import (
    BAD_LINE,
    DUPLICATE_ID,
    BadLine,
    BatchRequest,
    Citation,
    Usage,
    answer_record,
    read_requests,
)


def test_both_shapes_and_every_kind_of_bad_line() -> None:
    lines = [
        json.dumps({"id": "q1", "question": " What is a cache? ", "max_tokens": 5}),
        "",
        json.dumps(
            {
                "custom_id": "c1",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [
                        {"role": "system", "content": "be nice"},
                        {"role": "user", "content": [{"type": "text", "text": "Why trees?"}]},
                    ],
                    "max_completion_tokens": 7,
                },
            }
        ),
        json.dumps({"custom_id": 9, "body": {"prompt": "Define eviction."}}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "q2"}),
        json.dumps({"id": "q3", "question": ""}),
        json.dumps({"custom_id": "c2", "body": {"messages": [{"role": "system", "content": "x"}]}}),
        json.dumps({"id": "q1", "question": "again"}),
        json.dumps({"id": "q4", "question": "ok", "max_tokens": 0}),
    ]
    out = list(read_requests(lines))
    requests = [o for o in out if isinstance(o, BatchRequest)]
    bad = [o for o in out if isinstance(o, BadLine)]
    assert requests == [
        BatchRequest("q1", "What is a cache?", 1, 5),
        BatchRequest("c1", "Why trees?", 3, 7, openai=True),
        BatchRequest("9", "Define eviction.", 4, None, openai=True),
    ]
    assert [(b.line, b.id, b.kind) for b in bad] == [
        (5, None, BAD_LINE),
        (6, None, BAD_LINE),
        (7, "q2", BAD_LINE),
        (8, "q3", BAD_LINE),
        (9, "c2", BAD_LINE),
        (10, "q1", DUPLICATE_ID),
        (11, "q4", BAD_LINE),
    ]
    messages = {b.line: b.message for b in bad}
    assert "not valid JSON" in messages[5]
    assert "missing 'question'" in messages[7]
    assert "already used on line 1" in messages[10]
    assert "max_tokens" in messages[11]


def test_answer_record_carries_usage_with_cached_tokens() -> None:
    record = answer_record(
        BatchRequest("q1", "?", 3),
        "Paris [1].",
        [Citation(1, "geo.md", "geo.md#0", "Geography")],
        Usage(prompt_tokens=100, cached_tokens=90, recomputed_tokens=10, completion_tokens=4),
        "stop",
    )
    assert record["id"] == "q1" and record["line"] == 3 and record["error"] is None
    assert record["citations"] == [
        {"number": 1, "source": "geo.md", "chunk_id": "geo.md#0", "title": "Geography"}
    ]
    usage = record["usage"]
    assert usage["cached_tokens"] == 90 and usage["recomputed_tokens"] == 10
    assert usage["prompt_tokens_details"] == {"cached_tokens": 90}
    assert usage["total_tokens"] == 104
    json.dumps(record)
