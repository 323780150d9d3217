"""The bundled python_docs dataset: complete, consistent, and with no question leaking into its
gold passage's heading."""

from __future__ import annotations

import pytest

from ingest.sources import scan_paths
from ragcache.datasets import DatasetNotFoundError, load_dataset, load_topic_questions


def test_python_docs_questions_point_at_corpus_documents():
    ds = load_dataset("python_docs")
    assert len(ds.questions) >= 150
    doc_ids = {f.doc_id for f in scan_paths([str(ds.corpus_dir)]).files}
    assert len(doc_ids) >= 200
    assert len({q.id for q in ds.questions}) == len(ds.questions)
    for q in ds.questions:
        assert q.gold_doc_id in doc_ids
        assert q.question.endswith("?") and q.answer
        gold = (ds.corpus_dir.parent / q.gold_doc_id).read_text()
        assert q.question not in gold  # the question heading was moved out of the passage


def test_missing_dataset_says_how_to_rebuild(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found") as info:
        load_dataset("python_docs", root=tmp_path)
    assert "build_python_docs.py" in (info.value.hint or "")


def test_topic_questions_name_pages_that_state_their_answers():
    """Each hand-written question about one page names a corpus page that holds its gold answer
    (or an alias), so scoring an answer by containment can succeed."""
    corpus = load_dataset("python_docs").corpus_dir
    doc_ids = {f.doc_id for f in scan_paths([str(corpus)]).files}
    questions = load_topic_questions()
    assert len(questions) >= 80
    assert len({q.id for q in questions}) == len(questions)
    assert len({q.section for q in questions}) >= 10  # topics: several questions each
    for q in questions:
        assert q.gold_doc_id in doc_ids and q.question.endswith("?")
        page = (corpus.parent / q.gold_doc_id).read_text().lower()
        assert any(g.lower() in page for g in (q.answer, *q.aliases)), q.id


def test_missing_topic_questions_are_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python_docs_topic_questions.jsonl"):
        load_topic_questions(root=tmp_path)
