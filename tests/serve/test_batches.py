"""Batches on a real server: upload a JSONL file, poll it, read its answers, cancel one, and ids
that are unknown or try to leave the batches folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from ragcache.model_loader import LoadedModel
from ragcache.settings import Settings
from tests.serve.conftest import tiny_settings
from tests.serve.server import ServerThread

QUESTIONS = (
    b'{"id": "q1", "question": "What is the first document about?", "max_tokens": 4}\n'
    b"{this line is not json\n"
    b'{"id": "q2", "question": "Summarise the second document.", "max_tokens": 4}\n'
)


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60)


def wait_done(http: httpx.Client, id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = http.get(f"/v1/batches/{id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("pending", "running"):
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"batch {id} still running after {timeout_s}s")


def test_upload_poll_and_read_the_answers(http: httpx.Client, server: ServerThread) -> None:
    up = http.post("/v1/batches", files={"file": ("q.jsonl", QUESTIONS)}, data={"k": "2"})
    assert up.status_code == 202, up.text
    created = up.json()
    id = created["id"]
    assert len(id) == 32 and created["mode"] == "rag"
    assert created["status"] in ("pending", "running", "completed")

    done = wait_done(http, id)
    assert done["status"] == "completed", done
    progress = done["progress"]
    assert progress["total"] == 3 and progress["answered"] == 2
    assert progress["input_errors"] == 1 and progress["failed"] == 0
    assert progress["generated_tokens"] > 0

    out = http.get(f"/v1/batches/{id}/output")
    assert out.status_code == 200
    assert out.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in out.text.splitlines()]
    assert len(records) == 3 and out.text.endswith("\n")
    answers = {r["id"]: r for r in records if r.get("error") is None}
    assert set(answers) == {"q1", "q2"}
    for record in answers.values():
        assert record["usage"]["completion_tokens"] >= 1
        assert "prompt_tokens_details" in record["usage"]
    errors = [r for r in records if r.get("error") is not None]
    assert len(errors) == 1 and errors[0]["error"]["type"] == "bad_line"
    assert errors[0]["line"] == 2

    listed = http.get("/v1/batches").json()["data"]
    assert id in {b["id"] for b in listed}
    assert (server.settings.batches_dir / id / "answers.jsonl").exists()


def test_json_body_with_docs_runs_long_context(http: httpx.Client) -> None:
    body = {
        "questions": [{"id": "a", "question": "What colour is the boat?"}],
        "docs": ["The boat in the harbour is painted red.", {"name": "b.txt", "text": "Gulls."}],
        "max_tokens": 3,
    }
    up = http.post("/v1/batches", json=body)
    assert up.status_code == 202, up.text
    assert up.json()["mode"] == "long_context"
    done = wait_done(http, up.json()["id"])
    assert done["status"] == "completed" and done["progress"]["answered"] == 1


def test_cancel_stops_a_running_batch(http: httpx.Client) -> None:
    lines = [
        {"id": f"c{i}", "question": f"Question number {i} about the documents?"} for i in range(60)
    ]
    up = http.post("/v1/batches", json={"questions": lines, "max_tokens": 16})
    assert up.status_code == 202, up.text
    id = up.json()["id"]
    r = http.post(f"/v1/batches/{id}/cancel")
    assert r.status_code == 200, r.text
    done = wait_done(http, id)
    assert done["status"] == "cancelled"
    assert done["progress"]["answered"] < 60
    # Whatever was written is whole lines.
    out = http.get(f"/v1/batches/{id}/output").text
    assert all(json.loads(line)["id"] for line in out.splitlines())
    # Cancelling again is harmless.
    assert http.post(f"/v1/batches/{id}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/batches/0123456789abcdef0123456789abcdef",
        "/v1/batches/not-an-id/output",
        "/v1/batches/..%2F..%2Fetc%2Fpasswd",
        "/v1/batches/..%2F..%2Fetc/output",
        "/v1/batches/%2E%2E",
    ],
)
def test_unknown_or_traversing_ids_are_404(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["type"] == "not_found_error"


def test_cancel_of_unknown_id_is_404(http: httpx.Client) -> None:
    r = http.post("/v1/batches/ffffffffffffffffffffffffffffffff/cancel")
    assert r.status_code == 404
    assert "no batch" in r.json()["error"]["message"]


def test_empty_upload_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/batches", files={"file": ("q.jsonl", b"\n  \n")})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "EmptyBatchError"
    assert http.post("/v1/batches", json={"questions": []}).status_code == 400


def test_limits_are_enforced(http: httpx.Client, server: ServerThread) -> None:
    too_many = server.settings.max_tokens + 1
    r = http.post("/v1/batches", json={"questions": [{"question": "x"}], "max_tokens": too_many})
    assert r.status_code == 422, r.text
    line = json.dumps({"id": "x", "question": "x", "max_tokens": too_many}).encode()
    r = http.post("/v1/batches", files={"file": ("q.jsonl", line)})
    assert r.status_code == 422 and "line 1" in r.json()["error"]["message"]
    big = b"x" * (server.settings.max_upload_bytes + 1)
    assert http.post("/v1/batches", files={"file": ("q.jsonl", big)}).status_code == 413
    assert (
        http.post("/v1/batches", content=b"x", headers={"content-type": "text/plain"}).status_code
        == 415
    )


def test_shutdown_cancels_running_batches(
    tmp_path: Path, tiny_llama: LoadedModel, tiny_store: Path, core: Settings
) -> None:
    srv = ServerThread(tiny_settings(tiny_llama, tiny_store, tmp_path, api_key=None), core).start()
    try:
        lines = [{"id": f"s{i}", "question": f"Tell me about topic {i}."} for i in range(200)]
        up = httpx.post(
            f"{srv.base_url}/v1/batches", json={"questions": lines, "max_tokens": 32}, timeout=30
        )
        assert up.status_code == 202, up.text
        entry = srv.app.state["ragcache"].batches.get(up.json()["id"])
    finally:
        started = time.monotonic()
        srv.stop()
    assert not srv.thread.is_alive() and time.monotonic() - started < 15
    status = entry.job.status()
    assert status.state == "cancelled" and status.answered < 200
    text = entry.answers.read_text()
    assert text == "" or text.endswith("\n")
