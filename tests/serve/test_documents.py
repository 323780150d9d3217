"""Documents on a real server: upload (JSON and multipart), list, delete with its KV, and names that
try to leave the uploads folder."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.server import ServerThread

NOTE = (
    "# Kiwi orchards\n\n## Pruning\n\nKiwi vines are pruned in winter so that the fruiting canes "
    "get light. A kiwi orchard needs male and female vines for pollination.\n"
)


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=server.headers, timeout=120)


def cache_stats(http: httpx.Client) -> dict:
    return http.get("/v1/cache").json()["stats"]


def test_upload_json_then_ask_then_delete_drops_its_kv(
    http: httpx.Client, server: ServerThread
) -> None:
    up = http.post("/v1/documents", json={"documents": [{"name": "kiwi.md", "text": NOTE}]})
    assert up.status_code == 201, up.text
    result = up.json()
    assert result["documents"] == ["kiwi.md"] and result["added"] == ["kiwi.md"]
    assert result["chunks_written"] >= 1
    ids = [d["id"] for d in http.get("/v1/documents", params={"limit": 1000}).json()["documents"]]
    assert "kiwi.md" in ids

    body = {"question": "How are kiwi vines pruned?", "stream": False, "max_tokens": 4}
    first = http.post("/v1/ask", json=body).json()
    assert "kiwi.md" in {s["doc_id"] for s in first["sources"]}
    again = http.post("/v1/ask", json=body).json()
    assert again["usage"]["cached_tokens"] > 0
    before = cache_stats(http)

    gone = http.delete("/v1/documents/kiwi.md")
    assert gone.status_code == 200, gone.text
    deleted = gone.json()
    assert deleted["chunks_deleted"] == result["chunks_written"]
    assert deleted["kv_nodes_dropped"] >= 1 and deleted["file_removed"] is True
    after = cache_stats(http)
    assert after["invalidated"] - before["invalidated"] == deleted["kv_nodes_dropped"]
    assert after["ram_nodes"] < before["ram_nodes"]
    assert not (server.settings.uploads_dir / "kiwi.md").exists()
    third = http.post("/v1/ask", json=body).json()
    assert "kiwi.md" not in {s["doc_id"] for s in third["sources"]}
    assert http.delete("/v1/documents/kiwi.md").status_code == 404


def test_multipart_upload_and_replacement_drops_the_old_chunks_kv(http: httpx.Client) -> None:
    files = {"files": ("plums.txt", b"Plum trees flower in early spring before their leaves open.")}
    first = http.post("/v1/documents", files=files)
    assert first.status_code == 201, first.text
    assert first.json()["added"] == ["plums.txt"]
    body = {"question": "When do plum trees flower?", "stream": False, "max_tokens": 2}
    http.post("/v1/documents", json={})  # a bad upload in between changes nothing
    assert "plums.txt" in {s["doc_id"] for s in http.post("/v1/ask", json=body).json()["sources"]}
    changed = {"files": ("plums.txt", b"Plum trees flower in April in cold climates.")}
    second = http.post("/v1/documents", files=changed).json()
    assert second["updated"] == ["plums.txt"] and second["kv_nodes_dropped"] >= 1
    same = http.post("/v1/documents", files=changed).json()
    assert same["unchanged"] == 1 and same["chunks_written"] == 0
    assert http.delete("/v1/documents/plums.txt").status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "../escape.md",
        "a/b.md",
        ".hidden.md",
        "..",
        "x\\y.md",
        "notes.exe",
        "/etc/passwd",
        "a\x00.md",
    ],
)
def test_unsafe_or_unsupported_upload_names_are_refused(
    http: httpx.Client, server: ServerThread, name: str
) -> None:
    r = http.post("/v1/documents", json={"documents": [{"name": name, "text": "hello"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]
    uploads = server.settings.uploads_dir
    assert not (uploads.parent / "escape.md").exists()
    assert all(p.parent == uploads for p in uploads.rglob("*"))


def test_delete_with_a_traversing_id_touches_no_file(
    http: httpx.Client, server: ServerThread
) -> None:
    victim = server.settings.uploads_dir.parent / "victim.md"
    victim.write_text("# keep me\n")
    for doc_id in ("../victim.md", "..%2Fvictim.md", "%2E%2E/victim.md"):
        assert http.delete(f"/v1/documents/{doc_id}").status_code == 404
    assert victim.exists()


def test_upload_limits(http: httpx.Client, server: ServerThread) -> None:
    big = b"x" * (server.settings.max_upload_bytes + 1)
    r = http.post("/v1/documents", files={"files": ("big.txt", big)})
    assert r.status_code == 413
    r = http.post("/v1/documents", content=b"plain", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = http.post("/v1/documents", json={"documents": []})
    assert r.status_code == 422
