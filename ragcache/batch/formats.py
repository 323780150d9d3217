"""Batch input lines in, answer and error records out.

Two input shapes, one per line:
- `{"id": "q1", "question": "...", "max_tokens": 32}` (max_tokens optional);
- the OpenAI Batch API's: `{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
  "body": {"messages": [...], "max_tokens": 32}}`, or `"body": {"prompt": "..."}` for
  `/v1/completions`. The question is the last user message (or the prompt); system messages are
  ignored, since the batch's mode (RAG or long-context) supplies the instructions.

Output records carry the input's id and line number, so a rerun can tell what is done.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# Error types an output record may carry. Input errors are final: a rerun reads the same line the
# same way. Failures (anything that went wrong answering) are retried by a rerun.
BAD_LINE = "bad_line"
DUPLICATE_ID = "duplicate_id"
INPUT_ERRORS = frozenset({BAD_LINE, DUPLICATE_ID})


@dataclass(frozen=True)
class BatchRequest:
    id: str
    question: str
    line: int  # 1-based line number in the input file
    max_tokens: int | None = None  # the line's own limit, if it set one
    openai: bool = False  # came in the OpenAI Batch API shape


@dataclass(frozen=True)
class BadLine:
    line: int
    id: str | None  # when the line was readable enough to have one
    kind: str  # BAD_LINE or DUPLICATE_ID
    message: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    recomputed_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            # The OpenAI spelling, so clients reading usage the OpenAI way find it too.
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class Citation:
    number: int  # the [n] the answer used
    source: str
    chunk_id: str | None = None  # RAG mode; None for a long-context document
    title: str | None = None


class _LineError(ValueError):
    def __init__(self, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.id = id


def _text(content: Any) -> str:
    # OpenAI content is a string or a list of parts such as {"type": "text", "text": ...}.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _max_tokens(value: Any, id: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _LineError(f"max_tokens must be a positive integer, got {value!r}", id)
    return value


def _id(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise _LineError(f"{field!r} must be a non-empty string or integer, got {value!r}")
    return str(value)


def parse_line(text: str, line: int) -> BatchRequest:
    """One input line as a request; raises ValueError with a readable message if it is not one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    if "custom_id" in obj or "body" in obj:
        id = _id(obj.get("custom_id"), "custom_id")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _LineError("'body' must be an object with 'messages' or 'prompt'", id)
        if "messages" in body:
            messages = body["messages"]
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            question = _text(users[-1].get("content")) if users else ""
        else:
            prompt = body.get("prompt")
            question = prompt[0] if isinstance(prompt, list) and prompt else prompt  # type: ignore[assignment]
        if not isinstance(question, str) or not question.strip():
            raise _LineError("no question: 'body' needs a user message or a 'prompt'", id)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return BatchRequest(id, question.strip(), line, _max_tokens(limit, id), openai=True)
    if "id" not in obj or "question" not in obj:
        missing = [k for k in ("id", "question") if k not in obj]
        raise _LineError(
            f"missing {' and '.join(repr(k) for k in missing)}; expected "
            '{"id": ..., "question": ...} or the OpenAI batch shape {"custom_id": ..., "body": ...}',
            str(obj["id"]) if "id" in obj else None,
        )
    id = _id(obj["id"], "id")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise _LineError("'question' must be a non-empty string", id)
    return BatchRequest(id, question.strip(), line, _max_tokens(obj.get("max_tokens"), id))


def read_requests(lines: Iterable[str]) -> Iterator[BatchRequest | BadLine]:
    """Parse lines (blank ones skipped); a bad line or a repeated id comes out as a BadLine."""
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            request = parse_line(raw, number)
        except _LineError as exc:
            yield BadLine(number, exc.id, BAD_LINE, str(exc))
            continue
        if request.id in seen:
            yield BadLine(
                number,
                request.id,
                DUPLICATE_ID,
                f"id {request.id!r} is already used on line {seen[request.id]}; this line is skipped",
            )
            continue
        seen[request.id] = number
        yield request


def answer_record(
    request: BatchRequest,
    answer: str,
    citations: Iterable[Citation],
    usage: Usage,
    finish_reason: str,
) -> dict[str, Any]:
    return {
        "id": request.id,
        "line": request.line,
        "answer": answer,
        "citations": [{k: v for k, v in c.__dict__.items() if v is not None} for c in citations],
        "usage": usage.as_dict(),
        "finish_reason": finish_reason,
        "error": None,
    }


def error_record(
    line: int, id: str | None, kind: str, message: str, hint: str | None = None
) -> dict:
    error = {"type": kind, "message": message}
    if hint:
        error["hint"] = hint
    return {"id": id, "line": line, "error": error}


def bad_line_record(bad: BadLine) -> dict[str, Any]:
    return error_record(bad.line, bad.id, bad.kind, bad.message)
