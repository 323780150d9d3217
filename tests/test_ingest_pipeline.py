"""Ingest jobs end to end with the real tokenizer, the real embedder and LanceDB in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.journal import RemovalJournal
from ingest.pipeline import JobSpec, run_job
from ragcache.embedder import SentenceTransformerEmbedder
from ragcache.errors import RagcacheError
from ragcache.settings import load_settings
from ragcache.store import open_store
from tests.ingest_support import embedder, generator_tokens, write_markdown_corpus


def _run(corpus: Path, db: Path, **kw):
    spec = JobSpec(paths=(str(corpus),), db_dir=db, sync=kw.pop("sync", False))
    emb = kw.pop("emb", None) or embedder()
    return run_job(spec, load_settings().home, embedder=emb, tokens=generator_tokens(), **kw)


def _rows(db: Path) -> dict[str, dict]:
    table = open_store(db).table
    return {r["chunk_id"]: r for r in table.search().limit(None).to_arrow().to_pylist()}


def test_first_ingest_stores_complete_documents_with_token_ids(tmp_path):
    write_markdown_corpus(tmp_path / "corpus", 4)
    report = _run(tmp_path / "corpus", tmp_path / "db")
    assert sorted(report.added) == [f"corpus/doc{i:03d}.md" for i in range(4)]
    assert not report.partial and report.chunks_written == report.total_chunks > 0
    rows = _rows(tmp_path / "db")
    tokens = generator_tokens()
    for row in rows.values():
        assert row["token_ids"] == tokens.encode(row["text"])
        assert row["tokenizer_id"] == tokens.identity and row["n_tokens"] == len(row["token_ids"])
        assert row["heading_path"][0].startswith(("Caching", "Vectors", "Storage", "Search"))
    states = open_store(tmp_path / "db").doc_states()
    assert all(len(s.doc_hashes) == 1 and len(s.chunk_ids) == s.doc_chunks for s in states.values())


def test_unchanged_corpus_computes_no_embedding(tmp_path):
    write_markdown_corpus(tmp_path / "corpus", 3)
    _run(tmp_path / "corpus", tmp_path / "db")
    before = _rows(tmp_path / "db")
    fresh = SentenceTransformerEmbedder()  # a new instance: it would have to load to embed
    report = _run(tmp_path / "corpus", tmp_path / "db", emb=fresh)
    assert report.unchanged == 3 and report.chunks_written == 0 and report.embed_s == 0
    assert fresh._model is None  # the model was never even loaded
    assert _rows(tmp_path / "db") == before


def test_changed_document_replaces_exactly_its_chunks_and_reports_removed_ids(tmp_path):
    paths = write_markdown_corpus(tmp_path / "corpus", 3)
    _run(tmp_path / "corpus", tmp_path / "db")
    before = _rows(tmp_path / "db")
    text = paths[1].read_text()
    paths[1].write_text(text.replace("paragraph 2.", "paragraph two, rewritten."))
    removed_seen: list[list[str]] = []
    report = _run(tmp_path / "corpus", tmp_path / "db", on_removed=removed_seen.append)
    after = _rows(tmp_path / "db")
    assert report.updated == ["corpus/doc001.md"] and report.unchanged == 2
    old_ids = {c for c, r in before.items() if r["doc_id"] == "corpus/doc001.md"}
    new_ids = {c for c, r in after.items() if r["doc_id"] == "corpus/doc001.md"}
    assert set(report.removed_chunk_ids) == old_ids - new_ids != set()
    assert removed_seen == [report.removed_chunk_ids]
    assert old_ids & new_ids  # untouched paragraphs keep their chunk ids
    others = {c: r for c, r in before.items() if r["doc_id"] != "corpus/doc001.md"}
    assert {c: after[c] for c in others} == others  # other documents: not even rewritten


def test_sync_deletes_documents_gone_from_the_source_only(tmp_path):
    paths = write_markdown_corpus(tmp_path / "corpus", 3)
    _run(tmp_path / "corpus", tmp_path / "db")
    gone_ids = {c for c, r in _rows(tmp_path / "db").items() if r["doc_id"] == "corpus/doc002.md"}
    paths[2].unlink()
    assert _run(tmp_path / "corpus", tmp_path / "db").deleted == []  # no --sync: kept
    report = _run(tmp_path / "corpus", tmp_path / "db", sync=True)
    assert report.deleted == ["corpus/doc002.md"]
    assert set(report.removed_chunk_ids) == gone_ids
    assert {r["doc_id"] for r in _rows(tmp_path / "db").values()} == {
        "corpus/doc000.md",
        "corpus/doc001.md",
    }


def test_sync_keeps_a_document_whose_file_became_unreadable(tmp_path):
    paths = write_markdown_corpus(tmp_path / "corpus", 2)
    _run(tmp_path / "corpus", tmp_path / "db")
    before = _rows(tmp_path / "db")
    paths[0].write_bytes(b"\x00\x01binary now")
    report = _run(tmp_path / "corpus", tmp_path / "db", sync=True)
    assert report.partial and report.deleted == [] and report.removed_chunk_ids == []
    assert "binary" in report.skipped[0].reason
    assert _rows(tmp_path / "db") == before


def test_removed_ids_of_a_killed_job_are_reported_by_the_next(tmp_path):
    write_markdown_corpus(tmp_path / "corpus", 1)
    _run(tmp_path / "corpus", tmp_path / "db")
    kept = next(iter(_rows(tmp_path / "db")))
    # What a job killed between its commit and its report leaves behind:
    RemovalJournal(tmp_path / "db" / ".chunks.removed.jsonl").record(["gone-id", kept])
    report = _run(tmp_path / "corpus", tmp_path / "db")
    assert report.removed_chunk_ids == ["gone-id"]
    assert not (tmp_path / "db" / ".chunks.removed.jsonl").exists()


def test_jsonl_records_are_documents_with_metadata(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "faq.jsonl").write_text(
        '{"id": "q1", "text": "Use a radix tree.", "title": "Trees", "lang": "en"}\n'
        "not json\n"
        '{"id": "q2", "text": "LanceDB is columnar."}\n'
    )
    report = _run(corpus, tmp_path / "db")
    assert sorted(report.added) == ["corpus/faq.jsonl#q1", "corpus/faq.jsonl#q2"]
    assert report.partial and report.skipped[0].path.endswith("faq.jsonl:2")
    row = next(r for r in _rows(tmp_path / "db").values() if r["doc_id"].endswith("#q1"))
    assert row["title"] == "Trees" and row["metadata"] == '{"lang": "en"}'


def test_a_second_job_on_the_same_table_is_refused(tmp_path):
    import fcntl
    import os

    write_markdown_corpus(tmp_path / "corpus", 1)
    (tmp_path / "db").mkdir()
    fd = os.open(tmp_path / "db" / ".chunks.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(RagcacheError, match="another ingest job"):
            _run(tmp_path / "corpus", tmp_path / "db")
    finally:
        os.close(fd)


def test_sync_keeps_records_of_a_jsonl_file_with_a_bad_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = corpus / "r.jsonl"
    records.write_text('{"id": "a", "text": "first record"}\n{"id": "b", "text": "second"}\n')
    _run(corpus, tmp_path / "db")
    records.write_text('{"id": "a", "text": "first record"}\n{"id": "b", "text": \n')  # b broken
    report = _run(corpus, tmp_path / "db", sync=True)
    assert report.partial and report.deleted == []
    assert {r["doc_id"] for r in _rows(tmp_path / "db").values()} == {
        "corpus/r.jsonl#a",
        "corpus/r.jsonl#b",
    }
    records.write_text('{"id": "a", "text": "first record"}\n')  # b really gone
    assert _run(corpus, tmp_path / "db", sync=True).deleted == ["corpus/r.jsonl#b"]
