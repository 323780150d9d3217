"""POST /v1/ask on a real server: the SSE stream, the JSON answer, and its 4xx answers."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.server import ServerThread
from tests.serve.sse import SSEEvent, parse_sse


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60)


def ask_stream(http: httpx.Client, body: dict) -> list[SSEEvent]:
    with http.stream("POST", "/v1/ask", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(r.iter_lines()))


def test_sse_stream_sends_sources_tokens_then_done(http: httpx.Client) -> None:
    events = ask_stream(http, {"question": "What does a cache keep?", "k": 3, "max_tokens": 12})
    kinds = [e.event for e in events]
    assert kinds[0] == "sources" and kinds[-1] == "done"
    assert set(kinds[1:-1]) <= {"token"}
    sources = events[0].json()["sources"]
    assert [s["number"] for s in sources] == [1, 2, 3]
    done = events[-1].json()
    assert "".join(e.json()["text"] for e in events if e.event == "token") == done["model_text"]
    assert done["method"] in {"generated", "extracted", "declined"}
    for quote in done["quotes"]:  # every citation carries its supporting span
        assert quote["number"] in done["citations"] and quote["end"] > quote["start"]
    assert [s["chunk_id"] for s in done["sources"]] == [s["chunk_id"] for s in sources]
    usage = done["usage"]
    assert usage["prompt_tokens"] == usage["cached_tokens"] + usage["recomputed_tokens"]
    assert 1 <= usage["completion_tokens"] <= 12 and usage["ttft_s"] > 0
    assert done["figures"]["retrieval_ms"] > 0
    assert done["figures"]["drafted_tokens"] >= done["figures"]["accepted_tokens"] >= 0


def test_repeated_question_restores_its_prompt_from_the_cache(http: httpx.Client) -> None:
    body = {"question": "How are embeddings compared?", "stream": False, "max_tokens": 6}
    first = http.post("/v1/ask", json=body).json()
    again = http.post("/v1/ask", json=body).json()
    assert again["answer"] == first["answer"] and again["model_text"] == first["model_text"]
    assert again["usage"]["cached_tokens"] >= again["usage"]["prompt_tokens"] - 1
    assert again["usage"]["cached_tokens"] > first["usage"]["cached_tokens"]


def test_orders_and_where_filter(http: httpx.Client) -> None:
    for order in ("relevance", "canonical", "cache"):
        out = http.post(
            "/v1/ask",
            json={"question": "storage", "order": order, "stream": False, "max_tokens": 2},
        )
        assert out.status_code == 200 and out.json()["order"] == order
    only = http.post(
        "/v1/ask",
        json={
            "question": "storage",
            "where": "doc_id = 'doc002.md'",
            "stream": False,
            "max_tokens": 2,
        },
    ).json()
    assert {s["doc_id"] for s in only["sources"]} == {"doc002.md"}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"question": ""}, 422, "question"),
        ({"question": "x", "k": 9}, 422, "at most 8"),
        ({"question": "x", "max_tokens": 65}, 422, "at most 64"),
        ({"question": "x", "order": "random"}, 422, "order"),
        ({"question": "x", "where": "no such column = 1"}, 400, "where filter"),
        ({"question": "x", "where": "position >= 0; DROP TABLE chunks"}, 400, "second statement"),
        ({"question": "x", "stop": [""]}, 422, "stop"),
        ({"question": 3}, 422, "question"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(
    http: httpx.Client, body: dict, status: int, needle: str
) -> None:
    r = http.post("/v1/ask", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in (error["message"] + str(error["details"])), error


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/ask", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_extract_mode_answers_with_a_quote_and_runs_no_model(http: httpx.Client) -> None:
    body = {"question": "How are embeddings compared?", "mode": "extract", "stream": False}
    out = http.post("/v1/ask", json=body).json()
    assert out["method"] == "extracted" and out["finish_reason"] == "extracted"
    assert out["usage"]["completion_tokens"] == 0 and out["model_text"] == ""
    # the quoted sentence(s), and maybe a later sentence of the same passage after an ellipsis
    quotes = out["quotes"]
    assert 1 <= len(quotes) <= 2 and len({q["number"] for q in quotes}) == 1
    assert out["citations"] == [quotes[0]["number"]]
    for quote in quotes:
        assert " ".join(quote["quote"].split()).rstrip(".!?:;") in out["answer"]
    events = ask_stream(http, {**body, "stream": True})
    assert [e.event for e in events] == ["sources", "token", "done"]
    assert events[-1].json()["answer"] == out["answer"]


def test_unknown_mode_is_refused_by_the_schema(http: httpx.Client) -> None:
    r = http.post("/v1/ask", json={"question": "storage", "mode": "guess", "stream": False})
    assert r.status_code == 422 and "mode" in r.text


def test_a_follow_up_continues_its_conversation_on_the_cached_path(http: httpx.Client) -> None:
    first = http.post(
        "/v1/ask", json={"question": "What does the cache keep?", "stream": False, "max_tokens": 4}
    ).json()
    assert first["conversation"]
    follow = http.post(
        "/v1/ask",
        json={
            "question": "And where is it stored?",
            "stream": False,
            "max_tokens": 4,
            "conversation": first["conversation"],
        },
    ).json()
    assert follow["conversation"] == first["conversation"]
    # the earlier turn is in the prompt, and its KV came from the cache
    assert follow["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    assert follow["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
    gone = http.post("/v1/ask", json={"question": "x", "conversation": "no-such-conversation"})
    assert gone.status_code == 404 and "conversation" in gone.json()["error"]["message"]


def test_sources_say_whether_their_kv_came_from_the_cache(http: httpx.Client) -> None:
    body = {"question": "How does full-text search rank documents?", "stream": False}
    http.post("/v1/ask", json={**body, "max_tokens": 2})
    again = http.post("/v1/ask", json={**body, "max_tokens": 2}).json()
    assert again["sources"] and all(s["cached"] for s in again["sources"])
    assert all(s["text"] for s in again["sources"])
    tree = http.get("/v1/cache/tree", params={"limit": 5}).json()["nodes"]
    assert tree and tree[0]["parent"] is None and tree[0]["hits"] >= 2 and tree[0]["label"]
    ids = {n["id"] for n in tree}
    assert all(n["parent"] is None or n["parent"] in ids for n in tree)  # parents first


@pytest.mark.parametrize("mode", ["off", "lookup"])
def test_speculation_can_be_chosen_per_request_and_gives_the_same_answer(
    http: httpx.Client, mode: str
) -> None:
    body = {"question": "What does a cache keep?", "stream": False, "max_tokens": 12}
    plain = http.post("/v1/ask", json={**body, "speculation": "off"}).json()
    chosen = http.post("/v1/ask", json={**body, "speculation": mode}).json()
    assert chosen["model_text"] == plain["model_text"]
    bad = http.post("/v1/ask", json={**body, "speculation": "medusa"})
    assert bad.status_code == 422 and "speculation" in bad.text


def test_chunk_reuse_is_chosen_per_request_and_reported(http: httpx.Client) -> None:
    """The same chunks in another order: with chunk_reuse "epic" the ones the exact prefix
    misses are copied, and usage says how many; a bad mode is refused."""
    body = {"question": "What does a cache keep?", "stream": False, "max_tokens": 4, "k": 4}
    http.post("/v1/ask", json={**body, "order": "canonical", "chunk_reuse": "epic"})
    got = http.post("/v1/ask", json={**body, "order": "relevance", "chunk_reuse": "epic"}).json()
    usage = got["usage"]
    assert usage["prompt_tokens"] == (
        usage["cached_tokens"] + usage["chunk_reused_tokens"] + usage["recomputed_tokens"]
    )
    assert usage["chunk_reused_tokens"] > 0, usage
    exact = http.post("/v1/ask", json={**body, "order": "relevance"}).json()
    assert exact["usage"]["chunk_reused_tokens"] == 0
    bad = http.post("/v1/ask", json={**body, "chunk_reuse": "everything"})
    assert bad.status_code == 422 and "chunk_reuse" in bad.text
